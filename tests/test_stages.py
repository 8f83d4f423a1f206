"""The model registry's feature contract (``kdablate.models.stages``), over every registered model:
one forward gives the stages (stem first) and the pooled features, the logits are the model's own,
``head(pooled)`` is the logits, and gradients reach every stage. What feature and relation
distillation (FitNets, AT, SP, RKD, PKT, CRD) read."""
from __future__ import annotations

import pytest
import torch

from kdablate.models import MODELS, build_model
from kdablate.models.stages import extract, stage_ends


def built(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    shape = (1, 40) if name in ("mlp", "cnn1d") else (3, 32, 32)
    params = {"arch": "resnet18"} if name == "torchvision" else {}
    torch.manual_seed(0)
    return build_model(name, params, shape, 10), shape


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_gives_its_stages_and_pooled_features_in_its_own_forward(name):
    model, shape = built(name)
    model.eval()  # batch statistics would differ between two forwards in train mode
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    ends = stage_ends(model, shape)
    feats = extract(model, x, ends)
    assert torch.equal(feats.logits, model(x))
    torch.testing.assert_close(model.head(feats.pooled), feats.logits, rtol=0, atol=0)
    assert len(feats.stages) >= 2 and all(len(s) == len(x) for s in feats.stages)
    assert torch.equal(feats.stages[-1], model.features(x))  # the last stage is the last feature map
    assert list(ends) == sorted(set(ends)) and ends[-1] == len(model.features) - 1
    if len(shape) == 3:  # an image model: each stage's map is no larger than the one before
        sizes = [s.shape[-1] * s.shape[-2] for s in feats.stages]
        assert sizes == sorted(sizes, reverse=True), sizes


@pytest.mark.parametrize("name", MODELS.names())
def test_gradients_of_a_feature_loss_reach_the_student_through_every_stage(name):
    model, shape = built(name)
    feats = extract(model, torch.randn(4, *shape), stage_ends(model, shape))
    sum(s.pow(2).mean() for s in feats.stages).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.features.parameters())


def test_the_cifar_resnet_stages_are_the_reference_feats():
    """resnet20 as mdistiller's ``feats``: the stem (16, 32, 32), then stages of 16, 32, 64 channels
    at 32, 16 and 8 px."""
    model, shape = built("resnet20")
    feats = extract(model, torch.randn(2, *shape), stage_ends(model, shape))
    assert [tuple(s.shape[1:]) for s in feats.stages] == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert tuple(feats.pooled.shape) == (2, 64)
