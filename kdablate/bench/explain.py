"""IL rows: a training step with each explanation source against a CE step, side by side.

On the default MLP student (K = 10) and on ResNet-20 with 32x32x3 images, times a
plain CE step and an IL step per explanation source (constant mass + explanation
structure), plus the cheap saliency schedules (every n steps, a fraction of the
batch). Each variant runs a whole number of ``CYCLE`` steps a round, so the
schedules average right. The 'soft target, uniform' row is the KD loss alone,
so an explanation's own overhead is the difference to it. Target: cam <= x1.10.
Sources are planned by their declared ``cost`` (``kdablate.attribution.Cost``) and run
with their ``quick_params``, not by name: ResNet-20 leaves out the sources meant for
offline use (``Cost.PER_CLASS_STEPS``, e.g. integrated gradients: tens of seconds a step
on one core) and the fractional schedules.
"""
from __future__ import annotations

from typing import Callable

import torch

from kdablate.attribution import EXPLANATIONS, Cost
from kdablate.bench.core import Row, Scale, interleave, median, ratio, synthetic
from kdablate.bench.trainer import DEFAULT, RESNET, Setting, shape_of
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import DataBundle
from kdablate.trainer import Batch, EpochEnv, Member, make_member, train_step

CYCLE = 4  # the longest 'every' schedule: every timed window is a whole number of cycles
SCHEDULES = ((4, 1.0), (2, 1.0), (1, 0.25), (4, 0.5))


def variants(images: bool) -> dict[str, KnowledgeConfig]:
    """name -> knowledge: CE, the uniform soft target, IL per source, the saliency schedules."""
    il = dict(mass={"name": "constant", "eps": 0.2}, temperature=4.0, alpha=0.9)
    out = {"ce": KnowledgeConfig(), "soft target, uniform": KnowledgeConfig(structure="uniform", **il)}
    for source in EXPLANATIONS.names():
        plugin = EXPLANATIONS.get(source)
        if images and plugin.cost is Cost.PER_CLASS_STEPS:
            continue
        # quick_params keep a source meant for offline comparison short (e.g. 8 integration steps).
        params = dict(plugin.quick_params)
        out[f"il {source}"] = KnowledgeConfig(
            structure={"name": "explanation", "source": source, "source_params": params}, **il)
    for every, fraction in SCHEDULES[:1] if images else SCHEDULES:
        out[f"il saliency every={every} fraction={fraction}"] = KnowledgeConfig(
            structure={"name": "explanation", "every": every, "fraction": fraction}, **il)
    return out


def steps_fn(member: Member, data: DataBundle, batch: int) -> Callable[..., None]:
    """``count`` training steps on successive batches, the step counter running on across calls
    (any CYCLE consecutive steps hold the same number of explained steps of every schedule)."""
    state = {"step": 0}
    env = EpochEnv(data.num_classes, 1, len(data.y_train) // batch, torch.Generator().manual_seed(0))

    def run(count: int = CYCLE) -> None:
        for _ in range(count):
            s = state["step"]
            i = (s * batch) % (len(data.y_train) - batch + 1)
            train_step([member], Batch(data.x_train[i : i + batch], data.y_train[i : i + batch]), s, env)
            state["step"] = s + 1

    return run


def explanation_rows(setting: Setting, scale: Scale) -> list[Row]:
    """One row per IL variant: its step time as a multiple of the CE step's."""
    data = synthetic(setting.num_classes, shape_of(setting, scale), 4 * scale.batch)
    optim = OptimConfig(epochs=1000, batch_size=scale.batch)
    fns = {name: steps_fn(make_member(ModelSpec(name=setting.student), data, optim, k, 0, 4), data, scale.batch)
           for name, k in variants(setting.images).items()}
    for fn in fns.values():
        fn(1)  # warm-up: one step, not a cycle (a ResNet-20 saliency step is seconds)
    times = interleave(fns, scale.il_rounds if setting.images else scale.rounds, warmup=0)
    ce_ms = 1000 * median(times["ce"]) / CYCLE
    rows = []
    for name in fns:
        if name == "ce":
            continue
        r = ratio(times, name, "ce")
        target, ok = ("≤ 1.10", r <= 1.10) if name == "il cam" else ("reported", None)
        rows.append(Row(f"IL, {setting.label}", f"{name} step vs CE step", r, "x", target, ok,
                        f"CE step {ce_ms:.3g} ms" if name == "il cam" else ""))
    return rows


def all_rows(scale: Scale) -> list[Row]:
    return explanation_rows(DEFAULT, scale) + explanation_rows(RESNET, scale)
