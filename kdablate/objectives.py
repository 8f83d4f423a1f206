"""Objectives: how a cell turns its knowledge config into a training loss.

An ``Objective`` is a thin class beside pure tensor math, as mdistiller's ``Distiller``
(megvii-research/mdistiller, mdistiller/distillers/_base.py) is beside its loss functions:
it owns the cell's temperature T and distillation weight alpha (nothing else keeps a copy),
declares what it reads (``needs``), and adds what any objective can take: the confidence
penalty (Pereyra et al., 2017), loss - beta * H(p_student), and a linear warm-up of the
distillation weight, per step or, as mdistiller's DKD (mdistiller/distillers/DKD.py), per epoch.

``soft_target`` assembles q from the cell's mass and structure (``kdablate.components``);
``dkd`` is Decoupled KD (Zhao et al., CVPR 2022), the decomposition anchor:
    DKD = alpha * TCKD + beta * NCKD,  loss = CE + DKD,
TCKD being the KL between the binary (target, non-target) distributions and
NCKD the KL among the non-target classes, each times T^2.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

from kdablate.components import (
    MASSES, STRUCTURES, Need, TargetContext, assemble_target, ce_only_loss, soft_target_loss, stacked_soft_target_loss,
)
from kdablate.components.context import Probe, StateDict
from kdablate.registry import Registry

OBJECTIVES: Registry = Registry("objective")


def binary_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K) logits, (B,) labels -> (B, 2) log (p_y, 1 - p_y) of softmax(logits), in log space.

    The non-target mass is a logsumexp over the other classes, not 1 - p_y: for a confident
    row p_y rounds to 1, 1 - p_y cancels to 0, and a log clamped at 1e-12 put TCKD off by 17% to
    100% (K = 100, logit scale 40, T = 1, either dtype). Of the two, the larger probability (>= 1/2)
    is then taken as log1p(-smaller): its log is near 0, where a difference of two logsumexps
    would keep only an absolute error of eps * |logits|.
    """
    gt = F.one_hot(labels, logits.shape[1]).bool()
    lse = logits.logsumexp(1, keepdim=True)
    target = logits.gather(1, labels[:, None]) - lse
    # Masking the true class with -inf drops it from the sum (and from the gradient).
    other = logits.masked_fill(gt, float("-inf")).logsumexp(1, keepdim=True) - lse
    # where, not minimum: at a tie minimum would split the gradient between the two, which
    # cancel (d log b_t = -d log b_o at b = 1/2), and leave none.
    first = target <= other
    small = torch.where(first, target, other)  # log of a probability <= 1/2: accurate as it is
    large = torch.log1p(-small.exp())  # finite: exp(small) <= 1/2
    return torch.where(first, torch.cat([small, large], 1), torch.cat([large, small], 1))


def dkd_parts(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) student / teacher logits, (B,) labels -> (TCKD, NCKD), batch means, each times T^2.

    TCKD = KL(b_teacher || b_student) over the binary (target, non-target) distributions,
    NCKD = KL among the non-target classes (Zhao et al., CVPR 2022, eqs. 1-4), both exact
    for confident logits: no probability near 1 is subtracted from 1 (see ``binary_log_probs``).
    """
    log_b_s = binary_log_probs(student / temperature, labels)
    log_b_t = binary_log_probs(teacher / temperature, labels)
    tckd = F.kl_div(log_b_s, log_b_t, reduction="batchmean", log_target=True)
    gt = F.one_hot(labels, student.shape[1]).bool()
    # Masking the true class with -inf renormalises over the non-target classes.
    log_q_s = F.log_softmax((student / temperature).masked_fill(gt, float("-inf")), 1)
    q_t = F.softmax((teacher / temperature).masked_fill(gt, float("-inf")), 1)
    # q_t is exactly 0 on the true class and kl_div uses xlogy, so the filled 0 there adds nothing.
    nckd = F.kl_div(log_q_s.masked_fill(gt, 0.0), q_t, reduction="batchmean")
    return tckd * temperature**2, nckd * temperature**2


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) -> mean entropy of softmax(logits)."""
    logp = F.log_softmax(logits, 1)
    return -(logp.exp() * logp).sum(1).mean()


def state_of(part: Any) -> StateDict:
    """A component's ``state_dict()``; {} for a plugin that defines none (it keeps no state)."""
    fn = getattr(part, "state_dict", None)
    return {} if fn is None else fn()


def load_state_into(part: Any, state: StateDict) -> None:
    """``part.load_state_dict(state)``; a plugin without one takes only empty state."""
    fn = getattr(part, "load_state_dict", None)
    if fn is not None:
        fn(state)
    elif state:
        raise ValueError(f"{type(part).__name__} keeps no state, got {sorted(state)}")


class PluginSpecLike(Protocol):
    """A registered plugin's name and its checked parameters (``kdablate.config.PluginSpec``)."""

    name: str
    params: Mapping[str, Any]


