"""Seed-stacked training: the cells of one arm that differ only in seed, trained as one model.

The S students' weights are stacked along a leading seed dimension
(``torch.func.stack_module_state``) and one ``vmap``'d ``functional_call`` runs them all:
batched matmuls for linear layers, grouped convolutions, BatchNorm statistics per seed. A
small model's step is mostly fixed per-op cost, paid here once for S seeds instead of S
times (the idea of model ensembling with ``torch.func``, PyTorch's "Model ensembling" tutorial).

Each seed keeps everything it has alone: its init (built under its own seed, then stacked),
its data order, augmentation and component generators, its objective, its best-on-val
epoch and its checkpoint, which is written in the unstacked format, so a seed resumes
stacked or alone. The loss is the sum of the per-seed losses, so seed s's weights receive
exactly seed s's gradient, and SGD updates elementwise: each seed follows its unstacked
trajectory up to float rounding (``tests/test_stacked.py`` checks weights and accuracy).

A step hands the objective one ``TargetContext`` over the S seeds' batches (S*B rows,
seed-major), each seed's rows drawing from its own generator, and 'self' the stack as one model
over those rows (``StackView``). Only what is per seed by construction is stacked
(``refusal``): one student per cell (no DML cohort), an objective whose target is built by
row-wise components (``Objective.stackable``, ``Component.row_wise``: CE, targets from labels,
logits and the seed's generator, the student's own explanations from a source that calls it row
by row, at every step), no online teacher, no fp16 loss scaling. Explanations are per sample in
eval mode, so every seed's rows are explained in one call on ``StackView``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from kdablate.components import Need, TargetContext
from kdablate.components.context import Observation
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import DataBundle
from kdablate.models.vmap_norm import with_math_norm
from kdablate.storage import Checkpoint
from kdablate.measures import Measurements
from kdablate.trainer import (
    CPU, EpochEnv, FitResult, Member, NonFiniteLoss, Runtime, SeedEpochCallback, TeacherSignal, cohort_size,
    fit_seeds, make_optimizer, split_metrics, train_epochs,
)


def refusal(model_spec: ModelSpec, knowledge: KnowledgeConfig, teachers: Sequence[TeacherSignal | None],
            runtime: Runtime) -> str:
    """Why these seeds cannot train stacked ('' when they can). With no ``teachers`` (before they
    are loaded) it judges the config alone."""
    from kdablate.objectives import build_objective

    if cohort_size(knowledge) > 1:
        return "a DML cohort trains two students per cell"
    if knowledge.feature:
        return "its feature terms read each seed's own stage outputs and run the teacher online"
    # A stacked step runs no member's own module: it has no training forward's features to hand
    # the components, and no teacher network to explain per seed. Refuse what declares it reads them.
    if Need.FEATURES in knowledge.needs():
        return "its target reads a model: the training forward's features (CAM's default mode)"
    if Need.TEACHER_MODEL in knowledge.needs():
        return "its target reads a model: the teacher network's explanations"
    objective = build_objective(knowledge)
    if not objective.stackable:
        parts = [f"{role} '{getattr(knowledge, role).name}'" for role in ("mass", "structure")
                 if not getattr(getattr(objective, role, None), "row_wise", True)]
        return (f"its {' and '.join(parts) or 'objective ' + repr(knowledge.objective.name)} is not row-wise "
                "(state of its seed, e.g. an explanation schedule's class EMA, or the model read through "
                "modules and hooks, e.g. CAM's or Grad-CAM's)")
    if any(t is not None and t.online for t in teachers):
        return "its teacher runs online"
    if runtime.amp == "fp16":
        return "fp16 keeps a loss scale per model"
    return ""


@dataclasses.dataclass
class Stack:
    """S students as one: ``base`` gives the structure, ``params``/``buffers`` the (S, ...)
    weights, one optimiser and schedule over them, and each seed's own ``members`` (their
    objectives, static-target caches and, for resume and report, their unstacked modules)."""

    base: nn.Module
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    members: list[Member]

    def _one(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(S, B, *shape) each seed's own batch -> (S, B, K) logits: the model's own
        ``stacked_forward`` where it has one (the MLP), else ``vmap`` over its ``forward``."""
        own = getattr(self.base, "stacked_forward", None)
        if own is not None and not self.buffers:
            return own(self.params, x)
        return vmap(self._one)(self.params, self.buffers, x)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, prepare: Callable, runtime: Runtime, chunk: int = 1024) -> torch.Tensor:
        """(N, *shape) raw inputs, shared by every seed -> (S, N, K) float32 logits on the CPU, in eval mode."""
        self.base.eval()
        outs = []
        for i in range(0, len(x), chunk):
            with runtime.autocast():
                xb = runtime.to(prepare(x[i : i + chunk]))
                outs.append(self.forward(xb.expand(len(self.members), *xb.shape)).float().cpu())
        self.base.train()
        return torch.cat(outs, 1)

    def seed_state(self, s: int) -> dict[str, torch.Tensor]:
        """Seed s's weights as its unstacked module's ``state_dict`` (copies)."""
        own = {**self.params, **self.buffers}
        return {k: own[k][s].detach().clone() for k in self.members[s].model.state_dict()}

    def seed_optimizer_state(self, s: int) -> dict:
        """Seed s's slice of the optimiser state, as its unstacked optimiser's ``state_dict``."""
        full = self.opt.state_dict()
        state = {i: {k: v[s].clone() if isinstance(v, torch.Tensor) and v.dim() else v for k, v in st.items()}
                 for i, st in full["state"].items()}
        return {"state": state, "param_groups": full["param_groups"]}


