"""Class-similarity structure r: how the mass spreads over the K-1 other classes.

Each plugin maps a TargetContext and the objective's T to an (N, K) tensor
that is 0 at the true class and sums to 1 over the others. ``teacher`` (``self``, ``peer``) carries that
source's class similarity, ``permuted`` keeps another structure's values but
shuffles which class gets which (so it isolates the value distribution from the
similarity), ``uniform`` carries none. The explanation-derived structure of
introspective learning lives in ``kdablate.components.explanation``.
"""
from __future__ import annotations

import dataclasses

import torch

from kdablate.components.context import Component, Need, Probe, SourceComponent, StateDict, TargetContext
from kdablate.registry import Registry

STRUCTURES: Registry = Registry("structure")


def nongt_distribution(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K) probs -> (B, K) probs with the true class zeroed and the rest renormalised.

    A row whose non-ground-truth mass underflows to 0 becomes uniform: its mass is
    0 as well, so the choice only avoids a 0/0.
    """
    r = probs.scatter(1, labels[:, None], 0.0)
    total = r.sum(1, keepdim=True)
    uniform = uniform_structure(labels, probs.shape[1], probs.dtype)
    return torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), uniform)


def uniform_structure(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B,) labels -> (B, K) with 1/(K-1) off the true class and 0 on it, in ``dtype`` (built in
    it, not cast: 1/(K-1) rounded to float32 and widened would not sum to 1 in float64)."""
    r = torch.full((labels.shape[0], num_classes), 1.0 / (num_classes - 1), dtype=dtype, device=labels.device)
    return r.scatter(1, labels[:, None], 0.0)


