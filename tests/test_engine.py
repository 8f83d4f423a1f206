"""The study engine: kill -9 and resume, failures, status, parallel workers, provenance."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdablate import tracking
from kdablate.hardware import usable_cores
from kdablate.runner import RunOptions, run_study
from kdablate.study import load_study

ENGINE_STUDY = """
base:
  data: {{name: mnist1d, num_samples: 1000}}
  student: {{name: mlp, hidden: 64, depth: 2}}
  optim: {{epochs: {epochs}, batch_size: 32}}
  teacher: {{model: {{name: cnn1d, channels: 8, depth: 2}}, optim: {{epochs: 2, batch_size: 64}}, min_accuracy: 0.1}}
seeds: [0, 1, 2]
arms:
  - {{name: ce, mass: none, alpha: 0.0}}
  - {{name: kd, mass: teacher, structure: teacher, temperature: 4.0, alpha: 0.9}}
{extra}
"""


def write_study(tmp_path: Path, epochs: int = 3, extra: str = "", name: str = "engine") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(ENGINE_STUDY.format(epochs=epochs, extra=extra))
    return path


def cli(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdablate.cli", *args], cwd=cwd, capture_output=True, text=True, **kw)


def runs_by_status(study_name: str) -> dict[str, list]:
    client = tracking.client()
    exp = client.get_experiment_by_name(study_name)
    out: dict[str, list] = {}
    for r in tracking.search_cells(client, exp.experiment_id):
        out.setdefault(r.info.status, []).append(r)
    return out


def kill_mid_cell(tmp_path: Path, name: str, stack: str, workers: str, done_first: int):
    """Start a study, kill -9 it once `done_first` cells finished and one is past its epoch-1
    checkpoint. Returns (study path, runs by status), or (path, None) if no killed cell had one."""
    path = write_study(tmp_path, epochs=25, name=name)
    proc = subprocess.Popen([sys.executable, "-m", "kdablate.cli", "run", str(path), "--no-progress",
                             "--checkpoint-every", "1", "--stack", stack, "--workers", workers], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client, deadline = tracking.client(), time.time() + 120
    while time.time() < deadline:
        exp = client.get_experiment_by_name(name)
        runs = tracking.search_cells(client, exp.experiment_id) if exp else []
        running = [r for r in runs if r.info.status == "RUNNING"]
        # Two logged epochs: the epoch-1 checkpoint is saved before epoch 2 is logged.
        if [r.info.status for r in runs].count("FINISHED") >= done_first and running and \
                len(client.get_metric_history(running[0].info.run_id, "val/acc")) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # the workers' death signal is asynchronous: let them go before the rerun looks
    before = runs_by_status(name)
    caught = [r for r in before.get("RUNNING", []) if len(client.get_metric_history(r.info.run_id, "val/acc")) >= 2]
    return path, before if caught else None


@pytest.mark.parametrize("stack, workers, done_first, mid_way", [("off", "1", 2, 1), ("on", "1", 3, 3),
                                                                   ("off", "2", 2, 0)])
def test_kill_9_then_rerun_completes_with_one_finished_run_per_cell(mlflow_store, tmp_path, stack, workers,
                                                                    done_first, mid_way):
    """Killed mid-cell (unstacked: one cell; stacked: the 3 seeds of an arm at once; two workers:
    the cells both were on, the workers dying with the killed process), the rerun resumes each
    interrupted cell in its own run from its own checkpoint. mid_way 0: as many as were running."""
    for attempt in range(3):  # a fast cell may finish between the last look and the kill: then try again
        path, before = kill_mid_cell(tmp_path, f"engine{attempt}", stack, workers, done_first)
        if before is not None:
            break
    assert before is not None, "the kill should have caught a cell mid-way, past its first checkpoint"
    name, study, client = path.stem, load_study(path), tracking.client()
    rerun = cli("run", str(path), "--no-progress", "--checkpoint-every", "1", "--stack", stack, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "interrupted run(s) marked KILLED" in rerun.stdout and "(resumed after epoch" in rerun.stdout
    after = runs_by_status(name)
    assert "RUNNING" not in after
    finished = [r.data.tags["config_hash"] for r in after["FINISHED"]]
    assert sorted(finished) == sorted(c.config_hash() for c in study.cells)  # exactly one per cell
    resumed = [r for r in after["FINISHED"] if "kdablate.resumed_from_epoch" in r.data.tags]
    assert len(resumed) == mid_way if mid_way else 1 <= len(resumed) <= len(before["RUNNING"])
    for run in resumed:  # a complete curve across the crash, no epoch twice
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/acc")) == list(range(1, 26))
    run_id = resumed[0].info.run_id
    # Wall time accumulates: it includes what the first attempt spent reaching the checkpoint.
    epoch = int(resumed[0].data.tags["kdablate.resumed_from_epoch"])
    before_kill = next(m.value for m in client.get_metric_history(run_id, "time/elapsed_s") if m.step == epoch)
    assert resumed[0].data.metrics["time/wall_s"] > before_kill > 0


def test_failing_cells_are_marked_and_the_study_goes_on(mlflow_store, tmp_path):
    bad = "  - {name: diverge, mass: none, alpha: 0.0, set: {optim.lr: 1.0e+6, optim.momentum: 0.0}}"
    path = write_study(tmp_path, extra=bad, name="failing")
    out = cli("run", str(path), "--no-progress", cwd=tmp_path)
    assert out.returncode == 1 and "3 cell(s) FAILED" in out.stderr
    by = runs_by_status("failing")
    assert len(by["FINISHED"]) == 6 and len(by["FAILED"]) == 3
    assert all("NonFiniteLoss" in r.data.tags["kdablate.failure_reason"] for r in by["FAILED"])
    status = cli("status", str(path), cwd=tmp_path)
    assert "9 cells: 6 done, 0 pending, 0 running, 3 failed, 0 killed" in status.stdout
    assert status.stdout.count("FAILED   diverge seed") == 3 and "NonFiniteLoss" in status.stdout


def test_two_workers_share_one_sqlite_store_without_loss_or_duplicates(mlflow_store, tmp_path):
    study = load_study(write_study(tmp_path, epochs=2, name="parallel"))
    assert run_study(study, RunOptions(cache_dir=tmp_path / "cache", workers=2, progress=False)) == 0
    by = runs_by_status("parallel")
    assert set(by) == {"FINISHED"}
    hashes = [r.data.tags["config_hash"] for r in by["FINISHED"]]
    assert sorted(hashes) == sorted(c.config_hash() for c in study.cells)
    assert len({r.data.tags["kdablate.worker_pid"] for r in by["FINISHED"]}) == 2  # both workers did work
    assert len(list((tmp_path / "cache" / "teachers").glob("*.pt"))) == 1  # one teacher, trained once


def test_every_run_records_its_provenance(mlflow_store, tmp_path):
    study = load_study(write_study(tmp_path, epochs=1, name="prov"))
    run_study(study, RunOptions(cache_dir=tmp_path / "cache", progress=False))
    run = runs_by_status("prov")["FINISHED"][0]
    t = run.data.tags
    # The default threads: one worker takes every core it may use.
    assert t["env.torch_version"].startswith("2.") and t["env.device"] == "cpu" and t["env.threads"] == str(usable_cores())
    assert t["env.deterministic"] == "true" and t["seed"] in {"0", "1", "2"}
    assert {"env.git_commit", "env.git_dirty", "env.host", "kdablate.worker_pid", "kdablate.heartbeat"} <= set(t)
    assert run.data.metrics["time/wall_s"] > 0
