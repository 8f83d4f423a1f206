"""Teacher preparation: every teacher a study needs is trained or loaded once, before the cells
fan out to workers; a cell reads it, or fails with the reason when it is unusable.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from kdablate import hardware
from kdablate.components import Need
from kdablate.config import CellConfig
from kdablate.data import DataBundle, load_dataset
from kdablate.runner.options import RunOptions
from kdablate.teacher import Teacher, get_teacher
from kdablate.trainer import Runtime


class TeacherRejected(RuntimeError):
    """The cell reads a teacher that diverged, failed to train, or is below its quality gate."""


def load_teacher(cell: CellConfig, data: DataBundle, opts: RunOptions, runtime: Runtime) -> Teacher | None:
    """The cell's teacher, if it has one it may use. An unusable teacher fails a cell that reads it
    (TeacherRejected) and is left out of one that does not (which then logs no agreement)."""
    if cell.teacher is None:
        return None
    reads = bool(cell.knowledge.needs() & (Need.TEACHER | Need.TEACHER_MODEL))
    why = dict(opts.teacher_failures).get(cell.teacher_key())
    teacher = None if why else get_teacher(cell, data, opts.cache_dir, runtime)
    why = why or teacher.rejection(cell, data.num_classes)
    if why and reads:
        raise TeacherRejected(why)
    return None if why else teacher


def ensure_teachers(cells: list[CellConfig], opts: RunOptions) -> RunOptions:
    """Train every teacher the cells need once, before they fan out to workers. A teacher that
    diverges or fails is recorded in the returned options: the cells that read it FAIL with the
    reason, the others run without it. A teacher below a cell's gate is announced here."""
    with every_core():
        failures = train_teachers(cells, opts)
    return dataclasses.replace(opts, teacher_failures=tuple(failures.items()))


@contextlib.contextmanager
def every_core() -> Iterator[None]:
    """Torch threads on every core this process may use, then back. The teachers train before
    any cell runs, so the cores are idle: measured x1.7 for the default teacher on 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(hardware.usable_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_teachers(cells: list[CellConfig], opts: RunOptions) -> dict[str, str]:
    """``ensure_teachers``' loop: each teacher once, its rejection announced; teacher key -> why it failed."""
    failures: dict[str, str] = {}
    seen: set[str] = set()
    for cell in cells:
        key = cell.teacher_key() if cell.teacher is not None else None
        if key is None or key in seen:
            continue
        seen.add(key)
        data = load_dataset(cell.data.name, cell.data.params, opts.cache_dir)
        try:
            why = get_teacher(cell, data, opts.cache_dir, opts.runtime()).rejection(cell, data.num_classes)
        except Exception as e:  # noqa: BLE001 - a failed teacher fails its cells, not the study
            verb = "train" if all(m.source == "trained" for m in cell.teachers()) else "load"
            why = failures[key] = f"the teacher failed to {verb} ({type(e).__name__}: {str(e)[:300]})"
        if why:
            print(f"warning: {why}; the cells that read it will be FAILED", flush=True)
    return failures