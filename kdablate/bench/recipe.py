"""``make gpu-check``'s recipe rows: the throughput of ``studies/crd_cifar100.yaml``'s KD cell.

resnet32x4 -> resnet8x4 KD (T 4, alpha 0.9) on CIFAR-100-shaped uint8 images, batch 64, with the
images on the device (``kdablate.data.on_device``: one copy; crop, flip and normalisation run
there per batch), timed side by side in one process:

* one seed, the teacher online (the study's cell: views 0, exact on augmented batches);
* one seed, the teacher looked up on V cached augmented views (``teacher.views``), on the device;
* S seeds trained together as one stacked model, teacher views looked up.

Each row gives training images per second (S seeds count S times); the projection is one seed of
the study: 240 epochs of 49,000 images at the online row's rate, evaluation not included.
Untrained models and random images: only the speed means anything.
"""
from __future__ import annotations

from typing import Callable

import torch

from kdablate.bench.core import KD, Row, interleave, median, synthetic
from kdablate.config import ModelSpec, OptimConfig
from kdablate.data import DataBundle, on_device
from kdablate.models import build_model
from kdablate.models.factory import place_model
from kdablate.stacked import Stacked
from kdablate.trainer import Runtime, TeacherSignal, make_member, seeded_generator, train_epoch

STUDENT, TEACHER, CLASSES, BATCH = "resnet8x4", "resnet32x4", 100, 64
EPOCHS, TRAIN_IMAGES = 240, 49_000  # crd_cifar100.yaml: 240 epochs, 50,000 images less 2% for validation


def signals(data: DataBundle, runtime: Runtime, views: int, teacher_name: str) -> tuple[TeacherSignal, TeacherSignal]:
    """(the online teacher, the teacher looked up on ``views`` cached views), both on the device."""
    torch.manual_seed(1)
    teacher = place_model(build_model(teacher_name, {}, data.input_shape, CLASSES), data.input_shape, runtime.device)
    teacher = teacher.eval().requires_grad_(False)
    n = len(data.y_train)
    g = torch.Generator().manual_seed(2)
    cached = {"train": torch.randn(n, CLASSES, generator=g)}
    params = torch.stack([torch.stack([torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g),
                                       torch.randint(0, 2, (n,), generator=g)], 1) for _ in range(views)])
    looked_up = (params, runtime.to(torch.randn(views, n, CLASSES, generator=g)))
    return TeacherSignal(cached, teacher, online=True), TeacherSignal(cached, views=looked_up)


def variants(data: DataBundle, runtime: Runtime, seeds: int, views: int,
             models: tuple[str, str] = (STUDENT, TEACHER)) -> dict[str, Callable[[], None]]:
    """The three epochs, each ending when its last kernel has (a CUDA step returns before)."""
    online, cached = signals(data, runtime, views, models[1])
    optim = OptimConfig(epochs=EPOCHS, batch_size=BATCH)
    steps = len(data.y_train) // BATCH
    spec = ModelSpec(name=models[0])
    one = make_member(spec, data, optim, KD, 0, steps, runtime)
    stack = Stacked([[make_member(spec, data, optim, KD, s, steps, runtime)] for s in range(seeds)], optim, steps)
    gens = [tuple(seeded_generator(s, i) for i in range(3)) for s in range(seeds)]
    sync = torch.cuda.synchronize if runtime.device.startswith("cuda") else (lambda: None)

    def run(fn: Callable[[], object]) -> Callable[[], None]:
        return lambda: (fn(), sync()) and None

    return {
        "1 seed, online teacher": run(lambda: train_epoch([one], data, BATCH, gens[0], 1, 0, online, runtime)),
        "1 seed, teacher views": run(lambda: train_epoch([one], data, BATCH, gens[0], 1, 0, cached, runtime)),
        f"{seeds} seeds stacked, teacher views": run(
            lambda: stack.train(data, BATCH, gens, 1, 0, [cached] * seeds, runtime)),
    }


def recipe_rows(runtime: Runtime, samples: int = 8192, seeds: int = 4, views: int = 4, rounds: int = 3,
                models: tuple[str, str] = (STUDENT, TEACHER)) -> list[Row]:
    """images/s of each variant on ``runtime``'s device, and the projected wall time of one seed
    (``models``: (student, teacher), the recipe's unless a test makes them small)."""
    data = on_device(synthetic(CLASSES, (3, 32, 32), samples, uint8=True, augment="crop_flip"), runtime.device)
    times = interleave(variants(data, runtime, seeds, views, models), rounds)
    n = len(data.y_train) // BATCH * BATCH
    rows = []
    for name, t in times.items():
        rate = n * (seeds if "stacked" in name else 1) / median(t)
        rows.append(Row("crd_cifar100 recipe", f"{models[0]} <- {models[1]} KD, {name}, {runtime.device}", rate,
                        "images/s", "reported"))
    online = rows[0].value
    minutes = EPOCHS * TRAIN_IMAGES / online / 60
    rows.append(Row("crd_cifar100 recipe", "one seed of crd_cifar100.yaml (KD, online teacher), projected", minutes,
                    "min", "<= 15 on one H100-class GPU", minutes <= 15 if runtime.device.startswith("cuda") else None,
                    f"{EPOCHS} epochs x {TRAIN_IMAGES:,} images at {online:,.0f} images/s; evaluation not included"))
    return rows
