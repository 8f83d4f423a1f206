"""A unit of work, trained: one cell, or the seeds of one cell config as one stack
(``kdablate.stacked``); a stack that refuses or fails retrains its seeds one by one.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch

from kdablate import stacked, tracking
from kdablate.config import CellConfig
from kdablate.data import DataBundle, load_dataset, on_device
from kdablate.hashing import stable_hash
from kdablate.runner.lifecycle import (cell_checkpoint, checkpoint_path, end, failed, finish, finished, open_run,
    record_result)
from kdablate.runner.options import CellOutcome, RunOptions
from kdablate.runner.teachers import load_teacher
from kdablate.storage import Checkpoint
from kdablate.teacher import Teacher
from kdablate.trainer import FitResult, Runtime, fit


def train_cell(client: tracking.MlflowClient, run_id: str, cell: CellConfig, opts: RunOptions,
               on_epoch: Callable[[int, dict[str, float]], None],
               before_save: Callable[[], None] | None = None) -> dict[str, float]:
    """Train one cell, handing each epoch's metrics to ``on_epoch``; returns the reported metrics.
    ``before_save`` runs before each checkpoint is written."""
    runtime = opts.runtime()
    data = cell_data(cell, runtime, opts.cache_dir)
    tracking.log_dataset(client, run_id, cell.data.name, data.fingerprint, cell.data.model_dump(mode="json"))
    teacher = load_teacher(cell, data, opts, runtime)
    # The teacher, resolved once into what the trainer reads: cached logits, cached views or online.
    signal = None if teacher is None else teacher.signal(cell, data, runtime)
    ckpt = cell_checkpoint(cell, opts, run_id, before_save)
    result = fit(cell.student, data, cell.optim, cell.knowledge, cell.seed, teacher=signal, report=cell.report,
                 on_epoch=on_epoch, checkpoint=ckpt, runtime=runtime)
    return record_result(client, run_id, cell, result, teacher, data)


def cell_data(cell: CellConfig, runtime: Runtime, cache_dir: Path) -> DataBundle:
    """The cell's data; on a GPU its images live there (``on_device``), or, too large for it, in
    pinned host memory for asynchronous copies."""
    data = load_dataset(cell.data.name, cell.data.params, cache_dir)
    if runtime.device.startswith("cuda"):
        moved = on_device(data, runtime.device)
        data = moved if moved is not data else dataclasses.replace(
            data, x_train=data.x_train.pin_memory(), y_train=data.y_train.pin_memory())
    return data


def run_cell(cell: CellConfig, exp_id: str, parent: str, tags: dict[str, str], opts: RunOptions) -> CellOutcome:
    """One child run, FINISHED or FAILED (SKIPPED when another process owns the cell); a
    KeyboardInterrupt marks it KILLED and propagates."""
    client = tracking.client(opts.uri)
    run_id, resumed, why = open_run(client, exp_id, parent, cell, opts, tags)
    if run_id is None:
        return CellOutcome(cell.arm, cell.seed, "SKIPPED", why)
    return train_claimed(client, cell, run_id, resumed, opts)


def train_claimed(client: tracking.MlflowClient, cell: CellConfig, run_id: str, resumed: int,
                  opts: RunOptions) -> CellOutcome:
    """Train a cell this process has claimed (``open_run``), resuming after epoch ``resumed``."""
    carried, logged = tracking.resume_point(client, run_id, resumed)
    t0 = time.time()
    bar = cell_bar(cell, opts)
    buffer = tracking.MetricBuffer(client, run_id)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if epoch > logged:  # an epoch retrained after a resume is logged once
            buffer.add({**metrics, "time/elapsed_s": carried + time.time() - t0}, epoch)
        if bar is not None:
            bar.update(epoch - bar.n)
            bar.set_postfix({"val/acc": f"{metrics['val/acc']:.3f}"})

    try:
        final = train_cell(client, run_id, cell, opts, on_epoch, buffer.flush)
        final["time/wall_s"] = carried + time.time() - t0
        buffer.flush()
        finish(client, run_id, final)
        checkpoint_path(cell, opts).unlink(missing_ok=True)  # only once every metric is written
    except KeyboardInterrupt:
        end(client, run_id, buffer, "KILLED", "interrupted")
        raise
    except Exception as e:  # noqa: BLE001 - one failing cell must not stop the study
        return failed(client, run_id, cell, e, buffer)
    finally:
        if bar is not None:
            bar.close()
    return finished(cell, final, resumed)


# Per device type, the models whose seeds ``--stack auto`` stacks: where the 'stacked seeds' rows
# (``make bench`` on a CPU, ``make gpu-check`` on CUDA) measured it faster. CPU (2-core EPYC):
# the MLP's epoch of 10 seeds x2.2 faster stacked, the 1-D CNN's x1.1 (too little to be worth
# a default), a CIFAR ResNet's x0.8 (grouped convolutions are slow there). CUDA (H200): MLP x4.2, 1-D CNN x3.7,
# ResNet-8 x1.6 (10 seeds); deeper ResNets are unmeasured, so left out. ``--stack on`` stacks any model.
STACK_AUTO = {"cpu": ("mlp",), "cuda": ("mlp", "cnn1d", "resnet8")}


def stack_refusal(cell: CellConfig, opts: RunOptions) -> str | None:
    """None when this cell's seeds train stacked; else why not ('' when ``--stack`` does not ask)."""
    runtime = opts.runtime()
    auto = STACK_AUTO.get(torch.device(runtime.device).type, ())
    if not (cell.student.name in auto if opts.stack == "auto" else opts.stack == "on"):
        return ""
    return stacked.refusal(cell.student, cell.knowledge, (), runtime) or None


