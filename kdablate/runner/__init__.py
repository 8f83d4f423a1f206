"""Run a study: every pending cell through the shared trainer, logged to MLflow.

One parent run per invocation, one child run per cell x seed. Cells whose
config hash already has a FINISHED run are skipped, so a rerun resumes; RUNNING
runs whose process died are marked KILLED first, and a cell with a checkpoint
continues inside its old run from the last saved epoch. A cell that raises or
diverges is marked FAILED with the reason as a tag; the study goes on, and the
exit code says that cells failed.

Cells run in this process, in ``workers`` local processes, or as Ray tasks on
an existing cluster (``executor='ray'``); teachers are trained once, before the
cells fan out. The rooms: ``options`` (what a run is told), ``checks`` (worker sizing and
pre-run checks), ``lifecycle`` (the MLflow runs), ``teachers`` (teacher preparation),
``cells`` (a unit of work trained) and ``executors`` (sequential, processes, Ray).
"""
from __future__ import annotations

import dataclasses

from kdablate import hardware, tracking
from kdablate.runner.cells import stack_notes, work_units
from kdablate.runner.checks import (AUTO_MIN_PASSES, auto_workers, check_code, check_device, check_places,
                                    check_precision, resolve, resolve_paths, training_passes)
from kdablate.runner.executors import init_worker, placements, ray_resources, run_processes, run_ray, run_sequential
from kdablate.runner.lifecycle import factor_tags, report_progress, roles, start_parent
from kdablate.runner.options import CellOutcome, RunOptions, provenance
from kdablate.runner.teachers import ensure_teachers
from kdablate.study import Study

__all__ = ["CellOutcome", "RunOptions", "auto_workers", "check_device", "factor_tags", "placements", "provenance",
           "ray_resources", "resolve", "roles", "run_study", "training_passes", "work_units"]


def run_study(study: Study, opts: RunOptions = RunOptions()) -> int:
    """Run every pending cell; returns the number of cells that FAILED."""
    auto = not opts.workers  # --workers auto: workers and threads are resolved once the work is known
    opts = dataclasses.replace(resolve_paths(opts), plugins=study.plugins,
                               plugin_dir=str(study.path.parent.resolve()), roles=roles(study))
    warning = hardware.amp_warning(opts.runtime().device, opts.amp)
    if warning:
        print(warning, flush=True)
    check_places(opts)
    client = tracking.client(opts.uri)
    exp_id = tracking.experiment_id(client, study.name, study.config.description)
    check_precision(client, exp_id, study, opts.runtime())
    if not opts.allow_mixed_code:
        check_code(client, exp_id, study)
    reaped = tracking.reap_stale(client, exp_id)
    done = tracking.finished_hashes(client, exp_id)
    pending = [c for c in study.cells if c.config_hash() not in done]
    print(f"study {study.name}: {len(study.cells)} cells, {len(study.cells) - len(pending)} already finished, "
          f"{len(pending)} to run" + (f"; {len(reaped)} interrupted run(s) marked KILLED" if reaped else ""), flush=True)
    units = work_units(pending, opts)
    weigh = auto and opts.executor == "local" and opts.runtime().device == "cpu"
    opts = resolve(opts, len(units), training_passes(pending) if weigh else AUTO_MIN_PASSES)
    init_worker(opts.threads)
    parent, tags = start_parent(client, exp_id, study, opts)
    failed = 0
    try:
        opts = ensure_teachers(pending, opts)
        execute = {"local": run_processes if opts.workers > 1 else run_sequential, "ray": run_ray}[opts.executor]
        for note in stack_notes(pending, opts) + unit_notes(len(pending), len(units), opts, auto):
            print(note, flush=True)
        failed = report_progress(execute(units, (exp_id, parent, tags), opts), len(pending), study.name, opts)
    except KeyboardInterrupt:
        tracking.terminate(client, parent, "KILLED", "interrupted")
        raise
    tracking.log_metrics(client, parent, {"study/cells": len(study.cells), "study/failed": failed}, 0)
    tracking.terminate(client, parent, "FAILED" if failed else "FINISHED")
    print(f"runs: {tracking.runs_link(exp_id)} (after 'kdablate ui {study.name}')", flush=True)
    return failed


def unit_notes(cells: int, units: int, opts: RunOptions, auto: bool) -> list[str]:
    """What the run will do with its units: stacks, and the workers ``--workers auto`` chose."""
    notes = []
    if units < cells:
        notes.append(f"training {cells} cells as {units} units: the seeds of an arm stacked "
                     "(--stack off trains them one by one)")
    if auto and opts.executor == "local" and units:
        notes.append(f"--workers auto: {opts.workers} worker(s) x {opts.threads} thread(s) for {units} unit(s)")
    return notes