class StackView(nn.Module):
    """The stack as one model over every seed's rows, for explanations: (j*S*R, *shape) inputs laid
    out (j, S, R) -- R rows of each seed in seed order, or whole copies of those stacked along dim
    0 -- -> (j*S*R, K) logits, each row through its own seed's weights (``Stack.forward``). Any
    other row count is refused. It owns no parameters, so ``functional_call`` over it and
    ``jvp`` see only the inputs; its mode is the stack's."""

    def __init__(self, stack: Stack, rows: int) -> None:
        super().__init__()
        self.stack, self.rows = stack, rows  # a dataclass, not a submodule: its weights stay unregistered
        self.training = stack.base.training

    def train(self, mode: bool = True) -> StackView:
        self.training = mode
        self.stack.base.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, r = len(self.stack.members), self.rows
        if len(x) % (s * r):
            raise RuntimeError(f"a stack of {s} seeds explains {r} rows per seed (or whole copies of them), "
                               f"got {len(x)} rows")
        j, shape = len(x) // (s * r), x.shape[1:]
        per_seed = x.reshape(j, s, r, *shape).transpose(0, 1).reshape(s, j * r, *shape)
        out = self.stack.forward(per_seed)  # (S, j*R, K)
        return out.reshape(s, j, r, -1).transpose(0, 1).reshape(len(x), -1)


# Devices whose batch norm cannot run under vmap (CUDA's asks a memory-format question vmap
# does not answer): there the stack's structure computes it as plain tensor math instead.
MATH_NORM_DEVICES = ("cuda",)


