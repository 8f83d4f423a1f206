"""The benchmark's shared parts: interleaved timing, result rows, synthetic data, the KD arm, the table.

Every comparison runs its variants side by side in one process: a warm-up call
each (not timed), then ``rounds`` rounds in which every variant runs once, in
turn, so that drift (another process, thermal state) hits them alike. A ratio
is the median over rounds of (variant time / reference time) from the same
round; a time is the median over rounds.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable

import torch

from kdablate.config import KnowledgeConfig
from kdablate.data import DataBundle
from kdablate.data.bundle import batch_layout

# The benchmark's KD arm (Hinton KD at T = 4, alpha = 0.9), as in ``studies/components.yaml``.
KD = KnowledgeConfig(mass="teacher", structure="teacher", temperature=4.0, alpha=0.9)


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big the benchmark is: the full run (``make bench``) or a seconds-long smoke run."""

    rounds: int = 5  # interleaved rounds per comparison
    batch: int = 128
    mlp_samples: int = 3584  # 28 batches: one epoch of the default data's 3600-sample train split
    image_size: int = 32
    image_samples: int = 256  # ResNet-20 samples per timed repetition (2 batches)
    image_rounds: int = 3
    il_rounds: int = 2  # ResNet-20 explanation rounds (a saliency step is ~2 s on one core)
    study_cells: int = 8
    study_epochs: int = 40  # the default study's cell length


FULL = Scale()
QUICK = Scale(rounds=2, batch=16, mlp_samples=64, image_size=16, image_samples=16, image_rounds=2, il_rounds=1,
              study_cells=2, study_epochs=1)


@dataclasses.dataclass
class Row:
    """One line of the table; ``value`` is a ratio, a rate or a size, ``unit`` says which."""

    section: str
    name: str
    value: float
    unit: str
    target: str = ""
    ok: bool | None = None  # None: reported only
    note: str = ""

    @property
    def status(self) -> str:
        return "" if self.ok is None else ("PASS" if self.ok else "MISS")


def interleave(variants: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """variant -> seconds of each timed round; all variants run once per round, in turn."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of time(name) / time(reference) in the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[reference]))


def median(values: list[float]) -> float:
    return statistics.median(values)


def synthetic(num_classes: int, shape: tuple[int, ...], n: int, uint8: bool = False, augment: str = "none",
              seed: int = 0) -> DataBundle:
    """Random inputs and labels shaped like a real dataset; images are channels_last.

    uint8: images as stored by the image datasets (scaled and normalised by ``prepare``).
    """
    g = torch.Generator().manual_seed(seed)
    if uint8:
        x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
        stats = {"mean": (0.5,) * shape[0], "std": (0.25,) * shape[0]}
    else:
        x, stats = torch.randn(n, *shape, generator=g), {}
    x = batch_layout(x)
    y = torch.randint(0, num_classes, (n,), generator=g)
    k = min(n, 64)
    return DataBundle(x, y, x[:k], y[:k], x[:k], y[:k], num_classes, augment=augment, **stats)


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table, grouped by section."""
    lines = ["| section | measurement | value | target | status | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.section} | {r.name} | {fmt(r.value, r.unit)} | {r.target} | {r.status} | {r.note} |")
    return "\n".join(lines)


def fmt(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return str(value)
    if unit == "x":
        return f"×{value:.2f}"
    if unit in ("MiB", "samples/s", "images/s", "GFLOP/s", "ms", "s"):
        return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"
    return f"{value:.3g} {unit}".strip()
