"""Non-ground-truth mass m: how much probability a soft target moves off the true class.

``none`` gives the hard label, ``constant`` label smoothing / Tf-KD's virtual
teacher, ``teacher`` the per-sample mass of a teacher at temperature T (Hinton KD).
Each plugin maps a TargetContext to a (B,) tensor in [0, 1].
"""
from __future__ import annotations

import dataclasses

import torch

from kdablate.components.context import Component, TargetContext, teacher_probs
from kdablate.registry import Registry

MASSES: Registry = Registry("mass")


def mass_from_probs(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K) probabilities, (B,) labels -> (B,) mass 1 - p[y]."""
    return 1.0 - probs.gather(1, labels[:, None]).squeeze(1)


@MASSES.register("none")
class NoMass(Component):
    """m = 0: the one-hot label."""

    def __call__(self, ctx: TargetContext) -> torch.Tensor:
        return torch.zeros(ctx.labels.shape[0], dtype=ctx.student_logits.dtype)


@MASSES.register("constant")
class ConstantMass(Component):
    """m = eps for every sample."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        eps: float = 0.1

        def __post_init__(self) -> None:
            if not 0.0 <= self.eps <= 1.0:
                raise ValueError(f"eps must be in [0, 1], got {self.eps}")

    def __init__(self, params: Params) -> None:
        super().__init__(params)

    def __call__(self, ctx: TargetContext) -> torch.Tensor:
        return torch.full((ctx.labels.shape[0],), self.params.eps, dtype=ctx.student_logits.dtype)


@MASSES.register("teacher")
class TeacherMass(Component):
    """m = 1 - p_teacher,T[y], per sample."""

    needs: frozenset[str] = frozenset({"teacher"})

    def __call__(self, ctx: TargetContext) -> torch.Tensor:
        return mass_from_probs(teacher_probs(ctx, "mass 'teacher'"), ctx.labels)