class KnowledgeLike(Protocol):
    """What an objective reads of a cell's knowledge (``kdablate.config.KnowledgeConfig``,
    which this layer cannot import: the config imports the objectives to check its names)."""

    objective: PluginSpecLike
    mass: PluginSpecLike
    structure: PluginSpecLike
    temperature: float
    alpha: float
    warmup_epochs: int
    warmup_by: str
    entropy_penalty: float
    feature: Sequence[PluginSpecLike]  # read by the trainer, not by an objective


class Objective(abc.ABC):
    """A cell's full loss: the objective's own ``loss``, the warm-up ramp and the confidence penalty.

    Owns T (``temperature``) and alpha, read once from the cell's knowledge, and passes them to
    what needs them: T to its components' calls, alpha to the loss.
    ``params``: the registered plugin's checked ``Params``.
    """

    needs: Need = Need.NONE

    def __init__(self, params: object, knowledge: KnowledgeLike) -> None:
        self.params = params
        self.temperature, self.alpha = knowledge.temperature, knowledge.alpha
        self.entropy_penalty = knowledge.entropy_penalty
        self.warmup_epochs, self.warmup_by = knowledge.warmup_epochs, knowledge.warmup_by

    @abc.abstractmethod
    def loss(self, logits: torch.Tensor, ctx: TargetContext, ramp: float) -> dict[str, torch.Tensor]:
        """(B, K) logits -> {'loss', ...} scalars, the distillation term weighted by ``ramp`` in [0, 1]."""

    def __call__(self, logits: torch.Tensor, ctx: TargetContext) -> dict[str, torch.Tensor]:
        """(B, K) logits of one seed's rows -> {'loss': the training loss, its detached parts ...}."""
        ramp = warmup_ramp(ctx.step, self.warmup_epochs, ctx.steps_per_epoch, self.warmup_by)
        parts = self.loss(logits, ctx, ramp)
        if self.entropy_penalty:
            h = entropy(logits)
            parts["loss"] = parts["loss"] - self.entropy_penalty * h
            parts["entropy"] = h.detach()
        return parts

    @property
    def stackable(self) -> bool:
        """Whether the seeds of an arm may train as one stacked model (``kdablate.stacked``): the
        loss reads its seed's own rows of the context alone, and any target is built by row-wise
        components (``Component.row_wise``), so one call over every seed's rows builds each seed's.
        Off unless an objective says so."""
        return False

    def static_target(self, ctx: TargetContext) -> torch.Tensor | None:
        """(N, K) q of every sample in ``ctx`` when it depends on nothing that changes in
        training (see ``Component.static``), so the trainer may build it once; else None."""
        return None

    def seeds_loss(self, logits: torch.Tensor, ctx: TargetContext) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """(S, B, K) logits of S seeds of one cell config and their ``ctx`` over the S*B rows (a
        stack's) -> (the sum of the seeds' losses, each seed's parts): what calling the objective
        seed by seed gives, up to float rounding, each seed's gradient its own. By default it does
        just that, on each seed's rows (``ctx.seed``)."""
        check_seeds(logits, ctx)
        results = [self(logits[s], ctx.seed(s)) for s in range(len(logits))]
        return sum(parts["loss"] for parts in results), results

    def check(self, probe: Probe) -> None:
        """Raise ConfigError when the objective cannot work with the cell's data and models."""

    def state_dict(self) -> StateDict:
        """What the objective changes in training, for a checkpoint: tensors and numbers only.
        Everything else is rebuilt from the cell's config."""
        return {}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore ``state_dict()``'s output; an objective without state refuses any."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")


