"""Explanation sources: attribution maps for *every* class of a batch.

One verb, as in captum: ``source.attribute(model, inputs, ctx=AttributionContext(...))``
returns (B, K, *S): S is the input's shape for input attributions (saliency,
grad_input, integrated_gradients) and the layer's spatial shape for class
activation maps (cam, gradcam). ``ctx`` carries whatever a step offers a source
beyond the model and inputs (the training forward's features, an RNG, whether to
keep the graph), so a new source, or a wrapper such as SmoothGrad (Smilkov et al.
2017), is one registered class and needs no edit to the explanation structure or
the trainer. Every source declares its ``cost`` (a ``Cost``) and ``quick_params``
(its parameters for a short run); the registry refuses a source without them. Each
source is checked against captum's per-class equivalent in ``tests/test_explanations.py``.

All K classes come from one forward and a loop of K ``autograd.grad`` calls over
a retained graph: measured here for ResNet-20 at ×6.4 a CE step, against ×8.3 for
``is_grads_batched``, ×31 for ``torch.func`` and ×8 for captum. CAM needs no
gradient at all: one einsum over the last feature map.

*Sketches.* A source whose maps are linear in the input gradient, E_c = a ⊙ ∂z_c/∂x
(saliency: a = 1; grad×input: a = x), declares ``sketchable`` and implements
``project``: <E_c, v_j> for m directions v_j without forming E, as m forward-mode
Jacobian-vector products J (a ⊙ v_j) (``torch.func.jvp`` under ``vmap``, one primal
forward and m tangents, whatever K is; for a piecewise-linear network, one forward over the
rows [v_1; ...; v_m] with its ReLUs masked at x, the mask from a forward the step ran anyway,
``kdablate.linearized``). With Rademacher directions (E[v v^T] = I),
(1/m) P P^T is an unbiased estimate of the Gram matrix E E^T (Johnson & Lindenstrauss
1984; Achlioptas 2003 for ±1 entries; Halko, Martinsson & Tropp 2011 and Woodruff 2014
on randomized sketching), so a similarity that depends only on the Gram matrix
(cosine, Pearson) never needs the K backward passes. ``attribute_labels`` gives the
map of one class per sample (the true class's, one backward pass), so the explanation
structure can take the row G_y. = E (a ⊙ E_y) exactly, as one more direction.

References: Simonyan et al. 2014 (saliency); Shrikumar et al. 2016 (grad×input);
Pearlmutter 1994 and Baydin et al. 2018 (forward-mode products); Johnson & Lindenstrauss 1984,
Achlioptas 2003 and Woodruff 2014 (the sketches above);
Zhou et al. 2016 (CAM); Selvaraju et al. 2017 (Grad-CAM); Sundararajan et al.
2017 (integrated gradients); Kokhlikyan et al. 2020 (captum's ``attribute`` API).
"""
from __future__ import annotations

import abc
import dataclasses
import enum
from typing import Callable, ClassVar

import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from kdablate import linearized
from kdablate.registry import ConfigError, Registry


