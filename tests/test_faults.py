"""Faults and concurrency: two invocations of one study, a half-made store, corrupt caches,
unwritable or full folders. Each once lost or duplicated work, or ended in a traceback."""
from __future__ import annotations

import collections
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdablate import tracking
from kdablate.runner import checks
from kdablate.data import load_dataset
from kdablate.registry import ConfigError
from kdablate.study import load_study
from kdablate.teacher import get_teacher

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdablate.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_invocations_on_a_new_store_train_every_cell_once(mlflow_store, tmp_path):
    """Before: 9-15 cells trained twice, up to 114 duplicate metric steps, or a crash in MLflow's
    table-creation race on a new store. Now both exit 0 and each cell has one FINISHED run."""
    procs = [cli("run", "smoke", "--no-progress", cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    client = tracking.client()
    runs = tracking.search_cells(client, client.get_experiment_by_name("smoke").experiment_id)
    finished = collections.Counter(r.data.tags["config_hash"] for r in runs if r.info.status == "FINISHED")
    assert set(finished) == {c.config_hash() for c in load_study("smoke").cells}
    assert set(finished.values()) == {1} and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val/acc")]
        assert sorted(steps) == list(range(1, 5))
    trained = sum(o[0].count("test/acc") for o in outs)
    assert trained == 16 and sum(o[0].count("SKIPPED") for o in outs) >= 1  # the other's cells were skipped


def half_made_store(db: Path, runs: bool) -> None:
    con = sqlite3.connect(db)
    con.execute("create table experiments (experiment_id integer primary key, name text)")
    con.execute("create table runs (run_uuid text primary key)")
    if runs:
        con.execute("insert into runs values ('abc')")
    con.commit()
    con.close()


def test_a_half_made_store_without_runs_is_recreated(tmp_path, capsys):
    db = tmp_path / "mlruns.db"
    half_made_store(db, runs=False)
    client = tracking.client(f"sqlite:///{db}")
    assert tracking.experiment_id(client, "x")
    assert "was half-made (no runs in it)" in capsys.readouterr().out
    assert list(tmp_path.glob("mlruns.db.broken-*"))


def test_a_half_made_store_with_runs_is_refused_not_overwritten(tmp_path):
    db = tmp_path / "mlruns.db"
    half_made_store(db, runs=True)
    with pytest.raises(tracking.StoreError, match="is damaged and holds runs; move it aside"):
        tracking.client(f"sqlite:///{db}")
    assert sqlite3.connect(db).execute("select count(*) from runs").fetchone()[0] == 1


_WRITER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("pragma cache_size = 10")  # a tiny cache: the transaction's pages spill into the file
con.execute("begin immediate")
for i in range(20000):
    con.execute("insert into tags (key, value, run_uuid) values (?, ?, ?)", (f"k{i}", "v" * 100, "none"))
print("in transaction", flush=True)
time.sleep(600)
"""


def test_a_store_killed_mid_transaction_is_rolled_back_not_refused(tmp_path):
    """kill -9 inside a write leaves a hot journal; the next client rolls it back and goes on
    (a read-only check once took it for a damaged store and refused the rerun)."""
    db = tmp_path / "mlruns.db"
    client = tracking.client(f"sqlite:///{db}")
    exp = tracking.experiment_id(client, "x")
    run = client.create_run(exp).info.run_id
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(db)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "in transaction"
    writer.kill()
    writer.wait()
    assert Path(f"{db}-journal").stat().st_size > 0  # hot: the kill left it behind
    again = tracking.client(f"sqlite:///{db}")
    assert again.get_run(run).info.run_id == run
    assert not again.get_run(run).data.tags.get("k0")  # the killed transaction is gone
    assert sqlite3.connect(db).execute("select count(*) from tags where run_uuid = 'none'").fetchone()[0] == 0


@pytest.mark.parametrize("damage", ["truncate", "zero", "garbage"])
def test_a_damaged_teacher_cache_is_retrained_with_a_message(tmp_path, capsys, damage):
    cell = next(c for c in load_study(ROOT / "studies" / "smoke.yaml").cells if c.arm == "teacher+teacher")
    data = load_dataset(cell.data.name, cell.data.params)
    first = get_teacher(cell, data, tmp_path)
    raw = first.path.read_bytes()
    first.path.write_bytes({"truncate": raw[: len(raw) // 2], "zero": bytes(len(raw)), "garbage": b"\x80\x04junk"}[damage])
    again = get_teacher(cell, data, tmp_path)
    assert "is not usable: unreadable" in capsys.readouterr().out
    assert torch.equal(again.logits["test"], first.logits["test"])


def test_cache_that_is_a_file_or_unwritable_or_full_is_refused_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    path.write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        checks.check_folder(path, "the cache")
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:  # as an unwritable folder answers (root ignores mode bits)
        m.setattr(checks.tempfile, "TemporaryFile", denied)
        with pytest.raises(ConfigError, match="cannot write the cache .*: Permission denied"):
            checks.check_folder(tmp_path, "the cache")
    monkeypatch.setattr(checks, "MIN_FREE_MIB", 10**12)
    with pytest.raises(ConfigError, match=r"has only \d+ MiB free \(need 1000000000000\)"):
        checks.check_folder(tmp_path, "the cache")


def test_the_cli_refuses_a_bad_cache_before_training(mlflow_store, tmp_path):
    (tmp_path / "afile").write_text("x")
    out = subprocess.run([sys.executable, "-m", "kdablate.cli", "run", "smoke", "--cache-dir", "afile"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "is a file, not a folder" in out.stderr
    assert "Traceback" not in out.stderr
