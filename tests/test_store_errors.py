"""Where kdablate meets the store and the disk: one line and exit 2, never a traceback."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from kdablate import tracking
from tests.datafiles import TINY_STUDY as SMOKE
from tests.test_study import write



def kdablate(*args: str, cwd: Path, uri: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if uri is not None:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run([sys.executable, "-m", "kdablate.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def one_line(out: subprocess.CompletedProcess, says: str) -> None:
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and says in out.stderr, out.stderr


def test_a_relative_sqlite_uri_is_the_current_folder(tmp_path):
    path = write(tmp_path, SMOKE)
    out = kdablate("run", str(path), "--no-progress", cwd=tmp_path, uri="sqlite:///rel.db")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "rel.db").is_file() and "4 done" in kdablate("status", str(path), cwd=tmp_path,
                                                                     uri="sqlite:///rel.db").stdout
    assert "MLflow" not in out.stdout + out.stderr  # no "Creating initial MLflow database tables" lines


@pytest.mark.parametrize("command", ["run", "status"])
def test_an_unreachable_server_is_one_line(tmp_path, command):
    one_line(kdablate(command, str(write(tmp_path, SMOKE)), cwd=tmp_path, uri="http://127.0.0.1:9"),
             "cannot reach the MLflow server at http://127.0.0.1:9")


def test_an_unknown_scheme_is_one_line(tmp_path):
    one_line(kdablate("run", str(write(tmp_path, SMOKE)), cwd=tmp_path, uri="bogus://x"), "unknown scheme 'bogus'")


def test_a_store_that_is_a_directory_says_so(tmp_path):
    (tmp_path / "dir.db").mkdir()
    one_line(kdablate("run", str(write(tmp_path, SMOKE)), cwd=tmp_path, uri=f"sqlite:///{tmp_path / 'dir.db'}"),
             "is a directory, not a SQLite file")


@pytest.mark.parametrize("sub", ["checkpoints", "teachers"])
def test_a_cache_folder_that_is_a_file_is_refused_before_training(tmp_path, sub):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / sub).write_text("not a folder")
    one_line(kdablate("run", str(write(tmp_path, SMOKE)), "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path),
             f"{sub} is a file, not a folder")


def test_status_on_no_store_says_so_and_creates_nothing(tmp_path):
    out = kdablate("status", str(write(tmp_path, SMOKE)), cwd=tmp_path)
    assert out.returncode == 0 and "no MLflow store at" in out.stdout and not (tmp_path / "mlruns.db").exists()


def test_a_creator_killed_midway_leaves_nothing_behind(tmp_path):
    db = tmp_path / "m.db"
    for name in (f".{db.name}.99999.creating", f".{db.name}.99999.creating-journal"):
        (tmp_path / name).write_bytes(b"half")
    tracking.client(f"sqlite:///{db}")
    assert db.is_file() and not list(tmp_path.glob(".m.db.*"))


def test_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    from kdablate import cli

    def full(*a, **k):
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as e:
            raise MlflowException(f"(sqlite3.OperationalError) {e}") from e

    monkeypatch.setattr("kdablate.runner.run_study", full)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    assert cli.main(["run", str(write(tmp_path, SMOKE))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the disk is full" in err and "free space and rerun" in err


@pytest.mark.parametrize("text", ["temperature: .inf", "temperature: 1e309", "entropy_penalty: .inf"])
def test_infinite_knowledge_numbers_are_refused(tmp_path, text):
    one_line(kdablate("dry-run", str(write(tmp_path, SMOKE.replace("alpha: 0.0}", f"alpha: 0.0, {text}}}"))),
                      cwd=tmp_path), "finite number")


def test_a_raw_pickle_checkpoint_is_refused_without_a_warning(tmp_path):
    import pickle

    import torch

    (tmp_path / "t.pth").write_bytes(pickle.dumps({"w": torch.zeros(2)}, protocol=4))
    study = SMOKE.replace("teacher: null", f"teacher: {{model: mlp, checkpoint: {tmp_path / 't.pth'}}}")
    one_line(kdablate("dry-run", str(write(tmp_path, study)), cwd=tmp_path), "weights_only=True")


def test_a_shipped_study_loads_from_any_folder(tmp_path):
    out = kdablate("dry-run", "smoke", cwd=tmp_path)
    assert out.returncode == 0 and "studies/smoke.yaml" in out.stdout