class Cost(enum.Enum):
    """What one ``attribute`` call costs for K classes, beyond the training step's forward."""

    FORWARD = "forward"                  # no extra backward pass: reads the forward's features (cam)
    PER_CLASS = "per_class"              # one forward and about K backward passes
    PER_CLASS_STEPS = "per_class_steps"  # K backward passes over steps x the batch: for offline use


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field is ambiguous
class AttributionContext:
    """What a step offers a source beyond the model and its inputs; a source reads what it needs.

    features: (B, C, *L) the output of ``model.features`` in this step's training forward, or
        None (then a source that wants it runs ``model.features`` itself).
    generators: the RNG of each seed whose rows the inputs hold (one, or a stack's several, its
        rows seed-major in equal blocks), so a seed reproduces its draws (``directions``) whether it
        is explained alone or stacked; none: the global RNG.
    create_graph: keep the graph through the maps, so a loss on them trains the model.
    pattern: the activation pattern of a forward this step already ran on the inputs
        (``linearized.recording``), so a piecewise-linear model's products need no forward of
        their own; used only where it is the model's pattern at exactly these inputs, as they and
        the model are now.
    """

    features: torch.Tensor | None = None
    generators: tuple[torch.Generator, ...] = ()
    create_graph: bool = False
    pattern: linearized.Pattern | None = None

    @property
    def generator(self) -> torch.Generator | None:
        """The RNG of a source's noise (SmoothGrad) when the inputs are one seed's; None when none
        is given. Refused (TypeError) over several seeds' rows, where one stream would break each
        seed's draws; such a source is not ``stackable``."""
        if len(self.generators) > 1:
            raise TypeError(f"these inputs hold {len(self.generators)} seeds' rows: draw each seed's block "
                            "from its own generator (ctx.generators), as ``directions`` does")
        return self.generators[0] if self.generators else None


PLAIN = AttributionContext()  # no features, no RNG, maps detached from the model


class Explanation(abc.ABC):
    """Base of explanation sources: holds ``params``; subclasses implement ``attribute``.

    cost: declared by every registered source (the registry refuses one without it).
    quick_params: parameters for a short run (the bench's), checked against ``Params`` at
        registration; read-only.
    needs_features: the source reads ``ctx.features``, so the structure may reuse the
        training forward's feature map.
    sketchable: the maps are linear in the input gradient, and ``project`` gives their inner
        products with directions over the input's shape (the module docstring's *Sketches*).
    stackable: the source reads the model only by calling it on rows of its inputs (or on whole
        copies of them stacked along dim 0) and each row's maps come from that row alone, so it
        explains a stack of seeds' models in one call (``kdablate.stacked``); it draws noise
        only through ``directions``. Checked for every source that says so, against each seed
        alone, in ``tests/test_stacked.py``.
    deterministic: the maps are a function of the model and the inputs alone (no draws), so a
        frozen explainer's results may be kept per row (``kdablate.components.memo``).
    """

    cost: ClassVar[Cost]
    quick_params: ClassVar[dict] = {}
    needs_features: ClassVar[bool] = False
    sketchable: ClassVar[bool] = False
    stackable: ClassVar[bool] = False
    deterministic: ClassVar[bool] = False

    def __init__(self, params: object) -> None:
        self.params = params

    @abc.abstractmethod
    def attribute(self, model: nn.Module, inputs: torch.Tensor, *, ctx: AttributionContext = PLAIN) -> torch.Tensor:
        """(B, *shape) inputs -> (B, K, *S) maps for every class."""

    def project(self, model: nn.Module, inputs: torch.Tensor, directions: torch.Tensor, *,
                ctx: AttributionContext = PLAIN) -> torch.Tensor:
        """(B, *S) inputs, (m, B, *S) directions -> (B, K, m) <E_c(x_b), directions[j, b]>, without E."""
        raise NotImplementedError(f"{type(self).__name__} is not sketchable")

    def attribute_labels(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
                         ctx: AttributionContext = PLAIN) -> torch.Tensor:
        """(B, *S) inputs, (B,) labels -> (B, *S) E_{labels[b]}(x_b), one class per sample (sketchable sources:
        one backward pass)."""
        raise NotImplementedError(f"{type(self).__name__} is not sketchable")


