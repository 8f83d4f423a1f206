"""Evaluation metrics over (N, K) logits and (N,) labels, as Python floats."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).double().mean().item()


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return F.cross_entropy(logits.double(), labels).item()


def reliability(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, list[float]]:
    """Per equal-width confidence bin: sample count, summed confidence, summed correctness.

    Sums rather than means, so bins pool across seeds by addition (a reliability
    diagram over seeds is the pooled sums divided by the pooled counts).
    """
    conf, pred = torch.softmax(logits.double(), 1).max(1)
    correct = (pred == labels).double()
    # A confidence of exactly 1.0 belongs to the last bin, not one past it.
    idx = (conf * bins).long().clamp_max(bins - 1)
    return {"count": torch.bincount(idx, minlength=bins).double().tolist(),
            "conf_sum": torch.bincount(idx, conf, minlength=bins).tolist(),
            "correct_sum": torch.bincount(idx, correct, minlength=bins).tolist()}


def ece_from_bins(b: dict[str, list[float]]) -> float:
    """Expected calibration error of ``reliability`` bins: sum |conf - correct| / N."""
    gaps = sum(abs(c - k) for c, k in zip(b["conf_sum"], b["correct_sum"]))
    return gaps / max(sum(b["count"]), 1.0)


def ece(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins (Guo et al., 2017)."""
    return ece_from_bins(reliability(logits, labels, bins))


def agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Fraction of samples on which two models predict the same class."""
    return (logits_a.argmax(1) == logits_b.argmax(1)).double().mean().item()


def evaluate(
    logits: torch.Tensor, labels: torch.Tensor, split: str, teacher_logits: torch.Tensor | None = None
) -> dict[str, float]:
    """All metrics of one split, named '<split>/<metric>'."""
    out = {
        f"{split}/acc": accuracy(logits, labels),
        f"{split}/nll": nll(logits, labels),
        f"{split}/ece": ece(logits, labels),
    }
    if teacher_logits is not None:
        out[f"{split}/agreement"] = agreement(logits, teacher_logits)
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two same-shaped tensors (flattened); ties broken by order."""
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm()).clamp_min(1e-12)).item()


def offdiagonal(m: torch.Tensor) -> torch.Tensor:
    """(K, K) -> (K*(K-1),) entries off the diagonal."""
    return m[~torch.eye(m.shape[0], dtype=torch.bool)]
