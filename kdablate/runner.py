"""Run a study: every pending cell through the shared trainer, logged to MLflow.

One parent run per invocation, one child run per cell x seed. Cells whose
config hash already has a FINISHED run are skipped, so a rerun resumes. A cell
that raises or diverges is marked FAILED with the reason as a tag; the study
goes on, and the exit code says that cells failed.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from kdablate import tracking
from kdablate.config import CellConfig, flatten
from kdablate.data import load_dataset
from kdablate.objectives import build_method
from kdablate.study import Study
from kdablate.teacher import get_teacher, teacher_model
from kdablate.trainer import fit


def provenance(threads: int) -> dict[str, str]:
    """Tags that say where and how a run was made."""
    return {
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": "cpu",
        "threads": str(threads),
        "deterministic": str(torch.are_deterministic_algorithms_enabled()).lower(),
        "host": platform.node(),
    }


def train_cell(client: tracking.MlflowClient, run_id: str, cell: CellConfig, cache_dir: Path) -> dict[str, float]:
    """Train one cell, logging per-epoch metrics into ``run_id``; returns the reported metrics."""
    data = load_dataset(cell.data.name, cell.data.params)
    teacher = get_teacher(cell, data, cache_dir) if cell.teacher is not None else None
    online = None
    if "teacher_model" in build_method(cell.knowledge).needs:
        online = teacher_model(cell, data, teacher)
    result = fit(
        cell.student, data, cell.optim, cell.knowledge, cell.seed,
        teacher=None if teacher is None else teacher.logits, report=cell.report,
        on_epoch=lambda epoch, m: tracking.log_metrics(client, run_id, m, epoch), teacher_model=online,
    )
    for name, matrix in result.artifacts.items():
        client.log_text(run_id, json.dumps(matrix.tolist()), f"similarity/{name}.json")
    final = dict(result.metrics)
    if teacher is not None:
        final.update({"teacher/" + key.removeprefix("report/"): v for key, v in teacher.metrics.items()})
        tracking.set_tags(client, run_id, {"teacher_key": teacher.key})
    return final


def run_cell(
    client: tracking.MlflowClient, exp_id: str, parent: str, study: Study, cell: CellConfig,
    cache_dir: Path, tags: dict[str, str],
) -> str:
    """One child run; returns its final status (FINISHED / FAILED). KeyboardInterrupt marks it KILLED."""
    cell_tags = {**tags, "kind": "cell", "arm": cell.arm, "seed": str(cell.seed), "config_hash": cell.config_hash()}
    run_id = tracking.start_run(client, exp_id, f"{cell.arm}/s{cell.seed}", cell_tags, parent)
    t0 = time.time()
    try:
        tracking.log_params(client, run_id, flatten(cell.model_dump(mode="json")))
        client.log_text(run_id, json.dumps(cell.model_dump(mode="json"), indent=2), "config.json")
        final = train_cell(client, run_id, cell, cache_dir)
        final["time/wall_s"] = time.time() - t0
        tracking.log_metrics(client, run_id, final, cell.optim.epochs)
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except Exception as e:  # noqa: BLE001 - any failure of one cell must not stop the study
        reason = f"{type(e).__name__}: {e}"[:4000]
        tracking.set_tags(client, run_id, {"failure_reason": reason})
        client.set_terminated(run_id, "FAILED")
        print(f"  FAILED {cell.arm} seed {cell.seed}: {reason}", flush=True)
        return "FAILED"
    client.set_terminated(run_id, "FINISHED")
    print(f"  {cell.arm} seed {cell.seed}: test/acc {final['report/test_acc']:.4f} "
          f"(val {final['report/val_acc']:.4f}, {final['time/wall_s']:.1f}s)", flush=True)
    return "FINISHED"


def run_study(study: Study, cache_dir: Path, threads: int = 1, uri: str | None = None) -> int:
    """Run every pending cell; returns the number of cells that FAILED."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    client = tracking.client(uri)
    exp_id = tracking.experiment_id(client, study.name)
    done = tracking.finished_hashes(client, exp_id)
    pending = [c for c in study.cells if c.config_hash() not in done]
    print(f"study {study.name}: {len(study.cells)} cells, {len(study.cells) - len(pending)} already finished, "
          f"{len(pending)} to run", flush=True)
    tags = {"study": study.name, **tracking.git_state(), **provenance(threads)}
    parent = tracking.start_run(client, exp_id, f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}", {**tags, "kind": "study"})
    client.log_artifact(parent, str(study.path))
    failed = 0
    try:
        for i, cell in enumerate(pending, 1):
            print(f"[{i}/{len(pending)}] {cell.arm} seed {cell.seed}", flush=True)
            failed += run_cell(client, exp_id, parent, study, cell, cache_dir, tags) == "FAILED"
    except KeyboardInterrupt:
        client.set_terminated(parent, "KILLED")
        raise
    tracking.log_metrics(client, parent, {"study/cells": len(study.cells), "study/failed": failed}, 0)
    client.set_terminated(parent, "FAILED" if failed else "FINISHED")
    return failed
