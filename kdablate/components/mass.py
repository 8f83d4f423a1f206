"""Non-ground-truth mass m: how much probability a soft target moves off the true class.

``none`` gives the hard label, ``constant`` label smoothing, ``virtual_teacher``
Tf-KD's virtual teacher (Yuan et al., CVPR 2020), and ``teacher`` / ``self`` /
``peer`` the per-sample mass 1 - p[y] of that source at temperature T (Hinton KD,
introspective learning, Deep Mutual Learning). Each plugin maps a TargetContext
and the objective's T to an (N,) tensor in [0, 1].
"""
from __future__ import annotations

import dataclasses
import math

import torch

from kdablate.components.context import Component, SourceComponent, TargetContext
from kdablate.registry import Registry

MASSES: Registry = Registry("mass")


def mass_from_probs(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K) probabilities, (B,) labels -> (B,) mass 1 - p[y]."""
    return 1.0 - probs.gather(1, labels[:, None]).squeeze(1)


def per_sample(ctx: TargetContext, value: float) -> torch.Tensor:
    """(B,) ``value`` for every sample of the batch, in the student's dtype and device."""
    return torch.full((ctx.labels.shape[0],), value, dtype=ctx.student_logits.dtype, device=ctx.labels.device)


def virtual_teacher_mass(a: float, temperature: float, num_classes: int) -> float:
    """1 - softmax(p^d / T)[y] for Tf-KD's p^d: a on the true class, (1-a)/(K-1) elsewhere."""
    on, off = a / temperature, (1 - a) / ((num_classes - 1) * temperature)
    return 1.0 - 1.0 / (1.0 + (num_classes - 1) * math.exp(off - on))


@MASSES.register("none")
class NoMass(Component):
    """m = 0: the one-hot label."""

    static = row_wise = True

    def __call__(self, ctx: TargetContext, temperature: float) -> torch.Tensor:
        return per_sample(ctx, 0.0)


@MASSES.register("constant")
class ConstantMass(Component):
    """m = eps for every sample."""

    static = row_wise = True

    @dataclasses.dataclass(frozen=True)
    class Params:
        eps: float = 0.1

        def __post_init__(self) -> None:
            if not 0.0 <= self.eps <= 1.0:
                raise ValueError(f"eps must be in [0, 1], got {self.eps}")

    def __call__(self, ctx: TargetContext, temperature: float) -> torch.Tensor:
        return per_sample(ctx, self.params.eps)


@MASSES.register("virtual_teacher")
class VirtualTeacherMass(Component):
    """Tf-KD-reg: the mass of softmax(p^d / T), p^d = a on y and (1-a)/(K-1) elsewhere."""

    static = row_wise = True

    @dataclasses.dataclass(frozen=True)
    class Params:
        a: float = 0.9

        def __post_init__(self) -> None:
            if not 0.0 < self.a < 1.0:
                raise ValueError(f"a must be in (0, 1), got {self.a}")

    def __call__(self, ctx: TargetContext, temperature: float) -> torch.Tensor:
        return per_sample(ctx, virtual_teacher_mass(self.params.a, temperature, ctx.num_classes))


class SourceMass(SourceComponent):
    """m = 1 - softmax(z_source / T)[y], per sample, never differentiated."""

    row_wise = True

    def __call__(self, ctx: TargetContext, temperature: float) -> torch.Tensor:
        return mass_from_probs(ctx.probs(self.source, temperature).detach(), ctx.labels)


@MASSES.register("teacher")
class TeacherMass(SourceMass):
    """m = 1 - p_teacher,T[y]."""

    source = "teacher"


@MASSES.register("self")
class SelfMass(SourceMass):
    """m = 1 - stopgrad(p_student,T[y]): the model's own mass (introspective learning)."""

    source = "self"


@MASSES.register("peer")
class PeerMass(SourceMass):
    """m = 1 - p_peer,T[y]: the cohort's mass (Deep Mutual Learning)."""

    source = "peer"
