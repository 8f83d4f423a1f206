"""Objectives: how a cell turns its knowledge config into a training loss.

``soft_target`` is the component-assembled target of ``kdablate.components``;
``dkd`` is Decoupled KD (Zhao et al., CVPR 2022), the decomposition anchor:
    DKD = alpha * TCKD + beta * NCKD,  loss = CE + DKD,
TCKD being the KL between the binary (target, non-target) distributions and
NCKD the KL among the non-target classes, each times T^2. ``Method`` adds what
any objective can take: the confidence penalty (Pereyra et al., 2017),
loss - beta * H(p_student), and a linear warm-up of the distillation weight, per
step or, as mdistiller's DKD (megvii-research/mdistiller, mdistiller/distillers/DKD.py), per epoch.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from kdablate.components import Need, SoftTarget, TargetContext
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
    """A part's ``state_dict()``; {} for a plugin that defines none (it keeps no state)."""
    fn = getattr(part, "state_dict", None)
    return {} if fn is None else fn()


def load_state_into(part: Any, state: StateDict) -> None:
    """``part.load_state_dict(state)``; a plugin without one takes only empty state."""
    fn = getattr(part, "load_state_dict", None)
    if fn is not None:
        fn(state)
    elif state:
        raise ValueError(f"{type(part).__name__} keeps no state, got {sorted(state)}")


@OBJECTIVES.register("soft_target")
class SoftTargetObjective:
    """(1 - alpha) CE + alpha T^2 KL(q || p_T), q from the cell's mass and structure."""

    def __init__(self, params: object, knowledge: Any) -> None:
        k = knowledge
        self.core = SoftTarget.from_specs(k.mass.flat(), k.structure.flat(), k.temperature, k.alpha)
        self.needs = self.core.needs
        self.temperature = k.temperature

    def __call__(self, logits: torch.Tensor, ctx: TargetContext, ramp: float) -> dict[str, torch.Tensor]:
        return self.core(logits, ctx, alpha=self.core.alpha * ramp)

    def summary(self) -> dict[str, torch.Tensor]:
        return {**self.core.mass.summary(), **self.core.structure.summary()}

    def check(self, probe: Probe) -> None:
        self.core.check(probe)

    def static_target(self, ctx: TargetContext) -> torch.Tensor | None:
        """(N, K) q of every sample in ``ctx`` when it depends on nothing that changes in training."""
        return self.core.target(ctx) if self.core.static else None

    def state_dict(self) -> StateDict:
        """The components' training state, keys prefixed 'mass.' and 'structure.'."""
        return {f"{name}.{k}": v for name in ("mass", "structure")
                for k, v in state_of(getattr(self.core, name)).items()}

    def load_state_dict(self, state: StateDict) -> None:
        parts: dict[str, StateDict] = {"mass": {}, "structure": {}}
        for key, value in state.items():
            name, _, rest = key.partition(".")
            if name not in parts:
                raise ValueError(f"soft_target state has an unknown key '{key}'")
            parts[name][rest] = value
        for name, sub in parts.items():
            load_state_into(getattr(self.core, name), sub)


@OBJECTIVES.register("dkd")
class DKDObjective:
    """CE + alpha TCKD + beta NCKD; alpha is the cell's ``alpha``, beta a parameter."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        beta: float = 8.0

    needs = Need.TEACHER

    def __init__(self, params: Params, knowledge: Any) -> None:
        self.params, self.alpha, self.temperature = params, knowledge.alpha, knowledge.temperature

    def __call__(self, logits: torch.Tensor, ctx: TargetContext, ramp: float) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(logits, ctx.labels)
        tckd, nckd = dkd_parts(logits, ctx.logits("teacher"), ctx.labels, self.temperature)
        kd = self.alpha * tckd + self.params.beta * nckd
        return {"loss": ce + ramp * kd, "loss_ce": ce.detach(), "loss_kd": kd.detach(),
                "loss_tckd": tckd.detach(), "loss_nckd": nckd.detach()}

    def summary(self) -> dict[str, torch.Tensor]:
        return {}

    def static_target(self, ctx: TargetContext) -> torch.Tensor | None:
        return None


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


@dataclasses.dataclass
class Method:
    """A cell's full loss: an objective, the confidence penalty and the warm-up ramp.

    warmup_epochs, steps_per_epoch, warmup_by: the distillation weight ramps linearly from 0
    over ``warmup_epochs``, per step or per epoch (see ``warmup_ramp``).
    """

    objective: Any
    entropy_penalty: float = 0.0
    warmup_epochs: int = 0
    steps_per_epoch: int = 1
    warmup_by: str = "step"

    @property
    def needs(self) -> Need:
        return self.objective.needs

    @property
    def temperature(self) -> float:
        return self.objective.temperature

    def __call__(self, logits: torch.Tensor, ctx: TargetContext) -> dict[str, torch.Tensor]:
        ramp = warmup_ramp(ctx.step, self.warmup_epochs, self.steps_per_epoch, self.warmup_by)
        parts = self.objective(logits, ctx, ramp)
        if self.entropy_penalty:
            h = entropy(logits)
            parts["loss"] = parts["loss"] - self.entropy_penalty * h
            parts["entropy"] = h.detach()
        return parts

    def summary(self) -> dict[str, torch.Tensor]:
        return self.objective.summary()

    def check(self, probe: Probe) -> None:
        """The objective's load-time check (``Component.check``), where it has one."""
        fn = getattr(self.objective, "check", None)
        if fn is not None:
            fn(probe)

    def static_target(self, ctx: TargetContext) -> torch.Tensor | None:
        """The objective's precomputable target (see ``SoftTarget.static``), or None."""
        fn = getattr(self.objective, "static_target", None)
        return None if fn is None else fn(ctx)

    def state_dict(self) -> StateDict:
        """What the objective changes in training (its components' state), for a checkpoint:
        tensors and numbers only. The rest of a Method is rebuilt from the cell's config."""
        return state_of(self.objective)

    def load_state_dict(self, state: StateDict) -> None:
        load_state_into(self.objective, state)


def build_method(knowledge: Any, steps_per_epoch: int = 1) -> Method:
    """The Method of a ``KnowledgeConfig``."""
    spec = knowledge.objective
    objective = OBJECTIVES.get(spec.name)(OBJECTIVES.params(spec.name, spec.params), knowledge)
    return Method(objective, knowledge.entropy_penalty, knowledge.warmup_epochs, steps_per_epoch, knowledge.warmup_by)
