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


def evaluate(logits: torch.Tensor, labels: torch.Tensor, split: str) -> dict[str, float]:
    """A model's (N, K) logits against the (N,) labels of one split: '<split>/acc', 'nll' and 'ece'
    (what else is read off them is a measurement's, ``kdablate.measures``)."""
    return {
        f"{split}/acc": accuracy(logits, labels),
        f"{split}/nll": nll(logits, labels),
        f"{split}/ece": ece(logits, labels),
    }


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """(N,) values -> (N,) float64 ranks 1..N; each run of equal values gets the mean of its ranks.

    scipy's 'average' method: ranks depend only on the values, never on their
    positions, so relabelling the classes of a matrix cannot change a correlation.
    """
    values, order = x.sort(stable=True)
    _, run_of, run_len = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    # A run covering sorted positions [end - len, end) holds ranks end - len + 1 .. end.
    end = run_len.cumsum(0).double()
    mean_rank = end - (run_len.double() - 1) / 2
    return torch.empty(x.shape, dtype=torch.float64, device=x.device).scatter_(0, order, mean_rank[run_of])


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two same-shaped tensors (flattened), ties given average ranks.

    Equals ``scipy.stats.spearmanr``: NaN when either side is constant (its ranks
    have no spread) or holds a NaN, or with fewer than two values.
    """
    if a.shape != b.shape:
        raise ValueError(f"spearman needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.detach().flatten(), b.detach().flatten()
    if a.numel() < 2 or a.isnan().any() or b.isnan().any():
        return float("nan")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    # Ranks are exact halves, so a constant side centres to exactly 0 and 0 / 0 gives NaN;
    # the clamp only trims rounding past +-1 (scipy clips too).
    return (ra @ rb / (ra.norm() * rb.norm())).clamp(-1.0, 1.0).item()


def offdiagonal(m: torch.Tensor) -> torch.Tensor:
    """(K, K) -> (K*(K-1),) entries off the diagonal."""
    return m[~torch.eye(m.shape[0], dtype=torch.bool, device=m.device)]
