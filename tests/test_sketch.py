"""Sketched explanation similarity (the explanation structure's ``sketch``): Rademacher directions
and forward-mode products estimate the Gram matrix of gradient maps (Johnson–Lindenstrauss;
Achlioptas 2003; Woodruff 2014), Pearson by centred directions, the true class's row exactly.

Checked: the sketched Gram converges to the exact one as m grows; with a full (scaled identity)
basis the sketch is exact, for cosine and Pearson alike, so the centring identity holds; the same
generator state reproduces a result; sketch = 0 is today's path bit for bit; bad combinations are
refused at load with one line; a sketched IL cell trains with ``fit``; gradients flow when asked.
"""
from __future__ import annotations

import math

import pytest
import torch

from kdablate import attribution as attribution_mod, linearized
from kdablate.attribution import EXPLANATIONS, AttributionContext, directional_derivatives, linearization_holds
from kdablate.components import STRUCTURES, TargetContext
from kdablate.components.context import Probe
from kdablate.components.explanation import (explain, explanation_similarity, gram, sketch, sketched_similarity,
                                             structure_from_similarity)
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import load_dataset
from kdablate.models import MODELS, build_model
from kdablate.registry import ConfigError
from kdablate.trainer import fit

K = 10
SKETCHABLE = [n for n in EXPLANATIONS.names() if EXPLANATIONS.get(n).sketchable]