def stack_notes(cells: list[CellConfig], opts: RunOptions) -> list[str]:
    """One line per arm whose seeds ``--stack`` asked to stack but that trains them one by one."""
    notes = {c.arm: f"note: {c.arm}: seeds train one by one, not stacked: {why}"
             for c in cells if (why := stack_refusal(c, opts))}
    return list(notes.values())


def work_units(cells: list[CellConfig], opts: RunOptions) -> list[list[CellConfig]]:
    """The cells as units of work, in order: the seeds of one cell config together (at most
    ``stack_max``) where they stack, else one cell each (claimed only when it trains)."""
    groups: dict[str, list[CellConfig]] = {}
    for cell in cells:
        together = stack_refusal(cell, opts) is None
        key = stable_hash({**cell.model_dump(mode="json"), "seed": None}) if together else cell.config_hash()
        groups.setdefault(key, []).append(cell)
    return [g[i : i + opts.stack_max] for g in groups.values() for i in range(0, len(g), opts.stack_max)]


def run_unit(cells: list[CellConfig], exp_id: str, parent: str, tags: dict[str, str],
             opts: RunOptions) -> list[CellOutcome]:
    """A unit of work: one cell, or the seeds of one cell trained as one stack (``kdablate.stacked``).
    A stack that cannot train (its objective reads the model, its seeds' checkpoints disagree, or
    it fails) trains its seeds one by one, with a message, so every seed keeps its own outcome."""
    if len(cells) == 1:
        return [run_cell(cells[0], exp_id, parent, tags, opts)]
    client = tracking.client(opts.uri)
    outcomes, claimed = [], []
    for cell in cells:
        run_id, resumed, why = open_run(client, exp_id, parent, cell, opts, tags)
        if run_id is None:
            outcomes.append(CellOutcome(cell.arm, cell.seed, "SKIPPED", why))
        else:
            claimed.append((cell, run_id, resumed))
    try:
        return outcomes + train_stack(client, claimed, opts)
    except KeyboardInterrupt:
        for _, run_id, _ in claimed:  # not the seeds a stack already finished
            if client.get_run(run_id).info.status == "RUNNING":
                tracking.terminate(client, run_id, "KILLED", "interrupted")
        raise
    except Exception as e:  # noqa: BLE001 - the seeds then train alone, each with its own outcome
        if claimed:
            print(f"note: {claimed[0][0].arm}: {len(claimed)} seed(s) train one by one, not stacked: "
                  f"{type(e).__name__}: {e}", flush=True)
    for cell, run_id, _ in claimed:
        saved = Checkpoint(checkpoint_path(cell, opts), key=cell.config_hash()).load()
        outcomes.append(train_claimed(client, cell, run_id, saved["epoch"] if saved else 0, opts))
    return outcomes


