"""Batch normalisation written as plain tensor math, for models run under ``torch.func.vmap``.

A seed-stacked step (``kdablate.stacked``) runs S models as one through ``vmap``. On CUDA,
``torch.batch_norm`` picks its kernel by asking whether the input is channels_last-contiguous,
a question vmap's batched tensors do not answer: every stacked CNN step failed with "NYI:
querying is_contiguous inside of vmap for memory_format other than torch.contiguous_format"
(seen on an NVIDIA H200, torch 2.11). Means, variances and elementwise ops have batching rules
on every device, so this module computes batch norm from them: the same forward, running
statistics and (through autograd) gradients as ``nn.BatchNorm*d``, up to float rounding
(``tests/test_stacked.py`` checks both).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_norm_math(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                    tracked: torch.Tensor | None, batch_stats: bool, momentum: float | None,
                    eps: float) -> torch.Tensor:
    """(B, C, *spatial) -> normalised (B, C, *spatial), per channel C.

    batch_stats: normalise with this batch's mean and (biased) variance, and update the running
    mean and (unbiased) variance in place by ``momentum`` (None: the cumulative average over the
    ``tracked`` batches, as ``nn.BatchNorm``); else normalise with the running statistics.
    """
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if batch_stats:
        var, mean = torch.var_mean(x, dims, correction=0)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                n = x.numel() // x.size(1)
                if tracked is not None:
                    tracked.add_(1)
                m = (1.0 / tracked) if momentum is None else momentum
                running_mean.mul_(1 - m).add_(m * mean)
                running_var.mul_(1 - m).add_(m * var * (n / max(n - 1, 1)))
    else:
        mean, var = running_mean, running_var
    out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


class MathBatchNorm(_BatchNorm):
    """``nn.BatchNorm*d`` with the same parameters, buffers and state-dict keys, computed by
    ``batch_norm_math``. Modules become one by ``with_math_norm``, never by construction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without track_running_stats the running buffers (and the count) are None, as in nn.BatchNorm.
        return batch_norm_math(x, self.weight, self.bias, self.running_mean, self.running_var,
                               self.num_batches_tracked if self.training else None,
                               self.training or self.running_mean is None, self.momentum, self.eps)


def with_math_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose batch-norm layers are ``MathBatchNorm``: the same structure and
    state-dict keys, so ``torch.func.functional_call`` runs it with the original's weights."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            # The class alone changes: parameters, buffers and names stay as they are.
            module.__class__ = MathBatchNorm
    return model
