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

Sketched saliency (``sketch`` = m in the explanation structure: m forward-mode products
instead of K backward passes; Johnson & Lindenstrauss 1984, Achlioptas 2003, Woodruff 2014):
``sketch_rows`` times the saliency IL step, exact and sketched at m = ``SKETCH``, as a multiple
of a CE step: the MLP at K = 10 and 100 and the 1-D CNN at K = 100 on MNIST-1D-shaped inputs,
and ResNet-20 at K = 100 on 32x32x3 images (sketched only: its exact step is K backward passes,
seconds on a CPU). Target: sketched at K = 100 <= x3.0. ``sketch_agreement`` measures how well
the sketch keeps the exact class-similarity ranking (Spearman), the table behind the choice of
``SKETCH``: ``python -m kdablate.bench.explain`` prints it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import nn

from kdablate.attribution import EXPLANATIONS, AttributionContext, Cost
from kdablate.bench.core import Row, Scale, interleave, median, ratio, synthetic
from kdablate.bench.trainer import DEFAULT, RESNET, Setting, shape_of
from kdablate.components.explanation import (explain, explanation_similarity, sketch, sketched_similarity,
                                              structure_from_similarity)
from kdablate.components.structure import class_means
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import DataBundle
from kdablate.metrics import offdiagonal, spearman
from kdablate.models import build_model
from kdablate.trainer import Batch, EpochEnv, Member, make_member, train_step

CYCLE = 4  # the longest 'every' schedule: every timed window is a whole number of cycles
SCHEDULES = ((4, 1.0), (2, 1.0), (1, 0.25), (4, 0.5))
SKETCH = 4  # the default m: the smallest with class-structure Spearman >= 0.95 at K = 100 on both models
SKETCH_MS = (2, 4, 8, 16, 32)
SKETCH_TARGET = 3.0  # sketched saliency IL step at K = 100, as a multiple of a CE step


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


def sketch_rows(student: str, scale: Scale, ks: tuple[int, ...] = (10, 100), m: int = SKETCH,
                exact: bool = True) -> list[Row]:
    """Per K: the saliency IL step, exact (if ``exact``) and sketched with m directions, as a multiple
    of a CE step, on inputs of the student's data shape (MNIST-1D or 32x32x3 images); target:
    sketched at K = 100 <= x``SKETCH_TARGET``."""
    il = dict(mass={"name": "constant", "eps": 0.2}, temperature=4.0, alpha=0.9)
    setting = RESNET if student == RESNET.student else DEFAULT
    shape, batch = shape_of(setting, scale), scale.batch // 2 if setting.images else scale.batch
    optim = OptimConfig(epochs=1000, batch_size=batch)
    # An MLP step is milliseconds: CYCLE steps a call; a CNN saliency step at K = 100 is seconds: one.
    rounds, per_call = (scale.rounds, CYCLE) if student == "mlp" else (scale.il_rounds + 1, 1)
    rows = []
    for k in ks:
        data = synthetic(k, shape, 4 * batch)
        arms = {"ce": KnowledgeConfig(),
                **({"exact": KnowledgeConfig(structure={"name": "explanation"}, **il)} if exact else {}),
                "sketch": KnowledgeConfig(structure={"name": "explanation", "sketch": m}, **il)}
        fns = {name: steps_fn(make_member(ModelSpec(name=student), data, optim, cfg, 0, 4), data, batch)
               for name, cfg in arms.items()}
        times = interleave({name: lambda fn=fn: fn(per_call) for name, fn in fns.items()}, rounds)
        note = f"CE step {1000 * median(times['ce']) / per_call:.3g} ms"
        for i, arm in enumerate(a for a in arms if a != "ce"):
            r = ratio(times, arm, "ce")
            target, ok = (f"≤ {SKETCH_TARGET:.2f}", r <= SKETCH_TARGET) if arm == "sketch" and k == max(ks) \
                else ("reported", None)
            what = "exact" if arm == "exact" else f"sketch m = {m}"
            rows.append(Row(f"IL sketch, {student}, {'32x32x3' if setting.images else 'MNIST-1D-shaped'}",
                            f"saliency step vs CE step, K = {k}, {what}", r, "x", target, ok,
                            "" if i else note))
    return rows


def all_rows(scale: Scale) -> list[Row]:
    return (explanation_rows(DEFAULT, scale) + explanation_rows(RESNET, scale)
            + sketch_rows("mlp", scale) + sketch_rows("cnn1d", scale, (100,))
            + sketch_rows("resnet20", scale, (100,), exact=False))


