"""The model registry and its one factory.

Every model maps (B, *input_shape) to (B, K) logits.
"""
from __future__ import annotations

from torch import nn

from kdablate.registry import Registry

MODELS: Registry = Registry("model")


def build_model(name: str, params: dict, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model plugin ``name`` with ``params``, for inputs of ``input_shape``."""
    cls = MODELS.get(name)
    return cls(MODELS.params(name, params), input_shape, num_classes)