def model_and_inputs(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 model (BN in train mode: the sketch must switch it to eval), (6, 1, 40) inputs, labels."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    params = {"hidden": 32} if name == "mlp" else {"channels": 8, "depth": 2}
    model = build_model(name, params, (1, 40), K).double()
    return model, torch.randn(6, 1, 40, dtype=torch.float64, generator=g), torch.randint(0, K, (6,), generator=g)


def ctx(seed: int = 0) -> AttributionContext:
    return AttributionContext(generators=(torch.Generator().manual_seed(seed),))


def full_basis(inputs: torch.Tensor, m: int, generator: torch.Generator | None = None,
               centre: bool = False) -> torch.Tensor:
    """Stands in for ``rademacher_directions``: sqrt(D) e_1 .. sqrt(D) e_D (centred if asked), so that
    (1/D) P P^T is the Gram matrix exactly; ignores m."""
    d = math.prod(inputs.shape[1:])
    v = math.sqrt(d) * torch.eye(d, dtype=inputs.dtype).reshape(d, 1, *inputs.shape[1:])
    v = v.expand(d, *inputs.shape).clone()
    return v - v.mean(dim=tuple(range(2, v.dim())), keepdim=True) if centre else v


def test_sketch_is_only_for_sketchable_sources():
    assert SKETCHABLE == ["grad_input", "saliency"]
    model, x, _ = model_and_inputs("mlp")
    with pytest.raises(NotImplementedError, match="not sketchable"):
        EXPLANATIONS.build("cam").project(model, x, torch.ones(2, *x.shape, dtype=x.dtype))


@pytest.mark.parametrize("centre", [False, True], ids=["cosine", "pearson"])
@pytest.mark.parametrize("source", SKETCHABLE)
@pytest.mark.parametrize("model_name", ["mlp", "cnn1d"])
def test_sketched_gram_converges_to_the_exact_one(model_name, source, centre):
    model, x, _ = model_and_inputs(model_name)
    src = EXPLANATIONS.build(source)
    exact = gram(explain(model, src, x, eval_mode=True, ctx=ctx()), centre)

    def error(m: int) -> float:
        est = gram(sketch(model, src, x, m, centre=centre, eval_mode=True, ctx=ctx(3))) / m
        return ((est - exact).norm() / exact.norm()).item()

    small, large = error(8), error(512)
    assert large < small and large < 0.25, (small, large)
    assert model.training  # the sketch ran in eval mode and restored the mode


@pytest.mark.parametrize("source", SKETCHABLE)
@pytest.mark.parametrize("model_name", ["mlp", "cnn1d"])
def test_a_full_basis_gives_the_exact_gram_and_similarity(model_name, source, monkeypatch):
    """With sqrt(D) times the standard basis, centred or not, the sketch is exact: Pearson's centring
    by centred directions is an identity (<C E, C v> = <E, C v>), and the row G_y. is exact."""
    model, x, y = model_and_inputs(model_name)
    src = EXPLANATIONS.build(source)
    maps = explain(model, src, x, eval_mode=True, ctx=ctx())
    monkeypatch.setattr(attribution_mod, "rademacher_directions", full_basis)
    for kind in ("cosine", "pearson"):
        centre = kind == "pearson"
        p = sketch(model, src, x, 0, centre=centre, eval_mode=True, ctx=ctx())
        torch.testing.assert_close(gram(p) / p.shape[2], gram(maps, centre), rtol=1e-10, atol=1e-14)
        s = sketched_similarity(model, src, x, y, 0, centre=centre, eval_mode=True, ctx=ctx())
        torch.testing.assert_close(s, explanation_similarity(maps, y, kind), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("centre", [False, True], ids=["cosine", "pearson"])
def test_a_class_whose_map_is_parallel_to_the_true_ones_is_exact_at_any_m(centre):
    """The norms are sketched only orthogonally to E_y (the control variate): a class whose map is
    a multiple of the true class's has |s_c| = 1 exactly, even from one direction, where
    sketching its whole norm would give an error of order 1/sqrt(m)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, K, bias=False)).double()
    with torch.no_grad():
        w = model[1].weight
        w[1] = -0.5 * w[0]
        w[2] = 3.0 * w[0] + 7.0  # Pearson only: a shift over the input dims is centred away
    x, y = torch.randn(5, 1, 40, dtype=torch.float64), torch.zeros(5, dtype=torch.long)
    s = sketched_similarity(model, EXPLANATIONS.build("saliency"), x, y, 1, centre=centre, eval_mode=True, ctx=ctx())
    torch.testing.assert_close(s[:, 0], torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(s[:, 1], -torch.ones(5, dtype=torch.float64))
    if centre:
        torch.testing.assert_close(s[:, 2], torch.ones(5, dtype=torch.float64))
    assert (s[:, 3:].abs() < 1).all()


@pytest.mark.parametrize("kind", ["cosine", "pearson"])
def test_sketched_similarity_converges_and_keeps_the_ranking(kind):
    model, x, y = model_and_inputs("cnn1d")
    src = EXPLANATIONS.build("saliency")
    exact = explanation_similarity(explain(model, src, x, eval_mode=True, ctx=ctx()), y, kind)

    def error(m: int) -> float:
        return (sketched_similarity(model, src, x, y, m, centre=kind == "pearson", eval_mode=True, ctx=ctx(2))
                - exact).abs().max().item()

    assert error(4096) < 0.05 and error(4096) < error(8)


def test_the_same_generator_state_reproduces_the_sketch(batch):
    model = batch["models"]["teacher"]
    x, y, src = batch["inputs"], batch["labels"], EXPLANATIONS.build("saliency")
    runs = [sketched_similarity(model, src, x, y, 8, centre=True, eval_mode=True, ctx=ctx(seed))
            for seed in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    g = torch.Generator().manual_seed(5)
    first = sketch(model, src, x, 8, centre=False, eval_mode=True, ctx=AttributionContext(generators=(g,)))
    second = sketch(model, src, x, 8, centre=False, eval_mode=True, ctx=AttributionContext(generators=(g,)))
    assert not torch.equal(first, second)  # the generator advanced: a new step draws new directions


def step_context(batch: dict, seed: int = 0) -> TargetContext:
    model = batch["models"]["teacher"]  # the cnn1d, with BatchNorm
    return TargetContext(labels=batch["labels"], num_classes=K, student_logits=batch["student"],
                         generators=(torch.Generator().manual_seed(seed),), inputs=batch["inputs"],
                         models={"self": model}, step=0)


@pytest.mark.parametrize("similarity", ["cosine", "pearson", "neg_l2"])
def test_sketch_zero_is_todays_path_bit_for_bit(batch, similarity):
    model = batch["models"]["teacher"]
    x, y = batch["inputs"], batch["labels"]
    maps = explain(model, EXPLANATIONS.build("saliency"), x, eval_mode=True, ctx=AttributionContext())
    today = structure_from_similarity(explanation_similarity(maps.detach(), y, similarity), y, 0.3)
    for params in ({"similarity": similarity}, {"similarity": similarity, "sketch": 0}):
        r = STRUCTURES.build("explanation", params)(step_context(batch), 4.0)
        assert torch.equal(r, today)


@pytest.mark.parametrize("similarity", ["cosine", "pearson"])
def test_a_sketched_structure_is_a_distribution_off_the_true_class(batch, similarity):
    structure = STRUCTURES.build("explanation", {"sketch": 8, "similarity": similarity})
    model = batch["models"]["teacher"]
    structure.check(Probe(batch["inputs"][:4], K, {"self": model}, {"self": "cnn1d"}))
    r = structure(step_context(batch), 4.0)
    y = batch["labels"]
    assert r.shape == (len(y), K) and torch.isfinite(r).all() and (r.gather(1, y[:, None]) == 0).all()
    torch.testing.assert_close(r.sum(1), torch.ones(len(y)))
    assert torch.equal(r, STRUCTURES.build("explanation", {"sketch": 8, "similarity": similarity})(
        step_context(batch), 4.0))  # same seed, same target
    assert model.training


@pytest.mark.parametrize("params,what", [
    ({"source": "cam", "sketch": 8}, "source 'cam'"),
    ({"source": "integrated_gradients", "sketch": 8}, "source 'integrated_gradients'"),
    ({"similarity": "neg_l2", "sketch": 8}, "similarity 'neg_l2'"),
    ({"mode": "reuse", "sketch": 8}, "mode 'reuse'"),
])
def test_bad_combinations_are_refused_in_one_line(params, what):
    with pytest.raises(ConfigError) as e:
        STRUCTURES.params("explanation", params)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("structure 'explanation': sketch=8 needs source grad_input or saliency")
    assert "similarity cosine or pearson" in msg and what in msg


def test_a_negative_sketch_is_refused():
    with pytest.raises(ConfigError, match="sketch must be >= 0"):
        STRUCTURES.params("explanation", {"sketch": -1})


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * 2


class _Opaque(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(40, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(_NoForwardAD.apply(x.flatten(1)))


def test_check_refuses_a_model_without_forward_mode_products():
    structure = STRUCTURES.build("explanation", {"sketch": 8})
    probe = Probe(torch.randn(4, 1, 40), K, {"self": _Opaque()}, {"self": "opaque"})
    STRUCTURES.build("explanation", {}).check(probe)  # the exact path works on it
    with pytest.raises(ConfigError, match="cannot be sketched \\(sketch=8\\)") as e:
        structure.check(probe)
    assert "\n" not in str(e.value)


def test_a_differentiable_sketch_carries_gradients():
    model, x, y = model_and_inputs("mlp")
    src = EXPLANATIONS.build("saliency")
    s = sketched_similarity(model, src, x, y, 4, centre=False, eval_mode=True,
                            ctx=AttributionContext(generators=(torch.Generator().manual_seed(0),), create_graph=True))
    s.pow(2).sum().backward()
    assert model.features[1].weight.grad is not None and model.features[1].weight.grad.abs().sum() > 0
    assert not sketched_similarity(model, src, x, y, 4, centre=False, eval_mode=True, ctx=ctx()).requires_grad


@pytest.mark.parametrize("centre", [False, True], ids=["cosine", "pearson"])
def test_a_differentiable_sketch_has_the_exact_gradient_with_a_full_basis(centre, monkeypatch):
    """With a full basis the sketch is the exact similarity, so its gradient must be the exact
    one too: the control variate is applied after the products, through a live E_y."""
    model, x, y = model_and_inputs("mlp")
    src, kind = EXPLANATIONS.build("saliency"), "pearson" if centre else "cosine"
    graph = AttributionContext(generators=(torch.Generator().manual_seed(0),), create_graph=True)
    weights = torch.rand(len(y), K, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def grads(s: torch.Tensor) -> list[torch.Tensor]:
        return torch.autograd.grad((weights * s).sum(), list(model.parameters()), allow_unused=True)

    exact = grads(explanation_similarity(explain(model, src, x, eval_mode=True, ctx=graph), y, kind))
    monkeypatch.setattr(attribution_mod, "rademacher_directions", full_basis)
    sketched = grads(sketched_similarity(model, src, x, y, 0, centre=centre, eval_mode=True, ctx=graph))
    for e, g in zip(exact, sketched):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("model_name", ["mlp", "cnn1d"])
def test_a_sketched_il_cell_trains_with_fit(model_name):
    data = load_dataset("mnist1d", {"num_samples": 500})
    spec = ModelSpec(name=model_name, params={"channels": 16, "depth": 2} if model_name == "cnn1d" else {})
    il = KnowledgeConfig(mass={"name": "constant", "eps": 0.2}, structure={"name": "explanation", "sketch": 8},
                         temperature=4.0, alpha=0.9)
    result = fit(spec, data, OptimConfig(epochs=1, batch_size=32), il, seed=0)
    assert math.isfinite(result.metrics["report/val_acc"]) and 0 <= result.metrics["report/val_acc"] <= 1
    sim = result.artifacts["similarity_explanation"]  # the epoch's class-mean structure
    assert sim.shape == (K, K) and torch.isfinite(sim).all() and (sim.diagonal() == 0).all()


def test_the_agreement_measurement_runs():
    from kdablate.bench.explain import agreement_table, sketch_agreement

    rows = sketch_agreement("mlp", 10, ms=(8,), per_class=3)
    assert [(a.m, a.exact_row) for a in rows] == [(8, True), (8, False)]
    assert all(-1 <= a.classes <= 1 and -1 <= a.rows <= 1 for a in rows)
    assert "| mlp | 10 | structure (row exact) |" in agreement_table(rows)


# --- the linearized products of piecewise-linear networks (kdablate.linearized) ---------------------

# Registered models the linearized pass covers (each checked against forward mode below); a model
# that becomes supported fails ``test_which_models_are_linearized`` until it is listed here.
LINEAR_GLUE = ["cnn1d", "mlp", "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
               "resnet8x4", "resnet32x4", "resnet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


@pytest.mark.parametrize("name", LINEAR_GLUE)
def test_linearized_products_are_forward_mode_products_for_every_model_that_allows_them(name):
    """Every registered model the pass covers: in eval mode, the linearized pass over V gives the
    forward-mode J v to rounding, a direction a million times smaller than the biases
    included, with batch norm's running statistics away from their init."""
    from tests.test_registry import input_shape_for

    shape = input_shape_for(name)
    torch.manual_seed(0)
    model = build_model(name, {}, shape, K).double()
    model(torch.randn(16, *shape, dtype=torch.float64) + 0.5)  # BN statistics away from their init
    assert linearized.supported(model.eval())
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, *shape, dtype=torch.float64, generator=g), torch.randn(4, 3, *shape, dtype=torch.float64, generator=g)
    t[0] *= 1e-6
    exact = directional_derivatives(model, x, t, linearize=False)
    torch.testing.assert_close(directional_derivatives(model, x, t), exact, rtol=1e-9, atol=1e-18)
    # At the pattern recorded in the true class's map's own forward (with autograd, as the sketch
    # runs it): no forward of x of its own.
    with linearized.recording(model) as pattern:
        attribution_mod.label_gradients(model, x, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(directional_derivatives(model, x, t, pattern=pattern), exact, rtol=1e-9, atol=1e-18)


def test_a_pattern_is_used_only_at_its_own_inputs_and_model():
    """Other inputs, another model or two recorded forwards: the products take their own forward,
    and are still exact."""
    model, x, y = model_and_inputs("mlp")
    model.eval()
    other = x + 1.0
    t = torch.randn(2, *x.shape, dtype=x.dtype)
    with linearized.recording(model) as pattern:
        model(x)
    assert pattern.holds_for(model, x.clone()) and not pattern.holds_for(model, other)
    assert not pattern.holds_for(model_and_inputs("mlp")[0], x)
    exact = directional_derivatives(model, other, t, linearize=False)
    torch.testing.assert_close(directional_derivatives(model, other, t, pattern=pattern), exact, rtol=1e-9, atol=1e-15)
    with linearized.recording(model) as twice:
        model(x), model(x)
    assert not twice.holds_for(model, x)
    with linearized.recording(_ReluInForward(True)) as none:
        assert not none.linear and not none.holds_for(none.model, x)  # not supported: nothing recorded
    with pytest.raises(ValueError, match="not directions at the pattern's rows"):
        linearized.jvp_at(pattern, t[:, :2])


def test_a_pattern_no_longer_holds_once_its_inputs_or_model_change():
    """Inputs edited in place, an optimiser step, a mode switch: each makes the pattern stale."""
    model, x, _ = model_and_inputs("cnn1d")
    model.eval()

    def recorded() -> linearized.Pattern:
        with linearized.recording(model) as pattern:
            model(x)
        assert pattern.holds_for(model, x)
        return pattern

    pattern = recorded()
    x.mul_(1.0)  # same values, but written: the version says so
    assert not pattern.holds_for(model, x)
    pattern = recorded()
    with torch.no_grad():
        model.head.weight.add_(0.0)  # as an optimiser step writes it
    assert not pattern.holds_for(model, x)
    pattern = recorded()
    model.train()
    assert not pattern.holds_for(model, x)


def test_only_the_models_own_forward_is_recorded():
    """A submodule called on its own adds no masks; a call by keyword only records no inputs."""
    model, x, _ = model_and_inputs("cnn1d")
    model.eval()
    with linearized.recording(model) as pattern:
        model(x)
        model.features(x)
    assert pattern.holds_for(model, x) and len(pattern.masks) == sum(type(m) is torch.nn.ReLU for m in model.modules())
    with linearized.recording(model) as by_name:
        model(x=x)
    assert not by_name.holds_for(model, x)


class _BranchOnRows(torch.nn.Module):
    """Glue whose ReLU calls depend on the number of rows: a wrong declaration the pass must catch."""

    linear_glue = True

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = torch.nn.Linear(40, 16), torch.nn.ReLU(), torch.nn.Linear(16, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x.flatten(1)))
        return self.b(self.act(h) if len(x) < 8 else h)


def test_a_pass_that_leaves_its_patterns_path_fails_loudly():
    model, x = _BranchOnRows().double(), torch.randn(4, 1, 40, dtype=torch.float64)
    with linearized.recording(model) as pattern:
        model(x)
    with pytest.raises(RuntimeError, match="another path"):
        linearized.jvp_at(pattern, torch.randn(3, *x.shape, dtype=x.dtype))


def test_the_sketch_runs_two_forwards_a_step_on_a_linearized_model():
    """The true class's map's forward (which records x's pattern), then one over the m + 1 direction
    rows: x is not run through the model a second time."""
    model, x, y = model_and_inputs("cnn1d")
    rows = []
    model.register_forward_hook(lambda module, args, out: rows.append(len(args[0])))
    sketched_similarity(model, EXPLANATIONS.build("saliency"), x, y, 4, centre=False, eval_mode=True, ctx=ctx())
    assert rows == [len(x), 5 * len(x)]


def test_which_models_are_linearized():
    """The MNIST-1D models, the zoo's ResNets and WRNs are; VGG (max pooling), MobileNetV2, the
    ShuffleNets (undeclared blocks) and torchvision's (in-place ReLUs) take torch.func.jvp."""
    from tests.test_registry import input_shape_for

    for name in MODELS.names():
        model = build_model(name, {}, input_shape_for(name), K).eval()
        assert linearized.supported(model) == (name in LINEAR_GLUE), name


class _ReluInForward(torch.nn.Module):
    def __init__(self, declares: bool) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(40, 16), torch.nn.Linear(16, K)
        if declares:
            self.linear_glue = True  # an instance attribute: only the class's own declaration counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x.flatten(1))))


class _LyingGlue(_ReluInForward):
    linear_glue = True  # wrong: its forward applies torch.relu

    def __init__(self) -> None:
        super().__init__(False)


def test_what_the_hooks_cannot_see_is_not_linearized():
    """A nonlinearity in a forward, an in-place ReLU, batch norm in train mode: not linearized."""
    assert not linearized.supported(_ReluInForward(True))
    x = torch.randn(2, 1, 40)
    assert linearized.jvp_rows(_ReluInForward(True), x, x[None]) is None  # the caller takes forward mode
    assert linearized.supported(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, K), torch.nn.ReLU()))
    assert not linearized.supported(torch.nn.Sequential(torch.nn.Linear(40, K), torch.nn.ReLU(inplace=True)))
    bn = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), torch.nn.BatchNorm1d(4))
    assert not linearized.supported(bn) and linearized.supported(bn.eval())
    assert not linearized.supported(torch.nn.Sequential(torch.nn.BatchNorm1d(4, track_running_stats=False)).eval())
    drop = torch.nn.Sequential(torch.nn.Linear(40, K), torch.nn.Dropout(0.5))
    assert not linearized.supported(drop) and linearized.supported(drop.eval())
    # Glue that owns a tensor could add it in its forward, an offset no hook removes (a zero
    # at init would even pass the load-time comparison), so it is refused outright.
    assert not linearized.supported(_GlueWithShift())


