"""The one trainer every cell runs through: SGD on in-memory tensors.

Batches are slices of a seeded permutation, so a step costs no Python beyond the
model itself, and a teacher is a lookup into precomputed logits (measured ×1.02
of a CE step, against ×1.3–3.2 for an online teacher). Determinism: the model
init, the data order and the components' randomness each come from their own
seeded stream, so arms that share a seed also share init and data order, which
makes per-seed differences between arms paired comparisons.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable

import torch
from torch import nn

from kdablate.components import SoftTarget, TargetContext
from kdablate.config import ModelSpec, OptimConfig
from kdablate.data import DataBundle
from kdablate.metrics import evaluate
from kdablate.models import build_model

EpochCallback = Callable[[int, dict[str, float]], None]
SPLITS = ("train", "val", "test")


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf; the cell is marked FAILED."""


@dataclasses.dataclass(frozen=True)
class FitResult:
    """The reported model and its metrics ('report/<split>_<metric>', 'report/epoch')."""

    model: nn.Module
    metrics: dict[str, float]


def seeded_generator(seed: int, stream: int) -> torch.Generator:
    """An RNG for one purpose (``stream``) of one seed, independent of the others."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def make_optimizer(model: nn.Module, cfg: OptimConfig, steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )
    if cfg.schedule == "cosine":
        lam = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    else:
        lam = lambda s: 1.0  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lam)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(N, *shape) -> (N, K) logits in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    model.train(was_training)
    return out


def evaluate_model(
    model: nn.Module, data: DataBundle, teacher: dict[str, torch.Tensor] | None, splits: tuple[str, ...] = ("val", "test")
) -> dict[str, float]:
    out: dict[str, float] = {}
    for split in splits:
        x, y = data.split(split)
        logits = predict(model, x)
        if not torch.isfinite(logits).all():
            raise NonFiniteLoss(f"non-finite outputs on the {split} split")
        out.update(evaluate(logits, y, split, None if teacher is None else teacher[split]))
    return out


def train_epoch(
    model: nn.Module, data: DataBundle, objective: SoftTarget, opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler, batch_size: int, gens: tuple[torch.Generator, torch.Generator],
    teacher_train: torch.Tensor | None,
) -> dict[str, float]:
    """One pass over the train split; returns the mean of each loss part ('train/<part>')."""
    model.train()
    order_gen, component_gen = gens
    perm = torch.randperm(len(data.y_train), generator=order_gen)
    # Drop the ragged last batch: BatchNorm cannot train on a batch of 1.
    n = len(perm) - len(perm) % batch_size
    sums: dict[str, torch.Tensor] = {}
    for i in range(0, n, batch_size):
        idx = perm[i : i + batch_size]
        x, y = data.x_train[idx], data.y_train[idx]
        logits = model(x)
        ctx = TargetContext(
            y, data.num_classes, objective.temperature, logits.detach(),
            None if teacher_train is None else teacher_train[idx], component_gen,
        )
        parts = objective(logits, ctx)
        if not torch.isfinite(parts["loss"]):
            raise NonFiniteLoss(f"non-finite loss {parts['loss'].item()} at step {sched.last_epoch}")
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        opt.step()
        sched.step()
        parts["acc"] = (logits.detach().argmax(1) == y).float().mean()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.detach()
    steps = max(n // batch_size, 1)
    return {f"train/{k}": (v / steps).item() for k, v in sums.items()}


def fit(
    model_spec: ModelSpec, data: DataBundle, optim: OptimConfig, objective: SoftTarget, seed: int,
    teacher: dict[str, torch.Tensor] | None = None, report: str = "best_val",
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train a fresh ``model_spec`` on ``data``; report the last or the best-on-val epoch.

    teacher: split -> (N, K) precomputed teacher logits, or None.
    Selection only ever looks at val accuracy; test is logged, never chosen on.
    """
    torch.manual_seed(seed)
    model = build_model(model_spec.name, model_spec.params, data.input_shape, data.num_classes)
    steps = optim.epochs * (len(data.y_train) // optim.batch_size)
    opt, sched = make_optimizer(model, optim, max(steps, 1))
    gens = (seeded_generator(seed, 0), seeded_generator(seed, 1))
    best, best_epoch, best_val = None, 0, -1.0
    for epoch in range(1, optim.epochs + 1):
        metrics = train_epoch(model, data, objective, opt, sched, optim.batch_size, gens,
                              None if teacher is None else teacher["train"])
        metrics.update(evaluate_model(model, data, teacher))
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if report == "best_val" and metrics["val/acc"] > best_val:
            best, best_epoch, best_val = copy.deepcopy(model.state_dict()), epoch, metrics["val/acc"]
    if report == "best_val" and best is not None:
        model.load_state_dict(best)
    else:
        best_epoch = optim.epochs
    final = evaluate_model(model, data, teacher)
    reported = {"report/" + k.replace("/", "_"): v for k, v in final.items()}
    reported["report/epoch"] = float(best_epoch)
    return FitResult(model, reported)
