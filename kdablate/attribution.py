"""Explanation sources: attribution maps for *every* class of a batch.

One verb, as in captum: ``source.attribute(model, inputs)`` returns (B, K, *shape):
the input's shape for input attributions (saliency, grad_input,
integrated_gradients), the layer's spatial shape for class activation maps
(cam, gradcam). Each is checked against captum's per-class equivalent in
``tests/test_explanations.py``.

All K classes come from one forward and a loop of K ``autograd.grad`` calls over
a retained graph: measured here for ResNet-20 at ×6.4 a CE step, against ×8.3 for
``is_grads_batched``, ×31 for ``torch.func`` and ×8 for captum. CAM needs no
gradient at all: one einsum over the last feature map.

References: Simonyan et al. 2014 (saliency); Shrikumar et al. 2016 (grad×input);
Zhou et al. 2016 (CAM); Selvaraju et al. 2017 (Grad-CAM); Sundararajan et al.
2017 (integrated gradients).
"""
from __future__ import annotations

import abc
import dataclasses

import torch
from torch import nn

from kdablate.registry import Registry

EXPLANATIONS: Registry = Registry("explanation")


def class_gradients(outputs: torch.Tensor, wrt: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """(B, K) outputs of a graph that reaches ``wrt`` (B, *S) -> (B, K, *S) d outputs[:, c] / d wrt.

    Sums over the batch are safe only when samples do not interact (eval-mode BN).
    """
    k = outputs.shape[1]
    grads = [
        torch.autograd.grad(outputs[:, c].sum(), wrt, retain_graph=create_graph or c < k - 1,
                            create_graph=create_graph)[0]
        for c in range(k)
    ]
    return torch.stack(grads, dim=1)


def _leaf(inputs: torch.Tensor) -> torch.Tensor:
    return inputs.detach().requires_grad_(True)


class Explanation(abc.ABC):
    """Base of explanation plugins: holds ``params``; subclasses implement ``attribute``."""

    needs_features = False

    def __init__(self, params: object) -> None:
        self.params = params

    @abc.abstractmethod
    def attribute(self, model: nn.Module, inputs: torch.Tensor, create_graph: bool = False,
                  features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, *shape) -> (B, K, *S) maps for every class; ``features``: this step's last feature map."""


@EXPLANATIONS.register("saliency")
class Saliency(Explanation):
    """E_c = dz_c/dx (signed; captum's ``Saliency(abs=False)``)."""

    def attribute(self, model, inputs, create_graph=False, features=None):
        x = _leaf(inputs)
        with torch.enable_grad():
            return class_gradients(model(x), x, create_graph)


@EXPLANATIONS.register("grad_input")
class GradInput(Explanation):
    """E_c = x * dz_c/dx (captum's ``InputXGradient``)."""

    def attribute(self, model, inputs, create_graph=False, features=None):
        x = _leaf(inputs)
        with torch.enable_grad():
            return class_gradients(model(x), x, create_graph) * inputs[:, None]


@EXPLANATIONS.register("integrated_gradients")
class IntegratedGradients(Explanation):
    """E_c = x * mean_i dz_c/dx(alpha_i x), zero baseline, ``steps`` Riemann points.

    Costs ``steps`` times the forward; meant for offline comparison.
    """

    @dataclasses.dataclass(frozen=True)
    class Params:
        steps: int = 32
        method: str = "riemann_middle"

        def __post_init__(self) -> None:
            if self.steps < 2:
                raise ValueError(f"steps must be >= 2, got {self.steps}")
            if self.method not in _ALPHAS:
                raise ValueError(f"method must be one of {', '.join(_ALPHAS)}, got '{self.method}'")

    def attribute(self, model, inputs, create_graph=False, features=None):
        n, b = self.params.steps, inputs.shape[0]
        alphas = _ALPHAS[self.params.method](n).to(inputs.dtype)
        # (n*B, *S): every interpolation point of every sample in one forward.
        path = _leaf((alphas.view(n, 1, *[1] * (inputs.dim() - 1)) * inputs[None]).flatten(0, 1))
        with torch.enable_grad():
            g = class_gradients(model(path), path, create_graph)
        g = g.view(n, b, *g.shape[1:]).mean(0)
        return g * inputs[:, None]


_ALPHAS = {
    "riemann_middle": lambda n: (torch.arange(n) + 0.5) / n,
    "riemann_left": lambda n: torch.arange(n) / n,
    "riemann_right": lambda n: (torch.arange(n) + 1.0) / n,
}


def class_activation_maps(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, C, *L) features, (K, C) head weight -> (B, K, *L) maps sum_k w_ck A_k(l).

    Features without spatial dims, (B, C) as in an MLP, give per-unit
    contributions (B, K, C) = w_c * h: both sum to the logit up to bias and scale.
    """
    if features.dim() == 2:
        return features[:, None, :] * weight[None]
    return torch.einsum("bc...,kc->bk...", features, weight)


def _feature_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    features, head = getattr(model, "features", None), getattr(model, "head", None)
    if not isinstance(features, nn.Module) or not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no 'features' module and linear 'head'; CAM needs both")
    return features, head


@EXPLANATIONS.register("cam")
class CAM(Explanation):
    """Class activation maps at the last feature map, for GAP + linear heads (Zhou et al., 2016).

    With ``features`` already captured from the training forward it is one einsum.
    """

    needs_features = True

    def attribute(self, model, inputs, create_graph=False, features=None):
        feat_mod, head = _feature_head(model)
        if features is None:
            with torch.set_grad_enabled(create_graph):
                features = feat_mod(inputs)
        weight = head.weight if create_graph else head.weight.detach()
        # Features captured under autocast may be bf16/fp16: compute the maps at the weights' precision.
        dtype = torch.promote_types(features.dtype, weight.dtype)
        return class_activation_maps(features.to(dtype), weight.to(dtype))


def module_at(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"{type(model).__name__} has no layer '{name}'; layers: {', '.join(n for n in modules if n)}")
    return modules[name]


@EXPLANATIONS.register("gradcam")
class GradCAM(Explanation):
    """Grad-CAM at ``layer`` (a name from ``named_modules``; default: the model's ``features``).

    E_c(l) = [relu](sum_k mean_l'(dz_c/dA_k(l')) A_k(l)); captum's ``LayerGradCam``.
    """

    @dataclasses.dataclass(frozen=True)
    class Params:
        layer: str = "features"
        relu: bool = True

    def attribute(self, model, inputs, create_graph=False, features=None):
        captured: list[torch.Tensor] = []
        hook = module_at(model, self.params.layer).register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            with torch.enable_grad():
                logits = model(_leaf(inputs))  # a leaf, so frozen models still have a graph
                acts = captured[0]
                grads = class_gradients(logits, acts, create_graph)  # (B, K, C, *L)
        finally:
            hook.remove()
        weights = grads.mean(dim=tuple(range(3, grads.dim())), keepdim=True) if grads.dim() > 3 else grads
        maps = (weights * acts[:, None]).sum(2)
        return torch.relu(maps) if self.params.relu else maps