class SourceRegistry(Registry):
    """The explanation registry: a source registers only with its own ``cost`` and valid ``quick_params``,
    so the bench (and a reader) can plan every registered source without a table of their own."""

    def register(self, name: str) -> Callable[[type], type]:
        add = super().register(name)

        def checked(cls: type) -> type:
            # Its own declaration: a subclass that changes the computation must restate what it costs.
            if not isinstance(vars(cls).get("cost"), Cost):
                raise TypeError(f"explanation '{name}' ({cls.__name__}) declares no cost: set "
                                f"cost: ClassVar[Cost] to one of {', '.join(c.name for c in Cost)}")
            for flag in ("stackable", "deterministic"):  # nor inherit what a stack or a memo may do with it
                if flag not in vars(cls):
                    setattr(cls, flag, False)
            add(cls)
            valid = False
            try:
                self.params(name, cls.quick_params)
                valid = True
            except ConfigError as e:
                raise TypeError(f"explanation '{name}' quick_params are not its parameters: {e}") from None
            finally:
                if not valid:  # a refused source leaves no entry behind
                    del self._entries[name]
            return cls

        return checked


EXPLANATIONS: SourceRegistry = SourceRegistry("explanation")


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


def rademacher_directions(inputs: torch.Tensor, m: int, generator: torch.Generator | None = None,
                          centre: bool = False) -> torch.Tensor:
    """(B, *S) inputs -> (m, B, *S) independent ±1 directions per sample, drawn from ``generator``
    (on its device; the global RNG if None), at the inputs' dtype and device.

    centre: subtract each direction's mean over S, i.e. v -> C v with C = I - 11^T/D. C is
    symmetric and idempotent, so <E, C v> = <C E, v> and E[(C v)(C v)^T] = C: projecting onto
    centred directions sketches the Gram matrix of the *centred* maps, exactly Pearson's.
    """
    device = generator.device if generator is not None else inputs.device
    signs = torch.randint(0, 2, (m, *inputs.shape), generator=generator, device=device)
    v = (2 * signs - 1).to(dtype=inputs.dtype, device=inputs.device)
    if centre:
        v = v - v.mean(dim=tuple(range(2, v.dim())), keepdim=True)
    return v


