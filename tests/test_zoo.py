"""The CIFAR distillation zoo: shapes, gradients, exact CAMs and CRD parameter counts."""
from __future__ import annotations

import itertools

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
GRAYSCALE = ["resnet20", "resnet8x4", "resnet50", "wrn_16_2", "vgg8", "mobilenetv2", "shufflenetv1",
             "shufflenetv2"]

# Parameter counts (millions, 100 classes) from the CRD paper's tables (Tian et al., 2020):
# Table 1 (same-family pairs, WRN-40-1 among its students) and Table 2 (cross-family pairs:
# ResNet50 as teacher, ShuffleNetV1 / V2 as students).
CRD_PARAMS = {
    "resnet20": 0.28, "resnet56": 0.86, "resnet110": 1.73, "resnet8x4": 1.23,
    "resnet32x4": 7.43, "wrn_16_2": 0.70, "wrn_40_1": 0.57, "wrn_40_2": 2.25, "vgg8": 3.96,
    "vgg13": 9.46, "shufflenetv2": 1.36, "shufflenetv1": 0.95, "resnet50": 23.71,
}


# Independent counts of CRD's reference architectures (github.com/HobbitLong/RepDistiller,
# models/*.py), by arithmetic over their layer lists, never by building a model:
# a k x k conv has k*k*c_in/groups*c_out weights (+ c_out bias), BatchNorm 2c, the linear
# classifier (c + 1) * 100.
def _conv(c_in: int, c_out: int, k: int = 3, groups: int = 1, bias: bool = False) -> int:
    return k * k * c_in // groups * c_out + (c_out if bias else 0)


def _bn(c: int) -> int:
    return 2 * c


def _linear(c: int) -> int:
    return (c + 1) * 100


def _ref_vgg(cfg: list[list[int]]) -> int:
    """vgg.py's ``VGG(cfg, batch_norm=True)``: conv (with bias) + BN per entry, Linear(512, K)."""
    count, c_in = 0, 3
    for c in itertools.chain(*cfg):
        count, c_in = count + _conv(c_in, c, bias=True) + _bn(c), c
    return count + _linear(c_in)


def _ref_wrn(depth: int, widen: int) -> int:
    """wrn.py's ``WideResNet``: conv stem of 16; BN, conv, BN, conv (+ 1x1 where widths differ)."""
    count, c_in = _conv(3, 16), 16
    for c in (16 * widen, 32 * widen, 64 * widen):
        for _ in range((depth - 4) // 6):
            shortcut = _conv(c_in, c, 1) if c_in != c else 0
            count, c_in = count + _bn(c_in) + _conv(c_in, c) + _bn(c) + _conv(c, c) + shortcut, c
    return count + _bn(c_in) + _linear(c_in)


def _ref_resnet50() -> int:
    """resnetv2.py's ``ResNet50``: 3x3 stem of 64, Bottlenecks [3, 4, 6, 3], expansion 4."""
    count, c_in = _conv(3, 64) + _bn(64), 64
    for planes, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        c = 4 * planes
        for j in range(n):
            count += _conv(c_in, planes, 1) + _bn(planes) + _conv(planes, planes) + _bn(planes)
            count += _conv(planes, c, 1) + _bn(c)
            if (j == 0 and stride != 1) or c_in != c:
                count += _conv(c_in, c, 1) + _bn(c)
            c_in = c
    return count + _linear(c_in)


def _ref_shufflenetv1() -> int:
    """ShuffleNetv1.py's ``ShuffleV1``: 1x1 stem of 24; stages 240/480/960 of 4/8/4 units, groups 3,
    a stage's first unit making ``out - in`` channels; the 1x1 on the stem's 24 channels ungrouped."""
    count, c_in = _conv(3, 24, 1) + _bn(24), 24
    for c, n in ((240, 4), (480, 8), (960, 4)):
        for j in range(n):
            out = c - c_in if j == 0 else c
            mid, g = out // 4, 1 if c_in == 24 else 3
            count += _conv(c_in, mid, 1, g) + _bn(mid) + _conv(mid, mid, 3, mid) + _bn(mid)
            count, c_in = count + _conv(mid, out, 1, 3) + _bn(out), c
    return count + _linear(c_in)


VGG_CFG = {  # vgg.py's cfg: S (vgg8), A (vgg11), B (vgg13), D (vgg16), E (vgg19)
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}
REFERENCE_COUNTS = {
    **{name: _ref_vgg(cfg) for name, cfg in VGG_CFG.items()},
    **{f"wrn_{d}_{w}": _ref_wrn(d, w) for d in (16, 40) for w in (1, 2)},
    "resnet50": _ref_resnet50(), "shufflenetv1": _ref_shufflenetv1(),
}


def test_the_standard_zoo_is_registered():
    expected = {f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)} | {
        "resnet8x4", "resnet32x4", "resnet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
        "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "mobilenetv2", "shufflenetv1", "shufflenetv2",
        "torchvision"}
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


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_parameter_counts_equal_crds_reference_code(name):
    """Exact: the same layers as RepDistiller's, including ones the paper's tables do not list."""
    assert sum(p.numel() for p in build_model(name, {}, (3, 32, 32), 100).parameters()) == REFERENCE_COUNTS[name]


@pytest.mark.parametrize("name", sorted(set(REFERENCE_COUNTS) & set(CRD_PARAMS)))
def test_reference_counts_agree_with_the_paper(name):
    """The arithmetic above is checked against every number the paper gives for it, to the
    paper's last digit (its two decimals are sometimes cut, not rounded: 3.965M is "3.96M")."""
    assert REFERENCE_COUNTS[name] / 1e6 == pytest.approx(CRD_PARAMS[name], abs=0.01)


def test_last_feature_maps_are_4x4_on_32px_like_crds():
    """CRD's last maps at 32 px: (B, 2048, 4, 4), (B, 960, 4, 4), (B, 64k, 8, 8), (B, 512, 4, 4)."""
    x = torch.randn(1, 3, 32, 32)
    expected = {"resnet50": (2048, 4, 4), "shufflenetv1": (960, 4, 4), "wrn_16_1": (64, 8, 8),
                "wrn_40_1": (64, 8, 8), "vgg11": (512, 4, 4), "vgg16": (512, 4, 4), "vgg19": (512, 4, 4)}
    for name, shape in expected.items():
        with torch.no_grad():
            assert build_model(name, {}, (3, 32, 32), 100).eval().features(x).shape[1:] == shape, name


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


@pytest.mark.parametrize("name", MODELS.names())
def test_param_count_from_the_spec_is_the_built_models(name):
    """What the load check sizes a model by (its own formula or a meta-device build) is what
    building it makes: so a spec too large to build is refused before anything is allocated."""
    from kdablate.models.factory import param_count

    shape = (1, 40) if name in ("mlp", "cnn1d") else (3, 32, 32)
    for params in ({}, *SIZE_VARIANTS.get(name, ())):
        try:
            model = build_model(name, params, shape, 10)
        except Exception:  # noqa: BLE001 - a model that cannot take this shape is not this test's
            continue
        assert param_count(name, params, shape, 10) == sum(p.numel() for p in model.parameters())


SIZE_VARIANTS = {"mlp": ({"depth": 0}, {"depth": 3, "hidden": 7}),
                 "cnn1d": ({"depth": 1}, {"depth": 3, "channels": 7, "kernel": 3})}
