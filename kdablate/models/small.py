"""Small models for the default data: a 1-D CNN teacher and an MLP student.

Every model maps (B, *input_shape) to (B, K) logits. CNNs end in global average
pooling and one linear layer, so class activation maps are available later.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from kdablate.models.factory import MODELS


@MODELS.register("mlp")
class MLP(nn.Module):
    """Fully connected ReLU network on the flattened input."""

    linear_glue = True  # forward only composes its modules (``kdablate.linearized``)

    @dataclasses.dataclass(frozen=True)
    class Params:
        hidden: int = 100
        depth: int = 2

    def __init__(self, params: Params, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for _ in range(params.depth):
            layers += [nn.Linear(width, params.hidden), nn.ReLU()]
            width = params.hidden
        # features / head split, so CAM-style explanations see the last hidden layer.
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @staticmethod
    def param_count(params: Params, input_shape: tuple[int, ...], num_classes: int) -> int:
        """The parameters ``__init__`` would make, from the spec alone (checked before building)."""
        width, h = math.prod(input_shape), params.hidden
        if params.depth < 1:
            return width * num_classes + num_classes
        return width * h + h + (params.depth - 1) * (h * h + h) + h * num_classes + num_classes

    def stacked_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """(S, B, *input_shape) -> (S, B, K): S MLPs at once, ``params`` this model's parameters
        with a leading seed dimension (``kdablate.stacked``). One ``baddbmm`` per layer, the
        same math as ``vmap`` over ``forward`` without its per-call overhead (x1.5 on a step)."""
        layers = [f"features.{i}" for i, m in enumerate(self.features) if isinstance(m, nn.Linear)] + ["head"]
        h = x.flatten(2)
        for i, name in enumerate(layers):
            h = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h, params[f"{name}.weight"].transpose(1, 2))
            h = torch.relu(h) if i < len(layers) - 1 else h
        return h


@MODELS.register("cnn1d")
class CNN1D(nn.Module):
    """Conv-BN-ReLU blocks over a (B, C, L) signal, then global average pooling."""

    linear_glue = True  # forward composes its modules and a mean (``kdablate.linearized``)

    @dataclasses.dataclass(frozen=True)
    class Params:
        channels: int = 64
        depth: int = 4
        kernel: int = 5

    def __init__(self, params: Params, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = input_shape[0]
        for i in range(params.depth):
            # Downsample after the first block only: MNIST-1D signals are short (40).
            stride = 2 if i == 1 else 1
            blocks += [
                nn.Conv1d(c_in, params.channels, params.kernel, stride, params.kernel // 2, bias=False),
                nn.BatchNorm1d(params.channels),
                nn.ReLU(),
            ]
            c_in = params.channels
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(params.channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=-1))

    @staticmethod
    def param_count(params: Params, input_shape: tuple[int, ...], num_classes: int) -> int:
        """The parameters ``__init__`` would make, from the spec alone (checked before building)."""
        c, k, d = params.channels, params.kernel, max(params.depth, 0)
        convs = (input_shape[0] * c * k + (d - 1) * c * c * k + d * 2 * c) if d else 0  # conv weights, BN affine
        return convs + c * num_classes + num_classes
