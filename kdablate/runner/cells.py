"""A unit of work, trained: 1 to S cells of one cell config that differ only in seed, claimed and
trained on one path (``train_unit`` -> ``trainer.fit_seeds``): the seeds stacked
(``kdablate.stacked.Stacked``) where they stack, else looped. A stack that refuses or fails
trains its seeds again looped, one by one, each from its own checkpoint.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

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
from kdablate.trainer import FitResult, Looped, Runtime, fit_seeds

Claim = tuple[CellConfig, str, int]  # a cell this process owns, its run, the epoch it resumes after


def cell_data(cell: CellConfig, runtime: Runtime, cache_dir: Path) -> DataBundle:
    """The cell's data; on a GPU its images live there (``on_device``), or, too large for it, in
    pinned host memory for asynchronous copies."""
    data = load_dataset(cell.data.name, cell.data.params, cache_dir)
    if runtime.device.startswith("cuda"):
        moved = on_device(data, runtime.device)
        data = moved if moved is not data else dataclasses.replace(
            data, x_train=data.x_train.pin_memory(), y_train=data.y_train.pin_memory())
    return data


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
    """Claim the unit's cells (SKIPPED: finished, or another process owns one) and train them:
    stacked when there are several, looped otherwise. A stack that cannot train (it refuses, its
    seeds' checkpoints disagree, or it fails) trains its seeds looped, one by one, with a message,
    so every seed keeps its own outcome."""
    client = tracking.client(opts.uri)
    outcomes, claimed = [], []
    for cell in cells:
        run_id, resumed, why = open_run(client, exp_id, parent, cell, opts, tags)
        if run_id is None:
            outcomes.append(CellOutcome(cell.arm, cell.seed, "SKIPPED", why))
        else:
            claimed.append((cell, run_id, resumed))
    if len(claimed) > 1:
        try:
            return outcomes + train_unit(client, claimed, opts, stack=True)
        except StackFailed as e:
            print(f"note: {claimed[0][0].arm}: {len(claimed)} seed(s) train one by one, not stacked: {e}", flush=True)
        claimed = [(cell, run_id, resumed_epoch(cell, opts)) for cell, run_id, _ in claimed]
    for claim in claimed:
        outcomes += train_unit(client, [claim], opts, stack=False)
    return outcomes


def resumed_epoch(cell: CellConfig, opts: RunOptions) -> int:
    """The epoch the cell's own checkpoint continues after (0: none)."""
    saved = Checkpoint(checkpoint_path(cell, opts), key=cell.config_hash()).load()
    return saved["epoch"] if saved else 0


class StackFailed(RuntimeError):
    """These seeds did not train as one stack (it refused, or failed): train them looped."""


def train_unit(client: tracking.MlflowClient, claimed: list[Claim], opts: RunOptions, stack: bool) -> list[CellOutcome]:
    """Train claimed seeds of one cell config in one ``fit_seeds`` call, each logging to its own
    run. Looped, an error FAILS the seeds with it as the reason; stacked, it raises StackFailed.
    A KeyboardInterrupt marks the runs KILLED (their curves written first) and propagates."""
    progress = Progress(client, claimed, opts, bar=len(claimed) == 1)
    try:
        results, teachers, data = fit_unit(claimed, opts, progress, stack)
        walls = [progress.elapsed(s) for s in range(len(claimed))]
        progress.flush()
        size = len(claimed) if stack else 1
        return [finish_seed(client, claim, result, teacher, data, wall, size, opts)
                for claim, result, teacher, wall in zip(claimed, results, teachers, walls)]
    except KeyboardInterrupt:
        progress.end("KILLED", "interrupted")
        raise
    except Exception as e:  # noqa: BLE001 - one failing cell must not stop the study
        progress.flush()  # the curves so far, also when the stack's seeds go on alone
        if stack:
            raise StackFailed(f"{type(e).__name__}: {e}") from e
        return progress.fail(e)
    finally:
        progress.close()


def fit_unit(claimed: list[Claim], opts: RunOptions, progress: Progress,
             stack: bool) -> tuple[list[FitResult], list[Teacher | None], DataBundle]:
    """The seeds' data and teachers, loaded once, then ``fit_seeds``: per seed its result and teacher."""
    cells = [cell for cell, _, _ in claimed]
    runtime = opts.runtime()
    data = cell_data(cells[0], runtime, opts.cache_dir)
    teachers = [load_teacher(cell, data, opts, runtime) for cell in cells]
    # Each teacher, resolved once into what the trainer reads: cached logits, cached views or online.
    signals = [None if t is None else t.signal(c, data, runtime) for t, c in zip(teachers, cells)]
    why = stacked.refusal(cells[0].student, cells[0].knowledge, signals, runtime) if stack else ""
    if why:
        raise StackFailed(why)
    for cell, run_id, _ in claimed:
        tracking.log_dataset(progress.client, run_id, cell.data.name, data.fingerprint, cell.data.model_dump(mode="json"))
    ckpts = [cell_checkpoint(c, opts, r, b.flush) for (c, r, _), b in zip(claimed, progress.buffers)]
    first = cells[0]
    results = fit_seeds(first.student, data, first.optim, first.knowledge, [c.seed for c in cells], signals,
                        first.report, progress.on_epoch, ckpts, runtime, kind=stacked.Stacked if stack else Looped)
    return results, teachers, data


class Progress:
    """The runs of a unit's seeds while they train: each seed's metric buffer, where its earlier
    attempts left off (the seconds they took, the last epoch they logged: epochs retrained after a
    resume are logged once), and an epoch bar for a cell alone. A seed's time is its share of the unit's."""

    def __init__(self, client: tracking.MlflowClient, claimed: list[Claim], opts: RunOptions, bar: bool) -> None:
        self.client, self.claimed, self.t0 = client, claimed, time.time()
        self.points = [tracking.resume_point(client, run_id, epoch) for _, run_id, epoch in claimed]
        self.buffers = [tracking.MetricBuffer(client, run_id) for _, run_id, _ in claimed]
        self.bar = cell_bar(claimed[0][0], opts) if bar else None

    def elapsed(self, s: int) -> float:
        return self.points[s][0] + (time.time() - self.t0) / len(self.claimed)

    def on_epoch(self, s: int, epoch: int, metrics: dict[str, float]) -> None:
        if epoch > self.points[s][1]:
            self.buffers[s].add({**metrics, "time/elapsed_s": self.elapsed(s)}, epoch)
        if self.bar is not None:
            self.bar.update(epoch - self.bar.n)
            self.bar.set_postfix({"val/acc": f"{metrics['val/acc']:.3f}"})

    def flush(self) -> None:
        for buffer in self.buffers:
            buffer.flush()

    def end(self, status: str, why: str) -> None:
        """End the seeds' runs that have not finished, their curves written first."""
        for (_, run_id, _), buffer in zip(self.claimed, self.buffers):
            if self.client.get_run(run_id).info.status == "RUNNING":
                end(self.client, run_id, buffer, status, why)

    def fail(self, error: Exception) -> list[CellOutcome]:
        return [failed(self.client, run_id, cell, error, buffer)
                for (cell, run_id, _), buffer in zip(self.claimed, self.buffers)]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def finish_seed(client: tracking.MlflowClient, claim: Claim, result: FitResult, teacher: Teacher | None,
                data: DataBundle, wall_s: float, size: int, opts: RunOptions) -> CellOutcome:
    """Log one trained seed to its run. A failure here fails this seed alone: training is done,
    and the seeds already finished must not train again."""
    cell, run_id, resumed = claim
    try:
        if size > 1:
            tracking.set_tags(client, run_id, {"kdablate.stacked": str(size)})
        final = {**record_result(client, run_id, cell, result, teacher, data), "time/wall_s": wall_s}
        finish(client, run_id, final)
    except Exception as e:  # noqa: BLE001 - this cell FAILED, the study goes on
        return failed(client, run_id, cell, e)
    checkpoint_path(cell, opts).unlink(missing_ok=True)  # only once every metric is written
    return finished(cell, final, resumed, f", 1/{size} of a stack" if size > 1 else "")


def cell_bar(cell: CellConfig, opts: RunOptions) -> Any:
    """A per-cell epoch bar, only when cells run in this process on a terminal."""
    if not opts.progress or opts.workers > 1 or opts.executor != "local":
        return None
    from tqdm import tqdm

    return tqdm(total=cell.optim.epochs, desc=f"  {cell.arm} s{cell.seed}", unit="ep", leave=False, disable=None)