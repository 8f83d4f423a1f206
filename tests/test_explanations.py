"""Every explanation source against captum's per-class equivalent, to 1e-5, on 1-D models and a
2-D zoo ResNet (Grad-CAM at inner layers too), and CAM's identity with Grad-CAM."""
from __future__ import annotations

import math

import pytest
import torch

import captum.attr as captum_attr

from kdablate.components.explanation import explanation_similarity, structure_from_similarity
from kdablate.attribution import EXPLANATIONS, class_activation_maps, module_at
from kdablate.models import MODELS, build_model

K = 10


def model_and_inputs(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A float64 eval-mode model and its inputs: (6, 1, 40) signals, or (2, 3, 32, 32) images
    for the zoo's resnet8."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "resnet8":
        model = build_model(name, {}, (3, 32, 32), K).double().eval()
        return model, torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=g)
    params = {"hidden": 32} if name == "mlp" else {"channels": 8, "depth": 2}
    model = build_model(name, params, (1, 40), K).double().eval()
    return model, torch.randn(6, 1, 40, dtype=torch.float64, generator=g)


def per_class(fn) -> torch.Tensor:
    """Stack captum's single-class attributions into (B, K, ...)."""
    return torch.stack([fn(c) for c in range(K)], dim=1)


def captum_reference(source: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if source == "saliency":
        sal = captum_attr.Saliency(model)
        return per_class(lambda c: sal.attribute(x, target=c, abs=False))
    if source == "grad_input":
        ixg = captum_attr.InputXGradient(model)
        return per_class(lambda c: ixg.attribute(x, target=c))
    if source == "integrated_gradients":
        ig = captum_attr.IntegratedGradients(model)
        return per_class(lambda c: ig.attribute(x, baselines=0.0, target=c, n_steps=32, method="riemann_middle"))
    if source == "gradcam":
        gc = captum_attr.LayerGradCam(model, model.features)
        return per_class(lambda c: gc.attribute(x, target=c, relu_attributions=True).squeeze(1))
    if source == "cam":
        # CAM is Grad-CAM without the ReLU for a GAP + linear head, up to the 1/L of the pooling
        # (L = the number of positions, H * W for images).
        gc = captum_attr.LayerGradCam(model, model.features)
        positions = math.prod(model.features(x).shape[2:])
        return per_class(lambda c: gc.attribute(x, target=c).squeeze(1)) * positions
    raise AssertionError(f"no captum reference for '{source}': add one")


# captum's layer methods need a spatial feature map: the MLP's CAM is tested on its own below.
CASES = [(m, s) for m in ("cnn1d", "mlp", "resnet8") for s in EXPLANATIONS.names()
         if not (m == "mlp" and s in ("cam", "gradcam"))]


@pytest.mark.parametrize("model_name,source", CASES)
def test_matches_captum(source, model_name):
    model, x = model_and_inputs(model_name)
    ours = EXPLANATIONS.build(source).attribute(model, x)
    ref = captum_reference(source, model, x)
    assert ours.shape == ref.shape and ours.shape[:2] == (len(x), K)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# Grad-CAM away from the default layer: a whole stage-2 block (16 x 16), the first conv-BN-ReLU
# inside a stage-1 block (32 x 32), and a BatchNorm whose output is signed (32 x 32).
LAYERS = {"features": (8, 8), "features.2": (16, 16), "features.1.body.0": (32, 32), "features.1.body.1.1": (32, 32)}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_gradcam_at_any_layer_of_a_2d_resnet_matches_captum(layer):
    model, x = model_and_inputs("resnet8")
    ours = EXPLANATIONS.build("gradcam", {"layer": layer}).attribute(model, x)
    gc = captum_attr.LayerGradCam(model, module_at(model, layer))
    ref = per_class(lambda c: gc.attribute(x, target=c, relu_attributions=True).squeeze(1))
    assert ours.shape == ref.shape == (len(x), K, *LAYERS[layer])
    assert (ref > 0).any() and (ref == 0).any()  # the ReLU cut something, and left something
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", ["resnet8", "cnn1d"])
def test_cam_is_positions_times_gradcam_without_relu(model_name):
    """For GAP + linear, dz_c/dA_k(l) = w_ck / L at every position l, so Grad-CAM's channel
    weights are w_ck / L and, without its ReLU, Grad-CAM = CAM / L; L = H * W (or the length).
    Neither has the bias: CAM averaged over the positions is the logit minus it."""
    model, x = model_and_inputs(model_name)
    cam = EXPLANATIONS.build("cam").attribute(model, x)
    gradcam = EXPLANATIONS.build("gradcam", {"relu": False}).attribute(model, x)
    positions = math.prod(model.features(x).shape[2:])
    assert cam.shape == gradcam.shape and positions == math.prod(cam.shape[2:]) > 1
    torch.testing.assert_close(cam, positions * gradcam, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cam.flatten(2).mean(-1), model(x) - model.head.bias, rtol=1e-10, atol=1e-10)


def test_cam_without_spatial_dims_is_per_unit_contribution():
    model, x = model_and_inputs("mlp")
    maps = EXPLANATIONS.build("cam").attribute(model, x)
    h = model.features(x)
    assert maps.shape == (6, K, 32)
    # Summing the units' contributions gives the logit minus the bias.
    torch.testing.assert_close(maps.sum(-1), model(x) - model.head.bias)
    torch.testing.assert_close(class_activation_maps(h, model.head.weight), maps)


def test_saliency_is_per_sample_in_eval_mode():
    """In eval mode no sample's explanation depends on the rest of the batch."""
    model, x = model_and_inputs("cnn1d")
    sal = EXPLANATIONS.build("saliency")
    torch.testing.assert_close(sal.attribute(model, x)[:2], sal.attribute(model, x[:2]))


def test_differentiable_explanations_carry_gradients():
    model, x = model_and_inputs("mlp")
    maps = EXPLANATIONS.build("saliency").attribute(model, x, create_graph=True)
    maps.pow(2).sum().backward()
    assert model.features[1].weight.grad is not None and model.features[1].weight.grad.abs().sum() > 0
    assert not EXPLANATIONS.build("saliency").attribute(model, x).requires_grad


def test_similarities_and_structure():
    maps = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]]])  # B=1, K=4, D=2
    y = torch.tensor([0])
    cos = explanation_similarity(maps, y, "cosine")
    assert cos[0, 0] == pytest.approx(1.0) and cos[0, 1] > cos[0, 2] > cos[0, 3]
    l2 = explanation_similarity(maps, y, "neg_l2")
    assert l2[0, 0] == 0 and l2[0, 1] > l2[0, 2] > l2[0, 3]
    pear = explanation_similarity(maps, y, "pearson")
    assert pear[0, 1] == pytest.approx(1.0) and pear[0, 3] == pytest.approx(-1.0)
    r = structure_from_similarity(cos, y, tau=0.5)
    assert r[0, 0] == 0 and r.sum() == pytest.approx(1.0) and r[0, 1] > r[0, 2] > r[0, 3]


def test_models_for_cam_expose_features_and_head():
    from tests.test_registry import input_shape_for

    for name in MODELS.names():
        model = build_model(name, {}, input_shape_for(name), K)
        assert isinstance(model.head, torch.nn.Linear) and isinstance(model.features, torch.nn.Module)
