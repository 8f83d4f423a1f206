"""MLflow bookkeeping: one experiment per study, a parent run per invocation,
a child run per cell, and finished cells found again by their config hash.

Uses ``MlflowClient`` with explicit run ids rather than the fluent API's global
active run, so logging never depends on hidden state.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

BATCH = 100  # log_batch accepts at most 100 params per call
F = TypeVar("F", bound=Callable[..., Any])


def retry_locked(fn: F) -> F:
    """Retry a store call that hit SQLite's 'database is locked' (several workers, one file)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(12):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - MLflow wraps the sqlite error in its own types
                if "locked" not in str(e).lower() or attempt == 11:
                    raise
                time.sleep(min(0.05 * 2**attempt, 2.0))
        raise AssertionError("unreachable")

    return wrapper  # type: ignore[return-value]


def tracking_uri(root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store in the project folder."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path.cwd() if root is None else root
    return f"sqlite:///{(root / 'mlruns.db').resolve()}"


def client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=uri or tracking_uri())


def experiment_id(c: MlflowClient, name: str) -> str:
    """The experiment ``name``, created if missing (artifacts beside a local SQLite store)."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = c._tracking_client.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / name).as_uri()
    return c.create_experiment(name, artifact_location=location)


def git_state(cwd: Path | None = None) -> dict[str, str]:
    """{'git_commit': sha or 'unknown', 'git_dirty': 'true'/'false'/'unknown'}."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": str(bool(git("status", "--porcelain"))).lower()}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def search_cells(c: MlflowClient, exp_id: str, status: str | None = None) -> list:
    """Every cell run of the experiment (optionally only those with ``status``)."""
    query = "tags.kind = 'cell'"
    if status:
        query += f" and attributes.status = '{status}'"
    runs, token = [], None
    while True:
        page = c.search_runs([exp_id], query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def finished_hashes(c: MlflowClient, exp_id: str) -> dict[str, str]:
    """config_hash -> run_id of every FINISHED cell."""
    return {r.data.tags["config_hash"]: r.info.run_id for r in search_cells(c, exp_id, "FINISHED")}


@retry_locked
def start_run(c: MlflowClient, exp_id: str, name: str, tags: dict[str, str], parent: str | None = None) -> str:
    if parent is not None:
        tags = {**tags, "mlflow.parentRunId": parent}
    return c.create_run(exp_id, run_name=name, tags=tags).info.run_id


@retry_locked
def log_params(c: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), BATCH):
        c.log_batch(run_id, params=items[i : i + BATCH])


@retry_locked
def log_metrics(c: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    """One batch: the metrics at ``step`` and a heartbeat tag, so stale runs can be told apart."""
    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
                tags=[RunTag("heartbeat", str(now))])


@retry_locked
def set_tags(c: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


@retry_locked
def terminate(c: MlflowClient, run_id: str, status: str, reason: str | None = None) -> None:
    """End a run as FINISHED / FAILED / KILLED, with the reason as the 'failure_reason' tag."""
    if reason:
        c.set_tag(run_id, "failure_reason", reason[:4000])
    c.set_terminated(run_id, status)


def owner_tags() -> dict[str, str]:
    """Which process runs this: stale RUNNING runs are found by host + pid or heartbeat."""
    return {"worker_host": platform.node(), "worker_pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale(c: MlflowClient, exp_id: str, stale_after_s: float = 1800.0) -> list[str]:
    """Mark RUNNING runs whose process is gone KILLED; returns their run ids.

    A run of this host whose pid is dead is stale at once; a run of another host
    when its heartbeat (or start) is older than ``stale_after_s``.
    """
    now, reaped = time.time() * 1000, []
    runs = c.search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=5000)
    for run in runs:
        tags = run.data.tags
        if tags.get("worker_host") == platform.node() and tags.get("worker_pid", "").isdigit():
            stale = not _alive(int(tags["worker_pid"]))
        else:
            last = float(tags.get("heartbeat", run.info.start_time or 0))
            stale = now - last > stale_after_s * 1000
        if stale:
            terminate(c, run.info.run_id, "KILLED", "the process running it died (killed or crashed); rerun resumes it")
            reaped.append(run.info.run_id)
    return reaped
