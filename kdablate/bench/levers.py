"""Speed levers and achieved compute: each measured on against off, side by side.

* channels_last against the default (NCHW) layout for a ResNet-20 training step;
* bf16 autocast against fp32 for a trainer epoch (MLP and ResNet-20) and for
  teacher inference (ResNet-56, ``kdablate.trainer.predict``);
* ``torch.compile`` against eager for a ResNet-20 and an MLP step, with its compile
  time (only with ``--compile``: compiling costs tens of seconds);
* the ResNet-20 step's achieved GFLOP/s (FLOPs counted by ``FlopCounterMode``)
  as a fraction of one large ``channels_last`` convolution's, measured in the same run.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdablate.bench.core import Row, Scale, interleave, median, ratio, synthetic
from kdablate.bench.trainer import DEFAULT, RESNET, Setting, frozen_teacher, samples, shape_of, trainer_epoch
from kdablate.config import KnowledgeConfig, OptimConfig
from kdablate.data.bundle import batch_layout
from kdablate.models import build_model
from kdablate.models.factory import place_model
from kdablate.trainer import Runtime, predict


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One plain SGD step of ``model`` on the batch (x, y)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def batch_for(setting: Setting, scale: Scale, channels_last: bool = True) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The setting's student and a (B, *shape) random batch with (B,) labels, in the trainer's
    layout or, ``channels_last=False``, both left in the default (NCHW) one."""
    torch.manual_seed(0)
    shape = shape_of(setting, scale)
    model = build_model(setting.student, {}, shape, setting.num_classes)
    x, y = torch.randn(scale.batch, *shape), torch.randint(0, setting.num_classes, (scale.batch,))
    if channels_last:
        model, x = place_model(model, shape), batch_layout(x)
    return model, x, y


def channels_last_row(scale: Scale) -> Row:
    variants = {"nchw": step_fn(*batch_for(RESNET, scale, False)), "nhwc": step_fn(*batch_for(RESNET, scale))}
    times = interleave(variants, scale.image_rounds)
    return Row("levers", "channels_last vs NCHW, ResNet-20 step", ratio(times, "nchw", "nhwc"), "x", "reported",
               note="speedup; kept on for images")


def bf16_rows(scale: Scale) -> list[Row]:
    rows = []
    for setting in (DEFAULT, RESNET):
        n = samples(setting, scale)
        data = synthetic(setting.num_classes, shape_of(setting, scale), n)
        optim = OptimConfig(epochs=100, batch_size=scale.batch)
        variants = {amp: trainer_epoch(setting, data, optim, KnowledgeConfig(), runtime=Runtime("cpu", amp))
                    for amp in ("none", "bf16")}
        times = interleave(variants, scale.image_rounds if setting.images else scale.rounds)
        rows.append(Row("levers", f"bf16 autocast vs fp32, trainer step, {setting.student}",
                        ratio(times, "none", "bf16"), "x", "reported", note="speedup; opt-in: --amp bf16"))
    teacher_data = synthetic(RESNET.num_classes, shape_of(RESNET, scale), 4 * scale.batch)
    teacher = frozen_teacher(RESNET, teacher_data)
    variants = {amp: (lambda a=amp: predict(teacher, teacher_data.x_train, chunk=scale.batch, runtime=Runtime("cpu", a)))
                for amp in ("none", "bf16")}
    times = interleave(variants, scale.image_rounds)
    rows.append(Row("levers", f"bf16 autocast vs fp32, teacher inference, {RESNET.teacher}",
                    ratio(times, "none", "bf16"), "x", "reported", note="speedup"))
    return rows


def compile_rows(scale: Scale) -> list[Row]:
    rows = []
    for setting in (DEFAULT, RESNET):
        model, x, y = batch_for(setting, scale)
        compiled = torch.compile(model)
        eager, fast = step_fn(model, x, y), step_fn(compiled, x, y)
        t0 = time.perf_counter()
        fast()
        compile_s = time.perf_counter() - t0
        reps = 1 if setting.images else 20
        times = interleave({"eager": lambda: [eager() for _ in range(reps)],
                            "compiled": lambda: [fast() for _ in range(reps)]}, scale.image_rounds)
        rows.append(Row("levers", f"torch.compile vs eager, {setting.student} step", ratio(times, "eager", "compiled"),
                        "x", "reported", note=f"speedup; compile {compile_s:.1f} s"))
    return rows


def conv_peak_gflops(scale: Scale) -> float:
    """GFLOP/s of one large 3x3 channels_last convolution (64 -> 64 channels, 32x32, batch as the bench)."""
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(scale.batch, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    flops = 2 * scale.batch * 64 * 64 * 9 * 32 * 32
    with torch.no_grad():
        times = interleave({"conv": lambda: conv(x)}, max(3, scale.image_rounds))
    return flops / median(times["conv"]) / 1e9


def gflops_row(scale: Scale, ce_step_s: float) -> Row:
    """The ResNet-20 trainer step's achieved GFLOP/s over the conv peak measured now."""
    model, x, y = batch_for(RESNET, scale)
    counter = FlopCounterMode(display=False)
    with counter:
        step_fn(model, x, y)()
    achieved = counter.get_total_flops() / ce_step_s / 1e9
    peak = conv_peak_gflops(scale)
    return Row("compute", "ResNet-20 step GFLOP/s / conv peak", achieved / peak, "", "reported",
               note=f"{achieved:.1f} of {peak:.1f} GFLOP/s ({counter.get_total_flops() / 1e9:.2f} GFLOP a step)")


def lever_rows(scale: Scale, with_compile: bool) -> list[Row]:
    rows = [channels_last_row(scale), *bf16_rows(scale)]
    return rows + (compile_rows(scale) if with_compile else [])