class _GlueWithShift(torch.nn.Module):
    linear_glue = True

    def __init__(self) -> None:
        super().__init__()
        self.body, self.shift = torch.nn.Linear(40, 16), torch.nn.Parameter(torch.zeros(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1)) + self.shift


def test_a_linear_layer_on_sequence_inputs_loses_its_bias_on_the_feature_dim():
    """nn.Linear on (B, L, C) rows (L == C, where a wrong broadcast would not even fail)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(36, K)).double()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 6, 6, dtype=torch.float64, generator=g), torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=g)
    torch.testing.assert_close(directional_derivatives(model, x, t),
                               directional_derivatives(model, x, t, linearize=False), rtol=1e-9, atol=1e-12)


def test_a_wrong_linear_glue_declaration_is_refused_at_load():
    model = _LyingGlue()
    assert linearized.supported(model.eval()) and not linearization_holds(model, torch.randn(4, 1, 40))
    probe = Probe(torch.randn(4, 1, 40), K, {"self": model.train()}, {"self": "lying"})
    STRUCTURES.build("explanation", {}).check(probe)  # the exact path is fine
    with pytest.raises(ConfigError, match="declares linear_glue") as e:
        STRUCTURES.build("explanation", {"sketch": 4}).check(probe)
    assert "\n" not in str(e.value) and model.training


def test_a_declaration_goes_with_the_forward_it_is_about():
    """Inherited with the forward, lost by writing a new one, made by a subclass for an inherited one."""
    class Glue(torch.nn.Module):
        linear_glue = True

        def forward(self, x):
            return x

    class Inherits(Glue):
        pass

    class Rewrites(Glue):
        def forward(self, x):
            return torch.relu(x)

    class Vouches(Rewrites):
        linear_glue = True

    class Mixin:  # declares, but for no forward of its own
        linear_glue = True

    class Mixed(Mixin, Rewrites):
        pass

    kinds = (Glue, Inherits, Rewrites, Vouches, Mixed, torch.nn.Module)
    assert [linearized.declares_glue(c) for c in kinds] == [True, True, False, True, False, False]
