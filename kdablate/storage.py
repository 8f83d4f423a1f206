"""Crash-safe files: atomic writes, advisory locks and per-cell checkpoints.

Every shared file (teacher checkpoints, logit caches, cell checkpoints) is
written to a temp file in the same folder and renamed into place, so a reader
or a ``kill -9`` never sees half a file; a per-key ``flock`` keeps concurrent
workers from doing the same work twice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held for the ``with`` block (POSIX flock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where a cell saves its training state every ``every`` epochs (0: never).

    meta: caller data saved alongside (the MLflow run id, to resume into it).
    """

    path: Path
    every: int = 1
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        # Our own file: it holds optimiser state and the components' Python state.
        return torch.load(self.path, weights_only=False)

    def save(self, state: dict[str, Any]) -> None:
        atomic_save({**state, "meta": self.meta}, self.path)

    def due(self, epoch: int, last: int) -> bool:
        return self.every > 0 and epoch % self.every == 0 and epoch < last

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
