"""Trainer rows: the kdablate trainer against a hand-written loop, KD against CE, the data pipeline.

For each setting (the default MNIST-1D-shaped data with the MLP student, and
32x32x3 images with ResNet-20), one interleaved group times a whole pass over
the same samples with:

* ``hand``: the minimal loop a person would write: a fresh permutation, ``x[idx]``,
  ``F.cross_entropy``, ``zero_grad``, ``backward``, ``torch.optim.SGD`` (the same
  hyper-parameters, torch's defaults otherwise) and the same cosine scheduler step;
  no metrics;
* ``ce``, ``kd cached``, ``kd online``: ``kdablate.trainer.train_epoch`` as a cell
  runs it (CE; KD from cached teacher logits; KD with the teacher run on each batch);
* ``pipeline``: ``DataBundle.prepare`` alone on the same batches of uint8 images
  with normalisation and crop + flip (MNIST-1D: float signals, no augmentation).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdablate.bench.core import KD, Row, Scale, interleave, median, ratio, synthetic
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import DataBundle
from kdablate.models import build_model
from kdablate.models.factory import place_model
from kdablate.trainer import CPU, NO_TEACHER, Runtime, TeacherSignal, make_member, seeded_generator, train_epoch


@dataclasses.dataclass(frozen=True)
class Setting:
    """A model on data of one shape; ``teacher`` runs online in the 'kd online' row."""

    label: str
    student: str
    teacher: str
    shape: tuple[int, ...]
    num_classes: int = 10

    @property
    def images(self) -> bool:
        return len(self.shape) == 3


DEFAULT = Setting("default data (MNIST-1D, MLP)", "mlp", "cnn1d", (1, 40))
RESNET = Setting("32x32x3, ResNet-20", "resnet20", "resnet56", (3, 32, 32))


def samples(setting: Setting, scale: Scale) -> int:
    return scale.image_samples if setting.images else scale.mlp_samples


def shape_of(setting: Setting, scale: Scale) -> tuple[int, ...]:
    return (3, scale.image_size, scale.image_size) if setting.images else setting.shape


def hand_loop(setting: Setting, data: DataBundle, optim: OptimConfig, steps: int) -> Callable[[], None]:
    """One epoch of the minimal hand-written loop (see the module docstring)."""
    torch.manual_seed(0)
    model = place_model(build_model(setting.student, {}, data.input_shape, data.num_classes), data.input_shape)
    opt = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                          weight_decay=optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    x, y, b = data.x_train, data.y_train, optim.batch_size

    def epoch() -> None:
        perm = torch.randperm(len(y))
        for i in range(0, len(y) - len(y) % b, b):
            idx = perm[i : i + b]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    return epoch


def trainer_epoch(setting: Setting, data: DataBundle, optim: OptimConfig, knowledge: KnowledgeConfig,
                  teacher: TeacherSignal = NO_TEACHER, runtime: Runtime = CPU) -> Callable[[], None]:
    """One epoch of ``train_epoch`` as a cell runs it (always its first epoch, from step 0)."""
    steps = len(data.y_train) // optim.batch_size
    member = make_member(ModelSpec(name=setting.student), data, optim, knowledge, 0, steps, runtime)
    gens = (seeded_generator(0, 0), seeded_generator(0, 1), seeded_generator(0, 2))
    return lambda: train_epoch([member], data, optim.batch_size, gens, 1, 0, teacher, runtime)


def frozen_teacher(setting: Setting, data: DataBundle) -> nn.Module:
    """An untrained ``setting.teacher`` in eval mode without gradients, as a cell's online teacher."""
    torch.manual_seed(1)
    model = build_model(setting.teacher, {}, data.input_shape, data.num_classes)
    return place_model(model, data.input_shape).eval().requires_grad_(False)


def pipeline_epoch(setting: Setting, scale: Scale, batch: int) -> Callable[[], None]:
    """``prepare`` over one epoch's batches: uint8 images with normalisation and crop + flip."""
    n = samples(setting, scale)
    raw = synthetic(setting.num_classes, shape_of(setting, scale), n, uint8=setting.images,
                    augment="crop_flip" if setting.images else "none")
    g = torch.Generator().manual_seed(0)

    def epoch() -> None:
        perm = torch.randperm(n)
        for i in range(0, n - n % batch, batch):
            raw.prepare(raw.x_train.index_select(0, perm[i : i + batch]), train=True, generator=g)

    return epoch


def trainer_rows(setting: Setting, scale: Scale) -> tuple[list[Row], dict[str, float]]:
    """The setting's rows, and its CE step in seconds (for the GFLOP/s row)."""
    n, b = samples(setting, scale), scale.batch
    data = synthetic(setting.num_classes, shape_of(setting, scale), n)
    optim = OptimConfig(epochs=100, batch_size=b)
    cached = {"train": torch.randn(n, setting.num_classes, generator=torch.Generator().manual_seed(2))}
    online = TeacherSignal(cached, frozen_teacher(setting, data), online=True)
    variants = {
        "hand": hand_loop(setting, data, optim, 100 * (n // b)),
        "ce": trainer_epoch(setting, data, optim, KnowledgeConfig()),
        "kd cached": trainer_epoch(setting, data, optim, KD, TeacherSignal(cached)),
        "kd online": trainer_epoch(setting, data, optim, KD, online),
        "pipeline": pipeline_epoch(setting, scale, b),
    }
    times = interleave(variants, scale.image_rounds if setting.images else scale.rounds)
    step_s = median(times["ce"]) / (n // b)
    s = setting.label
    rows = [
        Row(s, "kdablate trainer, throughput vs a hand-written loop", ratio(times, "hand", "ce"), "x", "≥ 0.95",
            ratio(times, "hand", "ce") >= 0.95, f"CE step {1000 * step_s:.3g} ms, hand {1000 * median(times['hand']) / (n // b):.3g} ms"),
        Row(s, "KD step, cached teacher logits, vs CE step", ratio(times, "kd cached", "ce"), "x", "≤ 1.05",
            ratio(times, "kd cached", "ce") <= 1.05),
        Row(s, f"KD step, online teacher ({setting.teacher}), vs CE step", ratio(times, "kd online", "ce"), "x",
            "reported"),
        Row(s, "data pipeline throughput / model step throughput", 1 / ratio(times, "pipeline", "ce"), "x",
            "> 1 (not the bottleneck)", 1 / ratio(times, "pipeline", "ce") > 1,
            f"{n / median(times['pipeline']):,.0f} samples/s" + (" (uint8, normalise, crop+flip)" if setting.images
                                                                  else " (no augmentation on 1-D signals)")),
    ]
    return rows, {"ce_step_s": step_s}
