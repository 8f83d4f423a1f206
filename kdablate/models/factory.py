"""The model registry, its one factory, and where a built model is put.

Every model maps (B, *input_shape) to (B, K) logits.
"""
from __future__ import annotations

import torch
from torch import nn

from kdablate.registry import Registry

MODELS: Registry = Registry("model")


def build_model(name: str, params: dict, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model plugin ``name`` with ``params``, for inputs of ``input_shape``."""
    cls = MODELS.get(name)
    return cls(MODELS.params(name, params), input_shape, num_classes)


def place_model(model: nn.Module, input_shape: tuple[int, ...], device: str | torch.device = "cpu") -> nn.Module:
    """``model`` on ``device``, in the memory layout of its inputs: channels_last for images,
    (C, H, W) inputs, whose batches ``kdablate.data.bundle.batch_layout`` lays out channels_last too
    (a convolution whose weights and input disagree in layout converts one of them every call)."""
    model = model.to(device)
    if len(input_shape) == 3:
        model = model.to(memory_format=torch.channels_last)
    return model


MAX_PARAMS = 2_000_000_000  # 8 GB of fp32 weights: past this a spec is a typo, not a model


def param_count(name: str, params: dict, input_shape: tuple[int, ...], num_classes: int) -> int:
    """How many parameters ``build_model`` would make, without allocating them: the model's own
    ``param_count`` from its spec (models whose size grows by a loop, such as a depth), else a
    build on the meta device (shapes only, no memory)."""
    cls = MODELS.get(name)
    parsed = MODELS.params(name, params)
    if hasattr(cls, "param_count"):
        return int(cls.param_count(parsed, input_shape, num_classes))
    with torch.device("meta"):
        model = cls(parsed, input_shape, num_classes)
    return sum(p.numel() for p in model.parameters())
