"""The MLflow run lifecycle of a cell: claim (a new run, or the run its checkpoint names), its
tags and description, its reported metrics and artifacts, and its end as FINISHED, FAILED or
KILLED; the study's parent run; the progress lines.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from kdablate import tracking
from kdablate.config import CellConfig, canonical, flatten
from kdablate.data import DataBundle
from kdablate.factors import FACTOR_TABLE
from kdablate.runner.options import CellOutcome, RunOptions, provenance
from kdablate.saved import save_student
from kdablate.storage import Checkpoint
from kdablate.study import Study
from kdablate.teacher import Teacher
from kdablate.trainer import FitResult


def cell_checkpoint(cell: CellConfig, opts: RunOptions, run_id: str,
                    before_save: Callable[[], None] | None = None) -> Checkpoint:
    return Checkpoint(checkpoint_path(cell, opts), opts.checkpoint_every, {"run_id": run_id}, key=cell.config_hash(),
                      every_s=opts.checkpoint_every_s, before_save=before_save)


def record_result(client: tracking.MlflowClient, run_id: str, cell: CellConfig, result: FitResult,
                  teacher: Teacher | None, data: DataBundle) -> dict[str, float]:
    """Log a trained cell's artifacts (similarities, calibration, the student if asked); its
    reported metrics with the teacher's."""
    for name, matrix in result.artifacts.items():
        client.log_text(run_id, json.dumps(matrix.tolist()), f"similarity/{name}.json")
    for split, bins in result.calibration.items():
        client.log_text(run_id, json.dumps(bins), f"calibration/{split}.json")
    if cell.save_model:
        save_student(client, run_id, cell, result.model, data.input_shape, data.num_classes)
    final = dict(result.metrics)
    if teacher is not None:
        final.update({"teacher/" + key.removeprefix("report/"): v for key, v in teacher.metrics.items()})
        tracking.set_tags(client, run_id, teacher.tags())
    return final


def checkpoint_path(cell: CellConfig, opts: RunOptions) -> Path:
    return Path(opts.cache_dir) / "checkpoints" / f"{cell.config_hash()}.pt"


def spec_label(spec: Any) -> str:
    """A plugin as the tags and descriptions name it: its name and the parameters that differ from
    its defaults, e.g. 'constant(eps=0.1)', so two arms that differ by a parameter are told apart."""
    params = canonical(spec)["params"]
    return spec.name + (f"({','.join(f'{k}={v}' for k, v in sorted(params.items()))})" if params else "")


def factor_tags(cell: CellConfig) -> dict[str, str]:
    """Short tags of the factors an ablation crosses, 'n/a' where the arm does not use one (CE reads
    no mass, structure or T; DKD no mass or structure), so one search selects arms to compare."""
    k = cell.knowledge
    target = k.objective.name == "soft_target" and k.alpha > 0
    uses_t = k.alpha > 0
    params = {**k.structure.params, **k.structure.params.get("base_params", {})}
    source = params.get("source", "saliency") if "explanation" in (k.structure.name, params.get("base")) else "n/a"
    levels = {"objective": spec_label(k.objective), "mass": spec_label(k.mass) if target else "n/a",
              "structure": spec_label(k.structure) if target else "n/a",
              "temperature": f"{k.temperature:g}" if uses_t else "n/a", "alpha": f"{k.alpha:g}",
              "source": source if target else "n/a",
              "feature": "+".join(spec_label(spec) for spec in k.feature) or "none"}
    return {f.tag: levels[f.name] for f in FACTOR_TABLE}


def describe(cell: CellConfig) -> str:
    """The arm's definition in a line, for the run's description in the MLflow UI: the factor tags'
    values (an arm at alpha 0 reads no mass, structure or T, and says so)."""
    tags = factor_tags(cell)
    what = ", ".join(f"{f.tag} {tags[f.tag]}" for f in FACTOR_TABLE) + ("; alpha 0: plain cross-entropy, no soft target" if cell.knowledge.alpha == 0 else "")
    return (f"Arm `{cell.arm}`, seed {cell.seed}: {what}; student {cell.student.name}, data {cell.data.name}; "
            f"config hash {cell.config_hash()} (full config: config.json).")