def permute_nongt(r: torch.Tensor, labels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Shuffle each row's non-ground-truth entries among the non-ground-truth classes.

    (B, K) r, (B,) labels, (B, K-1) uniforms (``TargetContext.uniform``, drawn on the CPU from the
    seed's generator, so reproducible on any device) whose per-row argsort is the row's
    permutation; the true-class entry stays where it is.
    """
    k = r.shape[1]
    # (B, K-1) column indices of the non-ground-truth classes, in class order: j, or j + 1 from
    # the label on (arithmetic, not a boolean mask, which costs a nonzero: x2.7 here).
    j = torch.arange(k - 1, device=r.device)
    others = j + (j >= labels[:, None])
    shuffled = r.gather(1, others.gather(1, u.argsort(dim=1).to(r.device)))
    return r.scatter(1, others, shuffled)


def class_mean_structure(r: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, K) per-sample structures -> (K, K) matrix whose row y averages the rows of class y.

    A class with no samples gets a uniform row.
    """
    sums = torch.zeros(num_classes, num_classes, dtype=r.dtype, device=r.device).index_add_(0, labels, r)
    return class_means(sums, torch.bincount(labels, minlength=num_classes).to(r.dtype))


def class_sums(r: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) per-sample structures, (N,) labels -> ((K, K) float32 per-class row sums, (K,) float32
    sample counts): a step's part of a class mean, the same arithmetic whatever the default dtype."""
    sums = torch.zeros(num_classes, num_classes, device=r.device, dtype=torch.float32).index_add_(0, labels, r.float())
    return sums, torch.bincount(labels, minlength=num_classes).float()


def class_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(K, K) per-class row sums, (K,) sample counts -> (K, K) per-class mean rows.

    A class with no samples gets the uniform row: it has no evidence of any similarity.
    """
    k = sums.shape[0]
    uniform = uniform_structure(torch.arange(k, device=sums.device), k, sums.dtype)
    c = counts[:, None]
    return torch.where(c > 0, sums / c.clamp_min(1), uniform)


@STRUCTURES.register("uniform")
class UniformStructure(Component):
    """r_c = 1/(K-1): no class similarity at all."""

    static = row_wise = True

    def __call__(self, ctx: TargetContext, temperature: float) -> torch.Tensor:
        return uniform_structure(ctx.labels, ctx.num_classes, ctx.student_logits.dtype)


class SourceStructure(SourceComponent):
    """r = the source's non-ground-truth probabilities at T, renormalised; never differentiated."""

    row_wise = True

    def __call__(self, ctx: TargetContext, temperature: float) -> torch.Tensor:
        return nongt_distribution(ctx.probs(self.source, temperature).detach(), ctx.labels)


@STRUCTURES.register("teacher")
class TeacherStructure(SourceStructure):
    """The teacher's class similarity (Hinton KD)."""

    source = "teacher"


@STRUCTURES.register("self")
class SelfStructure(SourceStructure):
    """The model's own class similarity, detached (self-distillation of outputs)."""

    source = "self"


@STRUCTURES.register("peer")
class PeerStructure(SourceStructure):
    """The cohort's class similarity (Deep Mutual Learning)."""

    source = "peer"


@STRUCTURES.register("permuted")
class PermutedStructure(Component):
    """Another structure's values, re-assigned to random classes per sample and step."""

    # Row-wise as its base is (``__init__``): its own draws are per row (``ctx.uniform``).
    row_wise = True

    @dataclasses.dataclass(frozen=True)
    class Params:
        base: str = "teacher"
        base_params: dict = dataclasses.field(default_factory=dict)

        def __post_init__(self) -> None:
            if self.base == "permuted" or self.base not in STRUCTURES:
                known = [n for n in STRUCTURES.names() if n != "permuted"]
                raise ValueError(f"base must be one of {', '.join(known)}, got '{self.base}'")
            STRUCTURES.params(self.base, self.base_params)  # fail at load time

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.base = STRUCTURES.build(params.base, params.base_params)
        self.needs = self.base.needs
        self.differentiable = self.base.differentiable
        self.row_wise = type(self).row_wise and self.base.row_wise

    def __call__(self, ctx: TargetContext, temperature: float) -> torch.Tensor:
        return permute_nongt(self.base(ctx, temperature), ctx.labels, ctx.uniform(ctx.num_classes - 1))

    def check(self, probe: Probe) -> None:
        self.base.check(probe)

    def state_dict(self) -> StateDict:
        """The base structure's state (the permutation is drawn from the cell's generator)."""
        return self.base.state_dict()

    def load_state_dict(self, state: StateDict) -> None:
        self.base.load_state_dict(state)


def oracle_structure(labels: torch.Tensor, groups: torch.Tensor, within: float) -> torch.Tensor:
    """(B,) labels, (K,) superclass of each class -> (B, K): ``within`` of the mass uniformly on
    the other classes of y's superclass, the rest uniformly on the remaining classes.

    When one side is empty (a superclass of one class), all of the mass goes to the other.
    """
    k = groups.shape[0]
    others = torch.ones(len(labels), k, dtype=torch.bool, device=labels.device).scatter(1, labels[:, None], False)
    same = (groups[labels][:, None] == groups[None, :]) & others
    far = others & ~same
    n_same, n_far = same.sum(1, keepdim=True), far.sum(1, keepdim=True)
    w_same = torch.where(n_far == 0, 1.0, torch.where(n_same == 0, 0.0, within))
    r = w_same * same / n_same.clamp_min(1) + (1 - w_same) * far / n_far.clamp_min(1)
    return r.float()


@STRUCTURES.register("oracle")
class OracleStructure(Component):
    """Ground-truth class similarity from a known hierarchy (e.g. CIFAR-100 superclasses)."""

    static = row_wise = True

    @dataclasses.dataclass(frozen=True)
    class Params:
        within: float = 0.8

        def __post_init__(self) -> None:
            if not 0.0 <= self.within <= 1.0:
                raise ValueError(f"within must be in [0, 1], got {self.within}")

    needs = Need.HIERARCHY

    def __call__(self, ctx: TargetContext, temperature: float) -> torch.Tensor:
        if ctx.class_groups is None:
            raise RuntimeError("structure 'oracle' needs a class hierarchy; this dataset has none (use cifar100)")
        return oracle_structure(ctx.labels, ctx.class_groups, self.params.within).to(ctx.student_logits.dtype)
