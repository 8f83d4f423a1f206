"""What a knowledge component may read when it builds its part of a soft target."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class TargetContext:
    """One batch's view for the components.

    labels: (B,) int64 ground truth.
    num_classes: K.
    temperature: T, already to be applied to any reference logits.
    student_logits: (B, K) the student's logits, detached.
    teacher_logits: (B, K) a teacher's logits, or None when no teacher is loaded.
    generator: the cell's RNG, so random components are reproducible per seed.
    """

    labels: torch.Tensor
    num_classes: int
    temperature: float
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    generator: torch.Generator | None = None

    def require_teacher(self, who: str) -> torch.Tensor:
        if self.teacher_logits is None:
            raise RuntimeError(f"{who} needs a teacher, but none was loaded for this cell")
        return self.teacher_logits


class Component:
    """Base of mass and structure plugins: holds the checked ``Params``.

    ``needs`` names the knowledge sources the component reads ('teacher', ...),
    so the trainer loads only what a cell uses.
    """

    needs: frozenset[str] = frozenset()

    def __init__(self, params: object) -> None:
        self.params = params

    def __call__(self, ctx: TargetContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def teacher_probs(ctx: TargetContext, who: str) -> torch.Tensor:
    """(B, K) softmax(teacher_logits / T)."""
    return torch.softmax(ctx.require_teacher(who) / ctx.temperature, dim=1)
