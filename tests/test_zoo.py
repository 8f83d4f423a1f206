"""The CIFAR distillation zoo: shapes, gradients, exact CAMs and CRD parameter counts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kdablate.models.zoo  # registers the zoo, whether or not the package imports it yet
from kdablate.models import MODELS, build_model
from kdablate.registry import ConfigError

TORCHVISION_ARCHS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small")
# Every model defined in kdablate.models.zoo, so a newly registered one is tested automatically.
ZOO = [n for n in MODELS.names() if MODELS.get(n).__module__ == kdablate.models.zoo.__name__]
CASES = [
    pytest.param(name, {"arch": arch}, id=f"{name}-{arch}")
    for name in ZOO if name == "torchvision" for arch in TORCHVISION_ARCHS
] + [pytest.param(name, {}, id=name) for name in ZOO if name != "torchvision"]
GRAYSCALE = ["resnet20", "resnet8x4", "wrn_16_2", "vgg8", "mobilenetv2", "shufflenetv2"]

# Parameter counts (millions, 100 classes) from the CRD paper's tables (Tian et al., 2020).
CRD_PARAMS = {
    "resnet20": 0.28, "resnet56": 0.86, "resnet110": 1.73, "resnet8x4": 1.23,
    "resnet32x4": 7.43, "wrn_16_2": 0.70, "wrn_40_2": 2.25, "vgg8": 3.96, "vgg13": 9.46,
    "shufflenetv2": 1.36,
}


def test_the_standard_zoo_is_registered():
    expected = {f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)} | {
        "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_2", "vgg8", "vgg13",
        "mobilenetv2", "shufflenetv2", "torchvision"}
    assert expected <= set(ZOO)


def _check_forward_backward(model: nn.Module, x: torch.Tensor, k: int) -> None:
    out = model(x)
    assert out.shape == (x.shape[0], k)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


@pytest.mark.parametrize("name, params", CASES)
def test_rgb_32px_forward_and_backward(name, params):
    torch.manual_seed(0)
    _check_forward_backward(build_model(name, params, (3, 32, 32), 10), torch.randn(2, 3, 32, 32), 10)


@pytest.mark.parametrize("name, params", [pytest.param(n, {}, id=n) for n in GRAYSCALE] + [
    pytest.param("torchvision", {"arch": a}, id=f"torchvision-{a}") for a in TORCHVISION_ARCHS])
def test_grayscale_28px_forward_and_backward(name, params):
    torch.manual_seed(0)
    _check_forward_backward(build_model(name, params, (1, 28, 28), 10), torch.randn(2, 1, 28, 28), 10)


@pytest.mark.parametrize("name, params", CASES)
def test_small_non_square_inputs_work(name, params):
    model = build_model(name, params, (3, 16, 24), 7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 24)).shape == (1, 7)


@pytest.mark.parametrize("name, params", CASES)
def test_features_and_linear_head_give_exact_cams(name, params):
    torch.manual_seed(0)
    model = build_model(name, params, (3, 32, 32), 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x), model.features(x)
        head = model.head
        assert feats.dim() == 4 and isinstance(head, nn.Linear)
        assert head.in_features == feats.shape[1]
        # Untrained deep ResNets in eval mode reach large logits, hence the relative tolerance too.
        torch.testing.assert_close(head(feats.mean((2, 3))), logits, atol=1e-5, rtol=1e-5)
        cams = torch.einsum("bchw,kc->bkhw", feats, head.weight)
        torch.testing.assert_close(cams.mean((2, 3)) + head.bias, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CRD_PARAMS))
def test_parameter_counts_match_crd(name):
    count = sum(p.numel() for p in build_model(name, {}, (3, 32, 32), 100).parameters()) / 1e6
    assert count == pytest.approx(CRD_PARAMS[name], rel=0.1)


def test_mobilenetv2_at_half_width_is_crds_student():
    model = build_model("mobilenetv2", {"width_mult": 0.5}, (3, 32, 32), 100)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(0.81, rel=0.1)


def test_resnet_width_multiplies_every_stage():
    model = build_model("resnet20", {"width": 2}, (3, 32, 32), 10).eval()
    assert model.features(torch.randn(1, 3, 32, 32)).shape == (1, 128, 8, 8)


def test_bad_parameters_fail_at_load_time():
    with pytest.raises(ConfigError, match=r"supported families: resnet\*"):
        MODELS.params("torchvision", {"arch": "vit_b_16"})
    with pytest.raises(ConfigError, match="no classification model 'resnet19'"):
        MODELS.params("torchvision", {"arch": "resnet19"})
    with pytest.raises(ConfigError, match="net_size must be one of"):
        MODELS.params("shufflenetv2", {"net_size": 0.7})
    with pytest.raises(ConfigError, match="has no parameter 'width'"):
        MODELS.params("vgg8", {"width": 2})
