"""Stage outputs and pooled features of a model: what feature and relation distillation reads.

Every registered model is ``features`` (an ``nn.Sequential`` from the input to the last feature
map) followed by a pooling and a linear ``head``. Its stages are read off ``features``' children,
by the rule mdistiller's and RepDistiller's CIFAR models follow (``feats`` = [stem, stage 1,
stage 2, ...]): the stem is the first child's output, and a stage ends with the last child before
the resolution changes, and with the last child. A model whose children do not change resolution
(the MLP) has a stage per activation. The pooled feature is the head's input: ``head(pooled)`` is
the logits, exactly.

``extract`` runs the model's own ``forward`` once, with hooks, so the logits are what training
computes and the stages are the very tensors it made (gradients flow through them).
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Features:
    """One forward's features: ``stages`` (stem first), each (B, C, *spatial) or (B, C); the (B, D)
    ``pooled`` features the head reads; the (B, K) ``logits``."""

    stages: tuple[torch.Tensor, ...]
    pooled: torch.Tensor
    logits: torch.Tensor


def stage_ends(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Indices into ``model.features`` whose outputs are the stages, stem first (see the module
    docstring), from one probe forward of two zero inputs in eval mode."""
    activations = tuple(i for i, c in enumerate(model.features) if isinstance(c, (nn.ReLU, nn.ReLU6, nn.GELU)))
    return _rule(_shapes(model, input_shape), activations)


def _shapes(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The output shape (without the batch) of each child of ``model.features``."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            h = torch.zeros(2, *input_shape, device=next(model.parameters()).device)
            shapes = []
            for child in model.features:
                h = child(h)
                shapes.append(tuple(h.shape[1:]))
    finally:
        model.train(was)
    return tuple(shapes)


@functools.lru_cache(maxsize=None)
def _rule(shapes: tuple[tuple[int, ...], ...], activations: tuple[int, ...]) -> tuple[int, ...]:
    last = len(shapes) - 1
    if all(len(s) == 1 for s in shapes):  # no resolution (the MLP): each activation ends a stage
        return tuple(dict.fromkeys((*activations, last)))
    ends = [0] + [i for i in range(1, last) if shapes[i][1:] != shapes[i + 1][1:]] + [last]
    return tuple(dict.fromkeys(ends))


def extract(model: nn.Module, x: torch.Tensor, ends: tuple[int, ...]) -> Features:
    """``model(x)`` once, with its stage outputs (``ends``: ``stage_ends``) and pooled features."""
    caught: dict[int, torch.Tensor] = {}
    pooled: list[torch.Tensor] = []
    hooks = [model.features[i].register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(i, out))
             for i in ends]
    hooks.append(model.head.register_forward_pre_hook(lambda m, args: pooled.append(args[0])))
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return Features(tuple(caught[i] for i in ends), pooled[0], logits)


def probe(model: nn.Module, inputs: torch.Tensor, ends: tuple[int, ...] | None = None) -> Features:
    """One eval-mode, gradient-free forward's ``Features`` of ``model`` (shapes for checks and builds),
    its stages ending at ``ends`` (default: ``stage_ends``)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return extract(model, inputs, stage_ends(model, tuple(inputs.shape[1:])) if ends is None else ends)
    finally:
        model.train(was)
