"""MLflow bookkeeping: one experiment per study, a parent run per invocation,
a child run per cell, and finished cells found again by their config hash.

Uses ``MlflowClient`` with explicit run ids rather than the fluent API's global
active run, so logging never depends on hidden state.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

BATCH = 100  # log_batch accepts at most 100 params per call


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


def start_run(c: MlflowClient, exp_id: str, name: str, tags: dict[str, str], parent: str | None = None) -> str:
    if parent is not None:
        tags = {**tags, "mlflow.parentRunId": parent}
    return c.create_run(exp_id, run_name=name, tags=tags).info.run_id


def log_params(c: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), BATCH):
        c.log_batch(run_id, params=items[i : i + BATCH])


def log_metrics(c: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def set_tags(c: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