def build_stack(members: list[Member], optim: OptimConfig, steps_per_epoch: int) -> Stack:
    """Stack the members' current weights and optimiser state into one ``Stack``."""
    params, buffers = stack_module_state([m.model for m in members])
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    opt, sched = make_optimizer(list(params.values()), optim, max(optim.epochs * steps_per_epoch, 1), steps_per_epoch)
    sched.load_state_dict(members[0].sched.state_dict())
    # A schedule's state holds its step, not the LR it set: a resumed stack must also take the
    # LR (and any other group setting) the seeds' optimisers were at, or its first step is off.
    for group, saved in zip(opt.param_groups, members[0].opt.param_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})
    own = [list(m.model.parameters()) for m in members]  # the same order as ``params``
    for i, p in enumerate(params.values()):  # restored momentum, stacked like the weights
        states = [m.opt.state.get(o[i], {}) for m, o in zip(members, own)]
        if all("momentum_buffer" in st and st["momentum_buffer"] is not None for st in states):
            opt.state[p]["momentum_buffer"] = torch.stack([st["momentum_buffer"] for st in states])
    # The functional calls supply every weight; the base keeps only the structure.
    base = members[0].model
    if any(v.device.type in MATH_NORM_DEVICES for v in params.values()):
        base = with_math_norm(base)
    return Stack(base, params, buffers, opt, sched, members)


def seed_snapshot(st: Stack, s: int, gens: tuple, epoch: int, step: int, best: dict) -> dict:
    """Seed s's checkpoint, in ``trainer.snapshot``'s format: it resumes stacked or alone."""
    m = st.members[s]
    member = {"model": st.seed_state(s), "opt": st.seed_optimizer_state(s), "sched": st.sched.state_dict(),
              "method": m.objective.state_dict()}
    return {"epoch": epoch, "step": step, "best": best, "gens": [g.get_state() for g in gens], "members": [member]}


def stacked_step(st: Stack, batches: list, step: int, envs: list[EpochEnv]) -> list[dict[str, torch.Tensor]]:
    """One optimisation step of every seed on its own batch; per seed, its loss parts."""
    runtime = envs[0].runtime
    x = torch.stack([b.x for b in batches])
    with runtime.autocast():
        out = st.forward(x).float()
    # The seeds share their cell's config and a row-wise target: one objective takes them all.
    total, results = st.members[0].objective.seeds_loss(out, stack_context(st, x, out, batches, step, envs))
    for s, b in enumerate(batches):
        torch.argmax(out[s].detach(), 1, out=b.preds[0])
    st.opt.zero_grad(set_to_none=True)
    total.backward()
    st.opt.step()
    st.sched.step()
    return results


def stack_context(st: Stack, x: torch.Tensor, out: torch.Tensor, batches: list, step: int,
                  envs: list[EpochEnv]) -> TargetContext:
    """The step's one context over the S seeds' rows: (S, B, *shape) inputs and (S, B, K) logits,
    each seed's generator, 'self' the stack over B rows per seed, the seeds' precomputed targets if
    any, and observations split among the seeds' measurements."""
    env, flat = envs[0], lambda t: t.reshape(-1, *t.shape[2:])
    rows = {"labels": [b.y for b in batches], "teacher_logits": [b.teacher_logits for b in batches],
            "target": [b.targets[0] if b.targets else None for b in batches]}
    rows = {k: None if v[0] is None else torch.cat(v) for k, v in rows.items()}
    return TargetContext(num_classes=env.num_classes, student_logits=flat(out.detach()), inputs=flat(x),
                         generators=tuple(e.generator for e in envs), models={"self": StackView(st, x.shape[1])},
                         step=step, epoch=env.epoch, steps_per_epoch=env.steps_per_epoch,
                         class_groups=env.class_groups, observe=split_observations(envs), **rows)


def split_observations(envs: list[EpochEnv]) -> Callable[[Observation], None]:
    """An observation of a stack's rows handed to each seed's listener as its own rows, each seed
    charged an equal share of the time."""
    def observe(seen: Observation) -> None:
        n = len(seen.rows) // len(envs)
        for s, env in enumerate(envs):
            if env.observe is not None:
                env.observe(Observation(seen.name, seen.rows[s * n:(s + 1) * n], seen.labels[s * n:(s + 1) * n],
                                        seen.seconds / len(envs)))
    return observe


