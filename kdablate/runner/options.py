"""How a study runs (``RunOptions``: not part of any cell's config or hash), what a cell's run
ends as (``CellOutcome``), and the provenance every run records: where and with what it ran.
"""
from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

import torch

from kdablate import hardware
from kdablate.trainer import Runtime


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to run a study (not part of any cell's config or hash)."""

    cache_dir: Path = Path(".cache/kdablate")
    threads: int = 0  # torch threads per worker; 0: the cores left to each (1 per Ray task)
    workers: int = 1  # local processes; 0: auto (``auto_workers``), the CLI's default
    checkpoint_every: int = 1
    executor: str = "local"
    address: str | None = None
    uri: str | None = None
    progress: bool = True
    device: str = "auto"
    amp: str = "none"
    checkpoint_every_s: float = 0.0  # > 0: checkpoint by time instead (the CLI's default, 60 s)
    plugins: tuple[str, ...] = ()  # the study's plugin modules, imported in every worker too
    plugin_dir: str = ""  # the study file's folder, where plugin modules may lie
    gpus_per_cell: float = 0.25  # the fraction of a GPU a Ray task of one cell requests
    roles: tuple[tuple[str, str], ...] = ()  # arm -> 'baseline' / 'reference' (the rest: 'arm'), a run tag
    stack: str = "auto"  # train an arm's seeds as one stacked model: 'auto' (where faster), 'on', 'off'
    stack_max: int = 16  # at most this many seeds in one stack
    allow_mixed_code: bool = False  # add cells to a study whose finished cells other code made
    # teacher key -> why it cannot be used (it diverged or failed to train), found by
    # ensure_teachers before the cells fan out, so no worker trains it again.
    teacher_failures: tuple[tuple[str, str], ...] = ()

    def runtime(self) -> Runtime:
        """'auto' picks CUDA when torch sees a GPU, else the CPU."""
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        return Runtime(device, self.amp)


@dataclasses.dataclass(frozen=True)
class CellOutcome:
    arm: str
    seed: int
    status: str
    message: str


def provenance(threads: int, runtime: Runtime = Runtime()) -> dict[str, str]:
    """Tags that say where and how a run was made: bit-identical numbers need all of them equal."""
    device = runtime.device
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "cpu_model": hardware.cpu_model(),
        "cpu_capability": hardware.cpu_capability(),
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "python_version": platform.python_version(),
        "device": device,
        "amp": runtime.amp,
        "threads": str(threads),
        "deterministic": str(torch.are_deterministic_algorithms_enabled()).lower(),
        "host": platform.node(),
    }