def directions(inputs: torch.Tensor, m: int, ctx: AttributionContext, centre: bool = False) -> torch.Tensor:
    """(B, *S) inputs -> (m, B, *S) Rademacher directions (``rademacher_directions``), each seed's
    block of rows from its own generator (``ctx.generators``): the directions that seed draws alone."""
    if len(ctx.generators) < 2:
        return rademacher_directions(inputs, m, ctx.generator, centre)
    blocks = inputs.split(len(inputs) // len(ctx.generators))
    return torch.cat([rademacher_directions(b, m, g, centre) for b, g in zip(blocks, ctx.generators, strict=True)], 1)


def label_gradients(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                    create_graph: bool = False) -> torch.Tensor:
    """(B, *S) inputs, (B,) labels -> (B, *S) d z_{labels[b]} / d x_b: one forward, one backward."""
    x = _leaf(inputs)
    with torch.enable_grad():
        z = model(x).gather(1, labels[:, None]).sum()
        return torch.autograd.grad(z, x, create_graph=create_graph)[0]


def directional_derivatives(model: nn.Module, inputs: torch.Tensor, tangents: torch.Tensor,
                            create_graph: bool = False, linearize: bool = True,
                            pattern: linearized.Pattern | None = None) -> torch.Tensor:
    """(B, *S) inputs, (m, B, *S) tangents -> (B, K, m) J_b t_jb, the model's (K, D) input Jacobian
    times each tangent: for a piecewise-linear network (``kdablate.linearized``, unless not
    ``linearize``) one forward over the m B tangent rows at the inputs' ``pattern`` where one was
    recorded (else a forward of the inputs first), else one primal forward and m forward-mode
    tangents (``vmap`` over ``jvp``).

    Per sample only when samples do not interact (eval-mode BN), as for ``class_gradients``.
    The parameters get explicit zero tangents: left without, torch adds efficient ZeroTensors
    in the linear layers' formulas, measured at ~0.3 ms an op here (an MLP step x1.2).
    """
    # One batched forward, no per-op forward-mode overhead, where the model allows it (a pattern
    # recorded of a model that does not has said so already).
    if linearize and (pattern is None or pattern.linear):
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            if pattern is not None and pattern.holds_for(model, inputs):
                return linearized.jvp_at(pattern, tangents)
            rows = linearized.jvp_rows(model, inputs.detach(), tangents)
        if rows is not None:
            return rows
    params = dict(model.named_parameters())
    zeros = {name: torch.zeros_like(p) for name, p in params.items()}

    def call(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, p, (x,))

    def one(t: torch.Tensor) -> torch.Tensor:
        return jvp(call, (inputs.detach(), params), (t, zeros))[1]

    with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
        out = vmap(one)(tangents)  # (m, B, K)
    return out.permute(1, 2, 0)


def linearization_holds(model: nn.Module, inputs: torch.Tensor, m: int = 2, rtol: float = 1e-3) -> bool:
    """Whether ``model``'s linearized products (``kdablate.linearized``) equal forward-mode ones on
    ``inputs`` for m random directions; True where it is not linearized. In eval mode, so a
    ``linear_glue`` declaration on a forward that is not linear is caught before training."""
    was = model.training
    model.eval()
    try:
        t = rademacher_directions(inputs, m, torch.Generator(device=inputs.device).manual_seed(0))
        fast = linearized.jvp_rows(model, inputs, t)
        if fast is None:
            return True
        exact = directional_derivatives(model, inputs, t, linearize=False)
    finally:
        model.train(was)
    return torch.allclose(fast, exact, rtol=rtol, atol=rtol * exact.abs().max().item())


@EXPLANATIONS.register("saliency")
class Saliency(Explanation):
    """E_c = dz_c/dx (signed; captum's ``Saliency(abs=False)``)."""

    cost = Cost.PER_CLASS
    sketchable = True
    stackable = True
    deterministic = True

    def attribute(self, model: nn.Module, inputs: torch.Tensor, *, ctx: AttributionContext = PLAIN) -> torch.Tensor:
        x = _leaf(inputs)
        with torch.enable_grad():
            return class_gradients(model(x), x, ctx.create_graph)

    def project(self, model: nn.Module, inputs: torch.Tensor, directions: torch.Tensor, *,
                ctx: AttributionContext = PLAIN) -> torch.Tensor:
        """(B, K, m) <dz_c/dx, v_j> = J v_j."""
        return directional_derivatives(model, inputs, directions, ctx.create_graph, pattern=ctx.pattern)

    def attribute_labels(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
                         ctx: AttributionContext = PLAIN) -> torch.Tensor:
        return label_gradients(model, inputs, labels, ctx.create_graph)


@EXPLANATIONS.register("grad_input")
class GradInput(Explanation):
    """E_c = x * dz_c/dx (captum's ``InputXGradient``)."""

    cost = Cost.PER_CLASS
    sketchable = True
    stackable = True
    deterministic = True

    def attribute(self, model: nn.Module, inputs: torch.Tensor, *, ctx: AttributionContext = PLAIN) -> torch.Tensor:
        x = _leaf(inputs)
        with torch.enable_grad():
            return class_gradients(model(x), x, ctx.create_graph) * inputs[:, None]

    def project(self, model: nn.Module, inputs: torch.Tensor, directions: torch.Tensor, *,
                ctx: AttributionContext = PLAIN) -> torch.Tensor:
        """(B, K, m) <x ⊙ dz_c/dx, v_j> = J (x ⊙ v_j)."""
        return directional_derivatives(model, inputs, inputs.detach()[None] * directions, ctx.create_graph,
                                       pattern=ctx.pattern)

    def attribute_labels(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
                         ctx: AttributionContext = PLAIN) -> torch.Tensor:
        return label_gradients(model, inputs, labels, ctx.create_graph) * inputs


# Integrated gradients' interpolation points alpha_i in [0, 1] for n steps, by Riemann rule (captum's names).
_ALPHAS = {
    "riemann_middle": lambda n: (torch.arange(n) + 0.5) / n,
    "riemann_left": lambda n: torch.arange(n) / n,
    "riemann_right": lambda n: (torch.arange(n) + 1.0) / n,
}


@EXPLANATIONS.register("integrated_gradients")
class IntegratedGradients(Explanation):
    """E_c = x * mean_i dz_c/dx(alpha_i x), zero baseline, ``steps`` Riemann points.

    Costs ``steps`` times the forward; meant for offline comparison.
    """

    cost = Cost.PER_CLASS_STEPS
    quick_params = {"steps": 8}
    stackable = True  # the path is whole copies of the inputs, stacked along dim 0
    deterministic = True

    @dataclasses.dataclass(frozen=True)
    class Params:
        steps: int = 32
        method: str = "riemann_middle"

        def __post_init__(self) -> None:
            if self.steps < 2:
                raise ValueError(f"steps must be >= 2, got {self.steps}")
            if self.method not in _ALPHAS:
                raise ValueError(f"method must be one of {', '.join(_ALPHAS)}, got '{self.method}'")

    def attribute(self, model: nn.Module, inputs: torch.Tensor, *, ctx: AttributionContext = PLAIN) -> torch.Tensor:
        n, b = self.params.steps, inputs.shape[0]
        alphas = _ALPHAS[self.params.method](n).to(inputs.dtype)
        # (n*B, *S): every interpolation point of every sample in one forward.
        path = _leaf((alphas.view(n, 1, *[1] * (inputs.dim() - 1)) * inputs[None]).flatten(0, 1))
        with torch.enable_grad():
            g = class_gradients(model(path), path, ctx.create_graph)
        g = g.view(n, b, *g.shape[1:]).mean(0)
        return g * inputs[:, None]


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

    With ``ctx.features`` already captured from the training forward it is one einsum.
    """

    cost = Cost.FORWARD
    needs_features = True
    deterministic = True

    def attribute(self, model: nn.Module, inputs: torch.Tensor, *, ctx: AttributionContext = PLAIN) -> torch.Tensor:
        feat_mod, head = _feature_head(model)
        features = ctx.features
        if features is None:
            with torch.set_grad_enabled(ctx.create_graph):
                features = feat_mod(inputs)
        weight = head.weight if ctx.create_graph else head.weight.detach()
        # Features captured under autocast may be bf16/fp16: compute the maps at the weights' precision.
        dtype = torch.promote_types(features.dtype, weight.dtype)
        return class_activation_maps(features.to(dtype), weight.to(dtype))


def module_at(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` in ``model.named_modules()``; a clear error listing them if none."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"{type(model).__name__} has no layer '{name}'; layers: {', '.join(n for n in modules if n)}")
    return modules[name]


@EXPLANATIONS.register("gradcam")
class GradCAM(Explanation):
    """Grad-CAM at ``layer`` (a name from ``named_modules``; default: the model's ``features``).

    E_c(l) = [relu](sum_k mean_l'(dz_c/dA_k(l')) A_k(l)); captum's ``LayerGradCam``.
    """

    cost = Cost.PER_CLASS
    deterministic = True

    @dataclasses.dataclass(frozen=True)
    class Params:
        layer: str = "features"
        relu: bool = True

    def attribute(self, model: nn.Module, inputs: torch.Tensor, *, ctx: AttributionContext = PLAIN) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        hook = module_at(model, self.params.layer).register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            with torch.enable_grad():
                logits = model(_leaf(inputs))  # a leaf, so frozen models still have a graph
                acts = captured[0]
                grads = class_gradients(logits, acts, ctx.create_graph)  # (B, K, C, *L)
        finally:
            hook.remove()
        weights = grads.mean(dim=tuple(range(3, grads.dim())), keepdim=True) if grads.dim() > 3 else grads
        maps = (weights * acts[:, None]).sum(2)
        return torch.relu(maps) if self.params.relu else maps
