"""Assemble q from mass and structure, and the soft-target distillation loss.

Loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(q || softmax(student / T)),
the Hinton et al. (2015) form, with q assembled from independent components.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from kdablate.components.context import TargetContext
from kdablate.components.mass import MASSES
from kdablate.components.structure import STRUCTURES


def assemble_target(mass: torch.Tensor, structure: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mass, (B, K) structure, (B,) labels -> (B, K) q with q_y = 1 - m, q_c = m r_c."""
    q = mass[:, None] * structure
    return q.scatter(1, labels[:, None], (1.0 - mass)[:, None])


def soft_target_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    alpha: float,
) -> dict[str, torch.Tensor]:
    """(B, K) logits, (B,) labels, (B, K) q -> {'loss', 'loss_ce', 'loss_kd'} scalars.

    loss_kd is T^2 * KL(q || softmax(z/T)), averaged over the batch; the T^2 keeps
    its gradient scale independent of T (Hinton et al., 2015).
    """
    ce = F.cross_entropy(student_logits, labels)
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    # kl_div uses xlogy, so zero entries of q (one-hot, masked classes) are exact.
    kd = F.kl_div(log_p, target, reduction="batchmean") * temperature**2
    # alpha == 0 must be plain CE even if a target were degenerate (0 * nan = nan).
    total = ce if alpha == 0 else (1 - alpha) * ce + alpha * kd
    return {"loss": total, "loss_ce": ce.detach(), "loss_kd": kd.detach()}


@dataclasses.dataclass(frozen=True)
class SoftTarget:
    """The distiller of a cell: a mass and a structure plugin, T and alpha."""

    mass: Any
    structure: Any
    temperature: float
    alpha: float

    @classmethod
    def from_specs(
        cls, mass: Mapping[str, Any], structure: Mapping[str, Any], temperature: float, alpha: float
    ) -> "SoftTarget":
        """mass / structure: {'name': ..., **params}, as in a study file."""
        m = MASSES.build(mass["name"], {k: v for k, v in mass.items() if k != "name"})
        s = STRUCTURES.build(structure["name"], {k: v for k, v in structure.items() if k != "name"})
        return cls(m, s, temperature, alpha)

    @property
    def needs(self) -> frozenset[str]:
        """Knowledge sources ('teacher', ...) this target reads; none when alpha is 0."""
        return frozenset() if self.alpha == 0 else self.mass.needs | self.structure.needs

    def target(self, ctx: TargetContext) -> torch.Tensor:
        """(B, K) q for the batch in ``ctx``; a stop-gradient target unless the structure
        is differentiable (then gradients flow through the explanations into the model)."""
        with torch.set_grad_enabled(self.structure.differentiable and torch.is_grad_enabled()):
            return assemble_target(self.mass(ctx), self.structure(ctx), ctx.labels)

    def __call__(self, student_logits: torch.Tensor, ctx: TargetContext, alpha: float | None = None) -> dict[str, torch.Tensor]:
        """alpha: overrides ``self.alpha`` for this step (warm-up ramps)."""
        alpha = self.alpha if alpha is None else alpha
        if self.alpha == 0:  # CE only: no source needs to be present
            q = F.one_hot(ctx.labels, ctx.num_classes).to(student_logits.dtype)
        else:
            q = self.target(ctx)
        out = soft_target_loss(student_logits, ctx.labels, q, self.temperature, alpha)
        out["target_mass"] = 1.0 - q.gather(1, ctx.labels[:, None]).mean()
        return out
