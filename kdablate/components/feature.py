"""Feature and relation knowledge: terms a cell adds to its loss beside the soft target.

An arm's ``feature: [{name: at, p: 2, weight: 1000}, ...]`` adds ``weight * loss`` per term,
each loss a function of one training forward's ``Features`` (``kdablate.models.stages``) of the
student and of the teacher (run online on the same batch; its features are never cached). The
math is ``kdablate.feature_losses``' pure functions; a term that trains modules of its own (the
FitNet regressor, CRD's embedding heads) builds them in ``bind`` from the two models' feature
shapes, and they train with the student (its optimiser, its checkpoints). Each default weight is
mdistiller's CIFAR-100 value.
"""
from __future__ import annotations

import abc
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from kdablate import feature_losses as fl
from kdablate.models.stages import Features
from kdablate.registry import Registry

FEATURE_TERMS: Registry = Registry("feature term")


@dataclasses.dataclass(frozen=True)
class TermBatch:
    """What a term may read of the step beyond the features: the (B,) training-set indices of the
    batch's samples and the cell's component generator (CRD's negatives)."""

    idx: torch.Tensor | None = None
    generator: torch.Generator | None = None


class FeatureTerm(nn.Module, abc.ABC):
    """Base of the feature terms: ``params.weight * loss(student, teacher, batch)``.

    ``refusal`` says, from the two models' probe features at load, why the term cannot read
    them ('' when it can); ``bind`` builds any modules the term trains, from the same shapes.
    """

    def __init__(self, params: object) -> None:
        super().__init__()
        self.params = params

    @property
    def weight(self) -> float:
        return self.params.weight

    def refusal(self, student: Features, teacher: Features) -> str:
        return ""

    def bind(self, student: Features, teacher: Features, num_samples: int) -> None:
        """Build the modules this term trains (none by default)."""

    @abc.abstractmethod
    def loss(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        """The term's unweighted scalar loss on the two models' features of this batch."""


def spatial(f: torch.Tensor) -> bool:
    return f.dim() >= 3


@FEATURE_TERMS.register("at")
class AttentionTerm(FeatureTerm):
    """AT: the attention maps of every stage after the stem (larger maps pooled to the smaller)."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        weight: float = 1000.0
        p: float = 2.0

    def refusal(self, student: Features, teacher: Features) -> str:
        s, t = student.stages[1:], teacher.stages[1:]
        if not all(spatial(f) for f in (*s, *t)):
            return "at reads spatial feature maps; a model without them (the MLP) has none"
        if len(s) != len(t):
            return f"at pairs the stages after the stem: the student has {len(s)}, the teacher {len(t)}"
        return ""

    def loss(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        return fl.attention_transfer(student.stages[1:], teacher.stages[1:], self.params.p)


@FEATURE_TERMS.register("fitnet")
class FitNetTerm(FeatureTerm):
    """FitNets: the student's ``hint`` stage, through a trained regressor (conv-BN-ReLU, or a
    linear map for vectors), against the teacher's; a larger student map is pooled first."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        weight: float = 100.0
        hint: int = 2  # the stage index (0: the stem), as mdistiller's hint layer

    def refusal(self, student: Features, teacher: Features) -> str:
        h = self.params.hint
        for who, f in (("student", student), ("teacher", teacher)):
            if not -len(f.stages) <= h < len(f.stages):
                return f"fitnet hint stage {h} does not exist in the {who}, which has {len(f.stages)} (0 = the stem)"
        s, t = student.stages[h], teacher.stages[h]
        if s.dim() != t.dim():
            return f"fitnet's hint stages differ in kind: the student's is {s.dim()}-D, the teacher's {t.dim()}-D"
        if spatial(s) and s.shape[2] < t.shape[2]:
            return f"fitnet's student hint map ({s.shape[2]} px) is smaller than the teacher's ({t.shape[2]} px)"
        return ""

    def bind(self, student: Features, teacher: Features, num_samples: int) -> None:
        s, t = student.stages[self.params.hint], teacher.stages[self.params.hint]
        if not spatial(s):
            self.regressor = nn.Linear(s.shape[1], t.shape[1])
            return
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if s.dim() == 3 else (nn.Conv2d, nn.BatchNorm2d)
        self.regressor = nn.Sequential(conv(s.shape[1], t.shape[1], 3, padding=1), norm(t.shape[1]), nn.ReLU())

    def loss(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        s, t = student.stages[self.params.hint], teacher.stages[self.params.hint]
        if spatial(s):
            s = fl.pool_to(s, t.shape[2])
        return fl.fitnet_hint(self.regressor(s), t)


@FEATURE_TERMS.register("sp")
class SimilarityTerm(FeatureTerm):
    """SP: the batch similarity of the last feature map."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        weight: float = 3000.0

    def loss(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        return fl.similarity_preserving(student.stages[-1], teacher.stages[-1])


@FEATURE_TERMS.register("rkd")
class RelationTerm(FeatureTerm):
    """RKD: distances and angles of the pooled features."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        weight: float = 1.0
        distance: float = 25.0
        angle: float = 50.0
        squared: bool = False

    def loss(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        p = self.params
        return fl.relational(student.pooled, teacher.pooled, p.distance, p.angle, p.squared)


@FEATURE_TERMS.register("pkt")
class ProbabilisticTerm(FeatureTerm):
    """PKT: the cosine-similarity distributions of the pooled features."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        weight: float = 30000.0

    def loss(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        return fl.probabilistic_transfer(student.pooled, teacher.pooled)


@FEATURE_TERMS.register("crd")
class ContrastiveTerm(FeatureTerm):
    """CRD: the pooled features through linear embedding heads (unit length), each side scored
    against the other side's memory bank of every training sample (the positive and ``nce_k``
    uniform negatives), by NCE; the banks then take the batch by a momentum average."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        weight: float = 0.8
        feat_dim: int = 128
        nce_k: int = 16384
        nce_t: float = 0.07
        momentum: float = 0.5

        def __post_init__(self) -> None:
            if self.feat_dim < 1 or self.nce_k < 1 or self.nce_t <= 0 or not 0 <= self.momentum < 1:
                raise ValueError("feat_dim and nce_k must be >= 1, nce_t > 0 and momentum in [0, 1)")

    def bind(self, student: Features, teacher: Features, num_samples: int) -> None:
        d = self.params.feat_dim
        self.embed_s = nn.Linear(student.pooled.shape[1], d)
        self.embed_t = nn.Linear(teacher.pooled.shape[1], d)
        bound = 1.0 / math.sqrt(d / 3)  # CRD's initial bank: uniform, then kept at unit length
        g = torch.Generator().manual_seed(0)
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, F.normalize(torch.rand(num_samples, d, generator=g) * 2 * bound - bound))
        # The normalising constants Z, estimated on the first batch and then kept (-1: not yet).
        self.register_buffer("z", torch.full((2,), -1.0))

    def loss(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
        p, n = self.params, len(self.memory_s)
        if batch.idx is None:
            raise RuntimeError("crd reads the batch's sample indices; this step has none")
        idx = batch.idx.to(self.memory_s.device)
        k = min(p.nce_k, n - 1)
        negatives = torch.randint(n, (len(idx), k), generator=batch.generator).to(idx.device)
        contrast = torch.cat([idx[:, None], negatives], 1)
        v_s, v_t = F.normalize(self.embed_s(student.pooled)), F.normalize(self.embed_t(teacher.pooled.detach()))
        scores = [fl.contrast_scores(v_s, self.memory_t, contrast, p.nce_t),
                  fl.contrast_scores(v_t, self.memory_s, contrast, p.nce_t)]
        for i, x in enumerate(scores):
            # Z is estimated once, on the first batch (z < 0 until then); a where, not an if, so a
            # step never waits on the device to read z back.
            self.z[i] = torch.where(self.z[i] < 0, x.detach().mean() * n, self.z[i])
            scores[i] = x / self.z[i].clone()  # a copy: the next side's estimate writes into z
        fl.momentum_update(self.memory_s, idx, v_s, p.momentum)
        fl.momentum_update(self.memory_t, idx, v_t, p.momentum)
        return fl.nce_loss(scores[0], n) + fl.nce_loss(scores[1], n)
