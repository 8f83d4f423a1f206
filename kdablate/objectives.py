"""Objectives: how a cell turns its knowledge config into a training loss.

``soft_target`` is the component-assembled target of ``kdablate.components``;
``dkd`` is Decoupled KD (Zhao et al., CVPR 2022), the decomposition anchor:
    DKD = alpha * TCKD + beta * NCKD,  loss = CE + DKD,
TCKD being the KL between the binary (target, non-target) distributions and
NCKD the KL among the non-target classes, each times T^2. ``Method`` adds what
any objective can take: the confidence penalty (Pereyra et al., 2017),
loss - beta * H(p_student), and a linear warm-up of the distillation weight.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from kdablate.components import SoftTarget, TargetContext
from kdablate.registry import Registry

OBJECTIVES: Registry = Registry("objective")


def dkd_parts(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) student / teacher logits -> (TCKD, NCKD), batch means, each times T^2."""
    gt = F.one_hot(labels, student.shape[1]).bool()
    p_s, p_t = F.softmax(student / temperature, 1), F.softmax(teacher / temperature, 1)
    b_s = torch.stack([p_s[gt], 1 - p_s[gt]], 1)
    b_t = torch.stack([p_t[gt], 1 - p_t[gt]], 1)
    tckd = F.kl_div(b_s.clamp_min(1e-12).log(), b_t, reduction="batchmean")
    # Masking the true class with -inf renormalises over the non-target classes.
    log_q_s = F.log_softmax((student / temperature).masked_fill(gt, float("-inf")), 1)
    q_t = F.softmax((teacher / temperature).masked_fill(gt, float("-inf")), 1)
    nckd = F.kl_div(log_q_s.masked_fill(gt, 0.0), q_t, reduction="batchmean")
    return tckd * temperature**2, nckd * temperature**2


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) -> mean entropy of softmax(logits)."""
    logp = F.log_softmax(logits, 1)
    return -(logp.exp() * logp).sum(1).mean()


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

    def static_target(self, ctx: TargetContext) -> torch.Tensor | None:
        """(N, K) q of every sample in ``ctx`` when it depends on nothing that changes in training."""
        return self.core.target(ctx) if self.core.static else None


@OBJECTIVES.register("dkd")
class DKDObjective:
    """CE + alpha TCKD + beta NCKD; alpha is the cell's ``alpha``, beta a parameter."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        beta: float = 8.0

    needs = frozenset({"teacher"})

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


@dataclasses.dataclass
class Method:
    """A cell's full loss: an objective, the confidence penalty and the warm-up ramp.

    warmup_steps: the distillation weight ramps linearly from 0 over these steps.
    """

    objective: Any
    entropy_penalty: float = 0.0
    warmup_steps: int = 0

    @property
    def needs(self) -> frozenset[str]:
        return self.objective.needs

    @property
    def temperature(self) -> float:
        return self.objective.temperature

    def __call__(self, logits: torch.Tensor, ctx: TargetContext) -> dict[str, torch.Tensor]:
        ramp = min(1.0, (ctx.step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        parts = self.objective(logits, ctx, ramp)
        if self.entropy_penalty:
            h = entropy(logits)
            parts["loss"] = parts["loss"] - self.entropy_penalty * h
            parts["entropy"] = h.detach()
        return parts

    def summary(self) -> dict[str, torch.Tensor]:
        return self.objective.summary()

    def static_target(self, ctx: TargetContext) -> torch.Tensor | None:
        """The objective's precomputable target (see ``SoftTarget.static``), or None."""
        fn = getattr(self.objective, "static_target", None)
        return None if fn is None else fn(ctx)


def build_method(knowledge: Any, steps_per_epoch: int = 1) -> Method:
    """The Method of a ``KnowledgeConfig``."""
    spec = knowledge.objective
    objective = OBJECTIVES.get(spec.name)(OBJECTIVES.params(spec.name, spec.params), knowledge)
    return Method(objective, knowledge.entropy_penalty, knowledge.warmup_epochs * steps_per_epoch)