class StackRefused(RuntimeError):
    """These seeds do not stack (``kdablate.stacked.refusal`` says why)."""


def train_stack(client: tracking.MlflowClient, claimed: list[tuple[CellConfig, str, int]],
                opts: RunOptions) -> list[CellOutcome]:
    """Train claimed seeds of one cell config as one stack; each seed logs to its own run."""
    if len(claimed) < 2:
        raise StackRefused("fewer than two seeds to train")
    cells, runs = [c for c, _, _ in claimed], [r for _, r, _ in claimed]
    runtime = opts.runtime()
    data = cell_data(cells[0], runtime, opts.cache_dir)
    teachers = [load_teacher(cell, data, opts, runtime) for cell in cells]
    signals = [None if t is None else t.signal(c, data, runtime) for t, c in zip(teachers, cells)]
    why = stacked.refusal(cells[0].student, cells[0].knowledge, signals, runtime)
    if why:
        raise StackRefused(why)
    points = [tracking.resume_point(client, r, e) for _, r, e in claimed]
    t0, size = time.time(), len(cells)
    buffers = [tracking.MetricBuffer(client, r) for r in runs]

    def on_epoch(s: int, epoch: int, metrics: dict[str, float]) -> None:
        if epoch > points[s][1]:  # each seed's time is its share of the stack's
            buffers[s].add({**metrics, "time/elapsed_s": points[s][0] + (time.time() - t0) / size}, epoch)

    ckpts = [cell_checkpoint(c, opts, r, b.flush) for c, r, b in zip(cells, runs, buffers)]
    for cell, run_id in zip(cells, runs):
        tracking.log_dataset(client, run_id, cell.data.name, data.fingerprint, cell.data.model_dump(mode="json"))
    try:
        results = stacked.fit_stacked(cells[0].student, data, cells[0].optim, cells[0].knowledge,
                                      [c.seed for c in cells], signals, cells[0].report, on_epoch, ckpts, runtime)
    finally:  # the curves so far, also when the stack fails and its seeds go on alone
        for b in buffers:
            b.flush()
    wall = (time.time() - t0) / size
    return [finish_seed(client, claimed[s], results[s], teachers[s], data, points[s][0] + wall, size, opts)
            for s in range(size)]


def finish_seed(client: tracking.MlflowClient, claim: tuple[CellConfig, str, int], result: FitResult,
                teacher: Teacher | None, data: DataBundle, wall_s: float, size: int, opts: RunOptions) -> CellOutcome:
    """Log one trained seed of a stack to its run. A failure here fails this seed alone: the
    stack's training is done, and the seeds already finished must not train again."""
    cell, run_id, resumed = claim
    try:
        tracking.set_tags(client, run_id, {"kdablate.stacked": str(size)})
        final = {**record_result(client, run_id, cell, result, teacher, data), "time/wall_s": wall_s}
        finish(client, run_id, final)
    except Exception as e:  # noqa: BLE001 - as train_claimed: this cell FAILED, the study goes on
        return failed(client, run_id, cell, e)
    checkpoint_path(cell, opts).unlink(missing_ok=True)
    return finished(cell, final, resumed, f", 1/{size} of a stack")


def cell_bar(cell: CellConfig, opts: RunOptions) -> Any:
    """A per-cell epoch bar, only when cells run in this process on a terminal."""
    if not opts.progress or opts.workers > 1 or opts.executor != "local":
        return None
    from tqdm import tqdm

    return tqdm(total=cell.optim.epochs, desc=f"  {cell.arm} s{cell.seed}", unit="ep", leave=False, disable=None)