def stacked_metrics(st: Stack, data: DataBundle, measures: list[Measurements], runtime: Runtime,
                    splits: Sequence[str] = ("val", "test")) -> list[dict[str, float]]:
    """Per seed, '<split>/*' (``trainer.evaluate_model``'s), from one stacked pass per split."""
    out: list[dict[str, float]] = [{} for _ in st.members]
    for split in splits:
        logits = st.predict(data.split(split)[0], data.prepare, runtime)
        for s, seen in enumerate(measures):
            if not torch.isfinite(logits[s]).all():
                raise NonFiniteLoss(f"non-finite outputs on the {split} split (seed index {s})")
            out[s].update(split_metrics(logits[s], data, split, seen))
    return out


class Stacked:
    """S seeds as one vmapped stack (``Stack``): ``trainer.fit_seeds``' seeds, trained together.
    Each seed's cohort is one module; the stack holds their weights, stacked, until ``finish``."""

    def __init__(self, cohorts: list[list[Member]], optim: OptimConfig, steps_per_epoch: int) -> None:
        self.cohorts = cohorts
        self.st = build_stack([c[0] for c in cohorts], optim, steps_per_epoch)

    def epoch(self, data: DataBundle, batch_size: int, gens: list[tuple], epoch: int, step: int,
              teachers: list[TeacherSignal], measures: list[Measurements], runtime: Runtime,
              splits: tuple[str, ...]) -> tuple[list[dict], int]:
        """Every seed's epoch in stacked steps, then one stacked pass per split: per seed its metrics."""
        parts, step = self.train(data, batch_size, gens, epoch, step, teachers, runtime, measures)
        evaluated = stacked_metrics(self.st, data, measures, runtime, splits)
        return [{**p[0], **m} for p, m in zip(parts, evaluated)], step

    def train(self, data: DataBundle, batch_size: int, gens: list[tuple], epoch: int, step: int,
              teachers: list[TeacherSignal], runtime: Runtime,
              measures: Sequence[Measurements] = ()) -> tuple[list[list[dict[str, float]]], int]:
        """``trainer.train_epochs`` in stacked steps: per seed its 'train/<part>' means, and the step after."""
        self.st.base.train()
        return train_epochs(lambda batches, step, envs: [[p] for p in stacked_step(self.st, batches, step, envs)],
                            self.cohorts, data, batch_size, gens, epoch, step, teachers, runtime, measures)

    @staticmethod
    def refusal(model_spec: ModelSpec, knowledge: KnowledgeConfig, teachers: Sequence[TeacherSignal | None],
                runtime: Runtime) -> str:
        """Why these seeds cannot train stacked, '' when they can (the module's ``refusal``)."""
        return refusal(model_spec, knowledge, teachers, runtime)

    def seed_state(self, s: int) -> dict[str, torch.Tensor]:
        return self.st.seed_state(s)

    def snapshot(self, s: int, gens: tuple, epoch: int, step: int, best: dict) -> dict:
        return seed_snapshot(self.st, s, gens, epoch, step, best)

    def finish(self) -> None:
        """The last epoch's weights back into each seed's module (for report 'last')."""
        for s, cohort in enumerate(self.cohorts):
            cohort[0].model.load_state_dict(self.st.seed_state(s))


def fit_stacked(model_spec: ModelSpec, data: DataBundle, optim: OptimConfig, knowledge: KnowledgeConfig,
                seeds: Sequence[int], teachers: Sequence[TeacherSignal | None], report: str = "best_val",
                on_epoch: SeedEpochCallback | None = None, checkpoints: Sequence[Checkpoint | None] = (),
                runtime: Runtime = CPU) -> list[FitResult]:
    """``trainer.fit_seeds`` with the seeds stacked; one ``FitResult`` per seed, in order.
    SeedsMismatch when the seeds' checkpoints cannot resume together (train them alone)."""
    return fit_seeds(model_spec, data, optim, knowledge, seeds, teachers, report, on_epoch, checkpoints, runtime,
                     ("val", "test"), kind=Stacked)