def open_run(client: tracking.MlflowClient, exp_id: str, parent: str, cell: CellConfig, opts: RunOptions,
             tags: dict[str, str]) -> tuple[str | None, int, str]:
    """Claim the cell (see ``tracking.claim_cell``): the run its checkpoint names, reopened, else a
    new one. Returns (run_id, the epoch it resumes after (0: a new run), '') or (None, 0, why)
    when the cell is finished or another process owns it."""
    # A truncated, corrupt or foreign checkpoint is deleted here, with a message: the cell restarts.
    saved, problem = (Checkpoint(checkpoint_path(cell, opts), key=cell.config_hash()).load_checked()
                      if opts.checkpoint_every or opts.checkpoint_every_s else (None, ""))

    def create() -> str:
        # The UI lists tag keys in the order the first run logged them: the factors first.
        cell_tags = {"arm": cell.arm, "role": dict(opts.roles).get(cell.arm, "arm"), **factor_tags(cell),
                     "seed": str(cell.seed), "kind": "cell", "config_hash": cell.config_hash(), **tags,
                     **tracking.owner_tags(), "mlflow.note.content": describe(cell)}
        return tracking.start_run(client, exp_id, f"{cell.arm}/seed{cell.seed}", cell_tags, parent)

    run_id, resumed, why = tracking.claim_cell(client, exp_id, opts.uri or tracking.tracking_uri(),
                                               cell.config_hash(), saved["meta"].get("run_id") if saved else None,
                                               create)
    if run_id is None:
        return None, 0, why
    if resumed:
        tracking.set_tags(client, run_id, {tracking.RESUMED: str(saved["epoch"])})
        return run_id, int(saved["epoch"]), ""
    if saved:  # its run is gone (another store) or finished: the checkpoint is not this run's
        checkpoint_path(cell, opts).unlink(missing_ok=True)
    if problem:
        tracking.set_tags(client, run_id, {"kdablate.checkpoint_discarded": problem})
    tracking.log_params(client, run_id, flatten(cell.model_dump(mode="json")))
    client.log_text(run_id, json.dumps(cell.model_dump(mode="json"), indent=2), "config.json")
    return run_id, 0, ""


def failed(client: tracking.MlflowClient, run_id: str, cell: CellConfig, error: Exception,
           buffer: tracking.MetricBuffer | None = None) -> CellOutcome:
    """Mark the cell's run FAILED with the error as its reason (its curves written first)."""
    why = f"{type(error).__name__}: {error}"
    if buffer is None:
        tracking.terminate(client, run_id, "FAILED", why)
    else:
        end(client, run_id, buffer, "FAILED", why)
    return CellOutcome(cell.arm, cell.seed, "FAILED", why)


def end(client: tracking.MlflowClient, run_id: str, buffer: tracking.MetricBuffer, status: str, why: str) -> None:
    """End a run that did not finish, its curves written up to where it stopped."""
    try:
        buffer.flush()
    finally:
        tracking.terminate(client, run_id, status, why)


def finish(client: tracking.MlflowClient, run_id: str, final: dict[str, float]) -> None:
    # Summaries at step 0: the UI draws a metric whose steps are all 0 as one bar per run,
    # not as a one-point line (its rule: a line once any run logs it at step >= 1).
    tracking.log_summary(client, run_id, final)
    tracking.terminate(client, run_id, "FINISHED")


def finished(cell: CellConfig, final: dict[str, float], resumed: int, how: str = "") -> CellOutcome:
    note = f" (resumed after epoch {resumed})" if resumed else ""
    return CellOutcome(cell.arm, cell.seed, "FINISHED", f"test/acc {final['report/test_acc']:.4f} "
                       f"(val {final['report/val_acc']:.4f}, {final['time/wall_s']:.1f}s{how}){note}")


def roles(study: Study) -> tuple[tuple[str, str], ...]:
    """arm -> 'baseline' or 'reference', from the study's analysis section."""
    a = study.config.analysis
    out = {arm: "reference" for arm in a.reference}
    if a.baseline:
        out[a.baseline] = "baseline"
    return tuple(out.items())


def start_parent(client: tracking.MlflowClient, exp_id: str, study: Study, opts: RunOptions) -> tuple[str, dict[str, str]]:
    """The invocation's parent run, with the study file, its command-line overrides and subset
    recorded; returns (its id, the tags every cell run shares)."""
    tags = {"kdablate.study": study.name,
            **tracking.env_tags({**tracking.code_state(study.plugins), **provenance(opts.threads, opts.runtime())})}
    extra = {"kind": "study", "kdablate.workers": str(opts.workers), "kdablate.stack": opts.stack,
             "kdablate.cells_selected": str(len(study.cells)), "kdablate.overrides": " ".join(study.overrides) or "none",
             "kdablate.plugins": ",".join(study.plugins) or "none"}
    parent = tracking.start_run(client, exp_id, f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                {**tags, **tracking.owner_tags(), **extra})
    client.log_artifact(parent, str(study.path))
    if study.overrides:  # the study as run: the file plus its overrides, resolved
        client.log_dict(parent, study.config.model_dump(mode="json"), "study_resolved.json")
    return parent, tags


def report_progress(outcomes, total: int, name: str, opts: RunOptions) -> int:
    """Consume cell outcomes under one study bar (cells done / total, ETA); returns the failures."""
    from tqdm import tqdm

    failed = 0
    with tqdm(total=total, desc=name, unit="cell", disable=None if opts.progress else True) as bar:
        for i, out in enumerate(outcomes, 1):
            failed += out.status == "FAILED"
            tag = "" if out.status == "FINISHED" else out.status + " "
            tqdm.write(f"[{i}/{total}] {tag}{out.arm} seed {out.seed}: {out.message}")
            bar.update(1)
    return failed