"""Feature and relation knowledge as pure tensor functions: the losses of FitNets, attention
transfer (AT), similarity preserving (SP), relational KD (RKD) and probabilistic knowledge
transfer (PKT), each as the original papers define it and as mdistiller computes it (checked
against mdistiller's own values, ``tests/golden/feature_losses.json``, to 1e-10 in float64).

* FitNets (Romero et al., ICLR 2015): the MSE of the regressed student map to the teacher's.
* AT (Zagoruyko & Komodakis, ICLR 2017): per stage, the squared distance of the L2-normalised
  attention maps mean_c(f^p); the larger map is average-pooled to the smaller one's size.
* SP (Tung & Mori, ICCV 2019): the squared distance of the row-normalised batch Gram matrices,
  over B^2.
* RKD (Park et al., CVPR 2019): smooth-L1 between the students' and teacher's pairwise distances
  (each over its mean) and between their triplet angles.
* PKT (Passalis & Tefas, ECCV 2018): KL between the cosine-similarity distributions of the batch.
* CRD (Tian et al., ICLR 2020): a noise-contrastive estimate over a memory bank of every training
  sample's embedding; each side's anchor is scored against the other side's memory.

Teacher features are targets: no gradient flows into them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def fitnet_hint(regressed: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) regressed student map, the teacher's of the same shape -> mean squared error."""
    return F.mse_loss(regressed, teacher.detach())


def attention_map(feat: torch.Tensor, p: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W) the L2-normalised spatial attention mean_c(f^p)."""
    return F.normalize(feat.pow(p).mean(1).flatten(1))


def pool_to(feat: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, L) or (B, C, H, W) -> average-pooled to L = ``size`` (or ``size`` x ``size``) when larger."""
    if feat.shape[2] <= size:
        return feat
    return F.adaptive_avg_pool1d(feat, size) if feat.dim() == 3 else F.adaptive_avg_pool2d(feat, size)


def attention_transfer(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], p: float = 2) -> torch.Tensor:
    """Stages of (B, C, H, W) (or (B, C, L)) maps -> the sum over stages of the mean squared
    attention difference."""
    total = torch.zeros((), dtype=student[0].dtype, device=student[0].device)
    for s, t in zip(student, teacher):
        size = min(s.shape[2], t.shape[2])
        s, t = pool_to(s, size), pool_to(t.detach(), size)
        total = total + (attention_map(s, p) - attention_map(t, p)).pow(2).mean()
    return total


def similarity_preserving(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B, ...) student and teacher features -> || norm(G_t) - norm(G_s) ||^2 / B^2, G = the batch Gram."""
    def gram(f: torch.Tensor) -> torch.Tensor:
        f = f.flatten(1)
        return F.normalize(f @ f.t())

    b = student.shape[0]
    return (gram(teacher.detach()) - gram(student)).pow(2).sum() / (b * b)


def pairwise_distances(e: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    """(B, D) -> (B, B) Euclidean (or squared) distances, clamped below at ``eps``, 0 on the diagonal."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps)
    d = d if squared else d.sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def relational(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25, angle_weight: float = 50,
               squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """(B, ...) pooled features -> distance_weight * smooth-L1 of the mean-normalised distances +
    angle_weight * smooth-L1 of the angles every triplet makes."""
    s, t = student.flatten(1), teacher.detach().flatten(1)

    def distances(e: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(e, squared, eps)
        return d / d[d > 0].mean()

    def angles(e: torch.Tensor) -> torch.Tensor:
        diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
        return (diff @ diff.transpose(1, 2)).flatten()

    return (distance_weight * F.smooth_l1_loss(distances(s), distances(t))
            + angle_weight * F.smooth_l1_loss(angles(s), angles(t)))


def probabilistic_transfer(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """(B, D) pooled features -> the mean of q log((q + eps) / (p + eps)), p and q the rows of the
    students' and teacher's cosine similarities mapped to [0, 1] and normalised."""
    def distribution(f: torch.Tensor) -> torch.Tensor:
        f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)
        f = torch.where(torch.isnan(f), torch.zeros_like(f), f)  # a zero row: 0 / 0
        sim = (f @ f.t() + 1) / 2
        return sim / sim.sum(1, keepdim=True)

    p, q = distribution(student), distribution(teacher.detach())
    return (q * torch.log((q + eps) / (p + eps))).mean()


def nce_loss(scores: torch.Tensor, num_samples: int, eps: float = 1e-7) -> torch.Tensor:
    """(B, 1 + K) normalised scores, the positive first -> CRD's NCE loss: -(sum log h(pos) +
    sum log(1 - h(neg))) / B, h(x) = x / (x + K Pn), the noise distribution uniform (Pn = 1 / N)."""
    k, noise = scores.shape[1] - 1, 1.0 / num_samples
    pos, neg = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(pos / (pos + k * noise + eps))
    log_d0 = torch.log((k * noise) / (neg + k * noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def contrast_scores(anchor: torch.Tensor, memory: torch.Tensor, contrast: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """(B, d) unit embeddings, (N, d) the other side's memory, (B, 1 + K) indices (the positive
    first) -> (B, 1 + K) exp(<memory[j], anchor> / T), unnormalised."""
    return torch.exp(torch.bmm(memory[contrast].detach(), anchor[:, :, None]).squeeze(2) / temperature)


def momentum_update(memory: torch.Tensor, idx: torch.Tensor, embedding: torch.Tensor, momentum: float) -> None:
    """memory[idx] <- normalise(momentum * memory[idx] + (1 - momentum) * embedding), in place."""
    with torch.no_grad():
        memory[idx] = F.normalize(momentum * memory[idx] + (1 - momentum) * embedding.detach().to(memory.dtype))