@OBJECTIVES.register("soft_target")
class SoftTargetObjective(Objective):
    """(1 - alpha) CE + alpha T^2 KL(q || p_T), q from the cell's mass and structure plugins."""

    def __init__(self, params: object, knowledge: KnowledgeLike) -> None:
        super().__init__(params, knowledge)
        self.mass = MASSES.build(knowledge.mass.name, knowledge.mass.params)
        self.structure = STRUCTURES.build(knowledge.structure.name, knowledge.structure.params)

    @property
    def needs(self) -> Need:  # type: ignore[override]
        """What the target reads (``Need``); nothing when alpha is 0."""
        return Need.NONE if self.alpha == 0 else self.mass.needs | self.structure.needs

    @property
    def static(self) -> bool:
        """q is a fixed function of each sample's label and cached teacher logits."""
        return self.alpha != 0 and self.mass.static and self.structure.static and not self.structure.differentiable

    @property
    def stackable(self) -> bool:  # type: ignore[override]
        """CE alone, or a target whose components are both row-wise (``Component.row_wise``)."""
        return self.alpha == 0 or (self.mass.row_wise and self.structure.row_wise)

    def target(self, ctx: TargetContext) -> torch.Tensor:
        """(N, K) q for the rows of ``ctx``; a stop-gradient target unless the structure
        is differentiable (then gradients flow through the explanations into the model)."""
        with torch.set_grad_enabled(self.structure.differentiable and torch.is_grad_enabled()):
            return assemble_target(self.mass(ctx, self.temperature), self.structure(ctx, self.temperature),
                                   ctx.labels)

    def loss(self, logits: torch.Tensor, ctx: TargetContext, ramp: float) -> dict[str, torch.Tensor]:
        if self.alpha == 0:  # CE only: no source needs to be present, no target to build
            return ce_only_loss(logits, ctx.labels)
        q = self.target(ctx) if ctx.target is None else ctx.target
        out = soft_target_loss(logits, ctx.labels, q, self.temperature, self.alpha * ramp)
        out["target_mass"] = 1.0 - q.gather(1, ctx.labels[:, None]).mean()
        return out

    def static_target(self, ctx: TargetContext) -> torch.Tensor | None:
        return self.target(ctx) if self.static else None

    def seeds_loss(self, logits: torch.Tensor, ctx: TargetContext) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Every seed's target in one call over their rows (the components are row-wise where a stack
        trains them), then, for CE alone or a stop-gradient target, one fused loss node for every
        seed; otherwise (a differentiable target, the confidence penalty) the seeds one by one."""
        check_seeds(logits, ctx)
        if self.alpha != 0 and ctx.target is None:
            ctx = dataclasses.replace(ctx, target=self.target(ctx))
        if self.entropy_penalty or (self.alpha != 0 and ctx.target.requires_grad):
            return super().seeds_loss(logits, ctx)
        ramp = warmup_ramp(ctx.step, self.warmup_epochs, ctx.steps_per_epoch, self.warmup_by)
        s, b, k = logits.shape
        labels = ctx.labels.view(s, b)
        q = None if self.alpha == 0 else ctx.target.view(s, b, k)
        total, parts = stacked_soft_target_loss(logits, labels, q, self.temperature, self.alpha * ramp)
        if q is not None:
            parts["target_mass"] = 1.0 - q.gather(2, labels[..., None]).mean((1, 2))
        return total, [dict(zip(parts, values)) for values in zip(*(v.unbind(0) for v in parts.values()))]

    def check(self, probe: Probe) -> None:
        """Both components' load-time checks (``Component.check``), unless alpha is 0."""
        if self.alpha != 0:
            self.mass.check(probe)
            self.structure.check(probe)

    def state_dict(self) -> StateDict:
        """The components' training state, keys prefixed 'mass.' and 'structure.'."""
        return {f"{name}.{k}": v for name in ("mass", "structure")
                for k, v in state_of(getattr(self, name)).items()}

    def load_state_dict(self, state: StateDict) -> None:
        parts: dict[str, StateDict] = {"mass": {}, "structure": {}}
        for key, value in state.items():
            name, _, rest = key.partition(".")
            if name not in parts:
                raise ValueError(f"soft_target state has an unknown key '{key}'")
            parts[name][rest] = value
        for name, sub in parts.items():
            load_state_into(getattr(self, name), sub)


@OBJECTIVES.register("dkd")
class DKDObjective(Objective):
    """CE + alpha TCKD + beta NCKD; alpha is the cell's ``alpha``, beta a parameter."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        beta: float = 8.0

    needs = Need.TEACHER
    stackable = True  # reads the batch's logits, labels and teacher logits only

    def loss(self, logits: torch.Tensor, ctx: TargetContext, ramp: float) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(logits, ctx.labels)
        tckd, nckd = dkd_parts(logits, ctx.logits("teacher"), ctx.labels, self.temperature)
        kd = self.alpha * tckd + self.params.beta * nckd
        return {"loss": ce + ramp * kd, "loss_ce": ce.detach(), "loss_kd": kd.detach(),
                "loss_tckd": tckd.detach(), "loss_nckd": nckd.detach()}


def check_seeds(logits: torch.Tensor, ctx: TargetContext) -> None:
    """(S, B, K) logits against a context of S seeds' B rows each; a ValueError if they differ."""
    s, b = logits.shape[:2]
    if ctx.seeds != s or len(ctx.labels) != s * b:
        raise ValueError(f"{s} seeds' logits of {b} rows each, but a context of {ctx.seeds} seeds' "
                         f"{len(ctx.labels)} rows")


def warmup_ramp(step: int, warmup_epochs: int, steps_per_epoch: int, by: str = "step") -> float:
    """The distillation weight's factor in [0, 1] at 0-based global ``step``.

    by='step': linear per step, (step + 1) / (warmup_epochs * steps_per_epoch).
    by='epoch': constant within an epoch, min(1, epoch / warmup_epochs) with the epoch
    counted from 1, as mdistiller's DKD (mdistiller/distillers/DKD.py, ``forward_train``).
    """
    if not warmup_epochs:
        return 1.0
    steps_per_epoch = max(steps_per_epoch, 1)  # a train split smaller than a batch has no steps
    if by == "epoch":
        return min(1.0, (step // steps_per_epoch + 1) / warmup_epochs)
    return min(1.0, (step + 1) / (warmup_epochs * steps_per_epoch))


def build_objective(knowledge: KnowledgeLike) -> Objective:
    """The ``Objective`` of a cell's knowledge (``KnowledgeConfig``), its plugin's params checked."""
    spec = knowledge.objective
    return OBJECTIVES.get(spec.name)(OBJECTIVES.params(spec.name, spec.params), knowledge)