@dataclasses.dataclass(frozen=True)
class Agreement:
    """Spearman of sketched to exact similarities s_c = cos(E_y, E_c) for m directions: ``classes``
    over the off-diagonal of the (K, K) class-mean structure r (what the structure logs as
    'similarity'), ``rows`` the mean over samples of that over each sample's s_c, c != y (its
    target's ranking). ``exact_row``: the structure's sketch (row G_y. exact, norms sketched);
    otherwise every Gram entry sketched, cos(P_y, P_c)."""

    model: str
    k: int
    m: int
    exact_row: bool
    classes: float
    rows: float


def similarity_rows(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, m: int, generator: torch.Generator,
                    exact_row: bool = True, chunk: int = 100) -> torch.Tensor:
    """(N, *S), (N,) -> (N, K) saliency cosines cos(E_y, E_c): exact (m = 0), the structure's sketch
    (``exact_row``) or all-sketched; eval mode, ``chunk`` samples at a time (m tangents live at once)."""
    source, ctx, out = EXPLANATIONS.build("saliency"), AttributionContext(generators=(generator,)), []
    for x, y in zip(inputs.split(chunk), labels.split(chunk)):
        if not m:
            s = explanation_similarity(explain(model, source, x, eval_mode=True, ctx=ctx), y)
        elif exact_row:
            s = sketched_similarity(model, source, x, y, m, centre=False, eval_mode=True, ctx=ctx)
        else:
            s = explanation_similarity(sketch(model, source, x, m, centre=False, eval_mode=True, ctx=ctx), y)
        out.append(s.detach())
    return torch.cat(out)


def class_structure(sim: torch.Tensor, labels: torch.Tensor, tau: float = 0.3) -> torch.Tensor:
    """(N, K) similarities, (N,) labels -> (K, K) class-mean r = softmax(s / tau) over c != y."""
    k = sim.shape[1]
    r = structure_from_similarity(sim, labels, tau)
    sums = torch.zeros(k, k, dtype=r.dtype).index_add_(0, labels, r)
    return class_means(sums, torch.bincount(labels, minlength=k).to(r.dtype))


def agreement(sim: torch.Tensor, exact: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(N, K) sketched and exact similarities -> (class-structure Spearman, mean per-sample Spearman
    over c != y)."""
    classes = spearman(offdiagonal(class_structure(sim, labels)), offdiagonal(class_structure(exact, labels)))
    off = torch.ones_like(sim, dtype=torch.bool).scatter(1, labels[:, None], False)
    rows = [spearman(a[o], b[o]) for a, b, o in zip(sim, exact, off)]
    return classes, math.fsum(rows) / len(rows)


def sketch_agreement(student: str, k: int, ms: tuple[int, ...] = SKETCH_MS, per_class: int = 10,
                     seed: int = 0) -> list[Agreement]:
    """Per m, the structure's sketch and the all-sketched Gram against exact saliency, for a freshly
    initialised ``student`` (eval mode) on ``per_class * k`` random MNIST-1D-shaped inputs (``synthetic``)."""
    data = synthetic(k, (1, 40), per_class * k, seed=seed)
    torch.manual_seed(seed)
    model, x, y = build_model(student, {}, (1, 40), k), data.x_train, data.y_train
    generator = torch.Generator().manual_seed(seed)
    exact = similarity_rows(model, x, y, 0, generator)
    return [Agreement(student, k, m, row, *agreement(similarity_rows(model, x, y, m, generator, row), exact, y))
            for m in ms for row in (True, False)]


def agreement_table(rows: list[Agreement]) -> str:
    """The ``Agreement`` rows as a Markdown table, one line per (model, K, sketch), one column per m."""
    ms = sorted({a.m for a in rows})
    cells: dict[tuple[str, int, bool], dict[int, Agreement]] = {}
    for a in rows:
        cells.setdefault((a.model, a.k, a.exact_row), {})[a.m] = a
    lines = ["| model | K | sketch | " + " | ".join(f"m = {m}" for m in ms) + " |", "|---|---|---|" + "---|" * len(ms)]
    for (model, k, row), c in cells.items():
        what = "structure (row exact)" if row else "all-sketched Gram"
        lines.append(f"| {model} | {k} | {what} | " + " | ".join(
            f"{c[m].classes:.3f} ({c[m].rows:.3f})" if m in c else "" for m in ms) + " |")
    return "\n".join(lines + ["", "Spearman to exact: class-mean structure (per-sample ranking of c != y)"])


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(agreement_table([a for student in ("mlp", "cnn1d") for k in (10, 100) for a in sketch_agreement(student, k)]))
