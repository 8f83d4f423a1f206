"""The soft target's tensor math: assemble q from a mass and a structure, and the loss.

Loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(q || softmax(student / T)),
the Hinton et al. (2015) form, with q assembled from independent components. The
class that owns T and alpha and calls these is ``kdablate.objectives.SoftTargetObjective``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def assemble_target(mass: torch.Tensor, structure: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mass, (B, K) structure, (B,) labels -> (B, K) q with q_y = 1 - m, q_c = m r_c."""
    q = mass[:, None] * structure  # promoted: a mass and a structure may come at different precisions
    return q.scatter(1, labels[:, None], (1.0 - mass)[:, None].to(q.dtype))


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
    if alpha != 0 and not target.requires_grad:  # the usual stop-gradient target: one fused node
        total, ce, kd = _FusedSoftTargetLoss.apply(student_logits, labels, target, temperature, alpha)
        return {"loss": total, "loss_ce": ce, "loss_kd": kd}
    ce, kd = _ce_and_kd(student_logits, labels, target, temperature)
    # alpha == 0 must be plain CE even if a target were degenerate (0 * nan = nan).
    total = ce if alpha == 0 else (1 - alpha) * ce + alpha * kd
    return {"loss": total, "loss_ce": ce.detach(), "loss_kd": kd.detach()}


def _ce_and_kd(z: torch.Tensor, labels: torch.Tensor, target: torch.Tensor, temperature: float,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    ce = F.cross_entropy(z, labels)
    log_p = F.log_softmax(z / temperature, dim=1)
    # kl_div uses xlogy, so zero entries of q (one-hot, masked classes) are exact.
    return ce, F.kl_div(log_p, target, reduction="batchmean") * temperature**2


def log_softmax_rows(z: torch.Tensor) -> torch.Tensor:
    """log_softmax over dim 1 of (B, K) logits, the same values.

    For K < 16 torch's CPU kernel over a short last dim costs ~20 us at B = 128 (measured
    here, torch 2.14), 4x the same kernel over dim 0 of the transposed view.
    """
    if z.shape[1] < 16 and not z.is_cuda:
        return F.log_softmax(z.t(), dim=0).t()
    return F.log_softmax(z, dim=1)


def _row_gradients(log_p1: torch.Tensor, log_pt: torch.Tensor, labels: torch.Tensor, target: torch.Tensor,
                   temperature: float, alpha: float) -> torch.Tensor:
    """(N, K) d/dz of each row's (1 - a) CE + a T^2 KL(q || softmax(z/T)), unscaled by the batch:
    (1 - a)(softmax(z) - onehot(y)) + a T (softmax(z/T) - q)."""
    grad = torch.add(log_p1.exp().mul_(1 - alpha), log_pt.exp().sub_(target), alpha=alpha * temperature)
    return grad.scatter_add_(1, labels[:, None], grad.new_full((len(labels), 1), alpha - 1))


class _FusedSoftTargetLoss(torch.autograd.Function):
    """(1 - a) CE + a T^2 KL(q || softmax(z/T)) as one autograd node, q a constant.

    The gradient is written out, [(1 - a)(softmax(z) - onehot(y)) + a T (softmax(z/T) - q)] / B,
    instead of a dozen small backward nodes: on a sub-millisecond step those nodes cost more
    than the model (measured: a KD step x1.3 a CE step on the MLP, ~x1.1 fused).
    """

    @staticmethod
    def forward(ctx, z, labels, target, temperature, alpha):  # noqa: ANN001, ANN205
        log_p1 = log_softmax_rows(z)
        ce = F.nll_loss(log_p1, labels)
        log_pt = log_softmax_rows(z / temperature)
        kd = F.kl_div(log_pt, target, reduction="batchmean") * temperature**2
        total = (1 - alpha) * ce + alpha * kd
        ctx.save_for_backward(log_p1, log_pt, labels, target)
        ctx.temperature, ctx.alpha = temperature, alpha
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):  # noqa: ANN001, ANN205
        grad = _row_gradients(*ctx.saved_tensors, ctx.temperature, ctx.alpha)
        return grad.mul_(grad_total / len(grad)), None, None, None, None


class _FusedStackedSoftTargetLoss(torch.autograd.Function):
    """``_FusedSoftTargetLoss`` for S seeds' batches at once, (S*B, K) rows, seed-major: the
    seeds' losses summed (each seed's a mean over its own B rows), and each seed's parts.

    Summing per-seed means gives each seed's logits exactly its own gradient, so one node
    replaces S (a stacked step of 10 MLP seeds spent more on S objective calls than on the model).
    """

    @staticmethod
    def forward(ctx, z, labels, target, temperature, alpha, seeds):  # noqa: ANN001, ANN205
        batch = len(labels) // seeds
        log_p1 = log_softmax_rows(z)
        ce = F.nll_loss(log_p1, labels, reduction="none").view(seeds, batch).mean(1)
        log_pt = log_softmax_rows(z / temperature)
        kd = F.kl_div(log_pt, target, reduction="none").sum(1).view(seeds, batch).mean(1) * temperature**2
        per_seed = (1 - alpha) * ce + alpha * kd
        ctx.save_for_backward(log_p1, log_pt, labels, target)
        ctx.temperature, ctx.alpha, ctx.batch = temperature, alpha, batch
        ctx.mark_non_differentiable(per_seed, ce, kd)
        return per_seed.sum(), per_seed, ce, kd

    @staticmethod
    def backward(ctx, grad_total, _per_seed, _grad_ce, _grad_kd):  # noqa: ANN001, ANN205
        grad = _row_gradients(*ctx.saved_tensors, ctx.temperature, ctx.alpha)
        return grad.mul_(grad_total / ctx.batch), None, None, None, None, None


def stacked_soft_target_loss(z: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None,
                             temperature: float, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(S, B, K) logits, (S, B) labels, (S, B, K) stop-gradient q (None: CE alone) -> (the sum over
    seeds of each seed's ``soft_target_loss``, and its parts as (S,) tensors: 'loss', 'loss_ce',
    and 'loss_kd' unless CE alone). Seed s's values equal ``soft_target_loss`` on its own batch
    up to float rounding."""
    seeds, batch, k = z.shape
    flat_z, flat_y = z.reshape(seeds * batch, k), labels.reshape(-1)
    if target is None:  # ce_only_loss: only the terms the arm has
        ce = F.cross_entropy(flat_z, flat_y, reduction="none").view(seeds, batch).mean(1)
        return ce.sum(), {"loss": ce.detach(), "loss_ce": ce.detach()}
    total, per_seed, ce, kd = _FusedStackedSoftTargetLoss.apply(
        flat_z, flat_y, target.reshape(seeds * batch, k), temperature, alpha, seeds)
    return total, {"loss": per_seed, "loss_ce": ce, "loss_kd": kd}


def ce_only_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """soft_target_loss with the one-hot target and alpha = 0, without building the target.

    Only the terms the arm has are logged: a CE arm has no KD term and no target mass, so
    logging them (a KL of the one-hot label equal to the CE itself) would put a fake
    'train/loss_kd' beside the real ones in a comparison.
    """
    ce = F.cross_entropy(student_logits, labels)
    return {"loss": ce, "loss_ce": ce.detach()}
