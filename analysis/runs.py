"""A study's runs as pandas frames, read from MLflow through its public client API only.

Works on any tracking URI (the local SQLite store, or a remote ``mlflow server``).
A run belongs to the study when its ``config_hash`` tag is one of the study file's
cells, so cells of an edited study that no longer exist are left out. Params come
back from MLflow as strings; they are cast back to their Python types here.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from kdablate import tracking
from kdablate.factors import factor_levels
from kdablate.study import Study

# The tags ``kdablate.runner.provenance`` puts on every run: where and how its numbers were made.
PROVENANCE = ("git_commit", "git_dirty", "code_sha256", "plugins_sha256", "cpu_model", "cpu_capability",
              "torch_version", "torch_cuda", "threads", "device", "amp", "host", "python_version")
CODE = ("code_sha256", "plugins_sha256")  # two runs share a code version when these are equal
UNKNOWN = "unknown"  # the value of a tag a run lacks (runs made before kdablate logged it)

REPORT_RULES = {
    "best_val": "the epoch with the best validation accuracy (the test split is never used to choose)",
    "last": "the last epoch (no checkpoint selection)",
}


def cast_param(s: str) -> Any:
    """'4.0' -> 4.0, '5' -> 5, 'True' -> True, 'None' -> None, '[1, 2]' -> [1, 2], else the string."""
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return s


def family(arm: str) -> str:
    """The arm's name without its temperature: 'kd[temperature=4.0]' and 'kd' -> 'kd'."""
    m = re.fullmatch(r"(.*)\[(.*)\]", arm)
    if not m:
        return arm
    rest = [kv for kv in m.group(2).split(",") if not kv.startswith("temperature=")]
    return f"{m.group(1)}[{','.join(rest)}]" if rest else m.group(1)


@dataclasses.dataclass(frozen=True)
class StudyRuns:
    """cells: one row per FINISHED cell (arm, seed, run_id, typed params, final metrics, and
    the ``PROVENANCE`` tags as 'tag:<name>' columns);
    missing: one row per cell of the study without a FINISHED run (arm, seed, status, reason)."""

    study: Study
    uri: str
    cells: pd.DataFrame
    missing: pd.DataFrame

    @property
    def order(self) -> list[str]:
        present = set(self.cells.arm) if not self.cells.empty else set()
        return [a for a in self.study.arms() if a in present]

    def report_rule(self) -> str:
        rules = sorted(set(self.cells["report"])) if "report" in self.cells else []
        return "; ".join(f"'{r}': {REPORT_RULES.get(r, r)}" for r in rules) or "unknown"


def load(study: Study) -> StudyRuns:
    """Every run of ``study`` in the current tracking store (``MLFLOW_TRACKING_URI`` or ./mlruns.db)."""
    client = tracking.client()
    exp = client.get_experiment_by_name(study.name)
    runs = tracking.search_cells(client, exp.experiment_id) if exp is not None else []
    wanted = {c.config_hash(): c for c in study.cells}
    finished, latest = {}, {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):  # the latest run of a cell wins
        h = run.data.tags.get("config_hash")
        if h in wanted:
            latest[h] = run
            if run.info.status == "FINISHED":
                finished[h] = run
    rows = [cell_row(run) for run in finished.values()]
    cells = pd.DataFrame(rows)
    if not cells.empty:
        order = {c.arm: i for i, c in enumerate(study.cells)}
        cells = cells.sort_values(["arm", "seed"], key=lambda s: s.map(order) if s.name == "arm" else s)
    missing = pd.DataFrame(
        [{"arm": c.arm, "seed": c.seed, "status": latest[h].info.status if h in latest else "NOT STARTED",
          "reason": tracking.tag(latest[h].data.tags, tracking.FAILURE) if h in latest else ""}
         for h, c in wanted.items() if h not in finished],
        columns=["arm", "seed", "status", "reason"])
    return StudyRuns(study, tracking.tracking_uri(), cells.reset_index(drop=True), missing)


def cell_row(run: Any) -> dict[str, Any]:
    params = {k: cast_param(v) for k, v in run.data.params.items()}
    return {"arm": run.data.tags["arm"], "seed": int(run.data.tags["seed"]), "run_id": run.info.run_id,
            "family": family(run.data.tags["arm"]), **factor_levels(params),
            "report": params.get("report", "unknown"), **tracking.summary(run),
            **{f"param:{k}": v for k, v in params.items()},
            **{f"tag:{k}": tracking.tag(run.data.tags, tracking.ENV + k, UNKNOWN) for k in PROVENANCE}}


def history(runs: StudyRuns, metrics: list[str]) -> pd.DataFrame:
    """Long frame (arm, seed, metric, epoch, value) of per-epoch metric histories."""
    client = tracking.client()
    rows = []
    for arm, seed, run_id in runs.cells[["arm", "seed", "run_id"]].itertuples(index=False):
        for m in metrics:
            rows += [{"arm": arm, "seed": seed, "metric": m, "epoch": h.step, "value": h.value}
                     for h in client.get_metric_history(run_id, m)]
    return pd.DataFrame(rows, columns=["arm", "seed", "metric", "epoch", "value"])


def json_artifacts(runs: StudyRuns, arm: str, folder: str) -> list[tuple[int, dict[str, Any]]]:
    """Per finished seed of ``arm``: {file stem: parsed JSON} of the run's artifact ``folder``."""
    client = tracking.client()
    out = []
    g = runs.cells[runs.cells.arm == arm]
    with tempfile.TemporaryDirectory() as tmp:
        for seed, run_id in zip(g.seed, g.run_id):
            if not any(f.path == folder for f in client.list_artifacts(run_id)):
                continue  # runs made before this artifact existed
            local = Path(client.download_artifacts(run_id, folder, tmp + f"/{run_id}"))
            out.append((seed, {p.stem: json.loads(p.read_text()) for p in sorted(local.glob("*.json"))}))
    return out


def parent_run(runs: StudyRuns) -> str | None:
    """The newest parent (kind=study) run of the study, where figures and the report are logged."""
    client = tracking.client()
    exp = client.get_experiment_by_name(runs.study.name)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], "tags.kind = 'study'", order_by=["attributes.start_time DESC"],
                               max_results=1)
    return found[0].info.run_id if found else None
