"""Seed-stacked training (kdablate.stacked): S seeds as one stacked model give each seed what
it would get alone (weights, accuracy, logged epochs), resume per seed, and refuse what is not
per seed. The per-sample checks run over every registered component and explanation source."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from kdablate.attribution import EXPLANATIONS, AttributionContext
from kdablate.bench.core import synthetic
from kdablate.components import MASSES, STRUCTURES, TargetContext
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import load_dataset
from kdablate.models import MODELS, build_model
from kdablate.models.vmap_norm import MathBatchNorm, with_math_norm
from kdablate.objectives import build_objective
from kdablate.stacked import StackView, fit_stacked, refusal
from kdablate.storage import Checkpoint
from kdablate.trainer import CPU, SeedsMismatch, TeacherSignal, fit, make_member

SEEDS = (0, 1, 2)
KNOWLEDGE = {
    "ce": KnowledgeConfig(),
    "ls": KnowledgeConfig(mass={"name": "constant", "eps": 0.1}, structure="uniform", alpha=1.0, temperature=1.0),
    "kd": KnowledgeConfig(mass="teacher", structure="teacher", alpha=0.9, temperature=4.0),
    "permuted": KnowledgeConfig(mass="teacher", structure="permuted", alpha=0.9, temperature=4.0),
    "self": KnowledgeConfig(mass="self", structure="self", alpha=0.5, temperature=2.0),
    "dkd": KnowledgeConfig(objective={"name": "dkd", "beta": 8.0}, alpha=1.0, temperature=4.0, warmup_epochs=1),
}


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("mnist1d", {"num_samples": 400})


def teacher_of(data, seed: int = 5) -> TeacherSignal:
    """Cached logits of a random teacher on every split."""
    g = torch.Generator().manual_seed(seed)
    return TeacherSignal({s: torch.randn(len(data.split(s)[1]), data.num_classes, generator=g) * 3
                          for s in ("train", "val", "test")})


def assert_same(alone, stacked, n_test: int, atol: float = 1e-4) -> None:
    """The stacked seed's weights equal the separate run's up to float rounding; its accuracy
    differs by at most one test sample whose argmax the rounding might flip."""
    a, b = alone.model.state_dict(), stacked.model.state_dict()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=1e-3), k
    assert abs(alone.metrics["report/test_acc"] - stacked.metrics["report/test_acc"]) <= 1 / n_test + 1e-9
    assert alone.metrics["report/epoch"] == stacked.metrics["report/epoch"]


@pytest.mark.parametrize("arm", sorted(KNOWLEDGE))
def test_stacked_mlp_seeds_match_separate_runs(tiny, arm):
    spec, optim, k = ModelSpec(name="mlp", params={"hidden": 16}), OptimConfig(epochs=3, batch_size=32), KNOWLEDGE[arm]
    teacher = teacher_of(tiny) if k.needs() else None
    logs_alone, logs_stacked = {}, {}
    alone = [fit(spec, tiny, optim, k, s, teacher=teacher, on_epoch=lambda e, m, s=s: logs_alone.setdefault(s, []).append(m))
             for s in SEEDS]
    stacked = fit_stacked(spec, tiny, optim, k, SEEDS, [teacher] * len(SEEDS),
                          on_epoch=lambda i, e, m: logs_stacked.setdefault(SEEDS[i], []).append(m))
    for s, a, b in zip(SEEDS, alone, stacked):
        assert_same(a, b, len(tiny.y_test))
        for ma, mb in zip(logs_alone[s], logs_stacked[s]):  # every epoch's curve point, every part
            assert ma.keys() == mb.keys()
            assert all(abs(ma[key] - mb[key]) < 1e-3 for key in ma if not key.startswith("time/")), s


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("arm", ["kd", "permuted"])
def test_in_float64_a_stack_is_the_separate_runs_to_1e_12(tiny, float64, arm):
    """Over many epochs float32 rounding moves a seed's best epoch (the components study saw
    per-seed accuracies up to 2.5 points apart, stacked vs not); in float64 the stack follows
    the separate runs to rounding level, so those gaps are rounding, not a change of the math."""
    data = dataclasses.replace(tiny, **{f"x_{s}": tiny.split(s)[0].double() for s in ("train", "val", "test")})
    g = torch.Generator().manual_seed(5)
    teacher = TeacherSignal({s: torch.randn(len(data.split(s)[1]), 10, generator=g, dtype=torch.float64) * 3
                             for s in ("train", "val", "test")})
    spec, optim = ModelSpec(name="mlp", params={"hidden": 32}), OptimConfig(epochs=15, batch_size=32)
    alone = [fit(spec, data, optim, KNOWLEDGE[arm], s, teacher=teacher) for s in SEEDS[:2]]
    stacked = fit_stacked(spec, data, optim, KNOWLEDGE[arm], SEEDS[:2], [teacher] * 2)
    for a, b in zip(alone, stacked):
        assert a.metrics["report/test_acc"] == b.metrics["report/test_acc"]
        assert a.metrics["report/epoch"] == b.metrics["report/epoch"]
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert all(sa[k].dtype == torch.float64 and torch.allclose(sa[k], sb[k], rtol=0, atol=1e-12) for k in sa)


@pytest.mark.parametrize("norm", ["native", "math"])
@pytest.mark.parametrize("spec, data", [
    (ModelSpec(name="cnn1d", params={"channels": 8, "depth": 2}), None),
    (ModelSpec(name="resnet8"), "images"),
])
def test_stacked_batchnorm_models_match_separate_runs(tiny, spec, data, norm, monkeypatch):
    """BatchNorm keeps statistics per seed, and each seed's augmentation draws from its own stream.
    'math': the stack computes batch norm as tensor math, as it does on CUDA (``vmap_norm``)."""
    if norm == "math":
        monkeypatch.setattr("kdablate.stacked.MATH_NORM_DEVICES", ("cpu", "cuda"))
    data = tiny if data is None else synthetic(10, (3, 16, 16), 96, uint8=True, augment="crop_flip")
    optim = OptimConfig(epochs=2, batch_size=16)
    alone = [fit(spec, data, optim, KnowledgeConfig(), s) for s in SEEDS[:2]]
    stacked = fit_stacked(spec, data, optim, KnowledgeConfig(), SEEDS[:2], [None, None])
    for a, b in zip(alone, stacked):
        assert_same(a, b, len(data.y_test), atol=1e-3)


@pytest.mark.parametrize("bn, shape", [(torch.nn.BatchNorm2d(6), (8, 6, 5, 5)), (torch.nn.BatchNorm1d(6), (8, 6, 7)),
                                       (torch.nn.BatchNorm2d(6, momentum=None), (8, 6, 5, 5)),
                                       (torch.nn.BatchNorm2d(6, affine=False, track_running_stats=False), (8, 6, 3, 3))])
def test_math_batch_norm_is_batch_norm(bn, shape):
    """Outputs, input and weight gradients, running statistics and the batch count, over three
    training steps and then in eval mode, equal ``nn.BatchNorm``'s; and under vmap too."""
    torch.manual_seed(0)
    if bn.affine:
        torch.nn.init.normal_(bn.weight), torch.nn.init.normal_(bn.bias)
    math = with_math_norm(bn)
    assert type(math) is MathBatchNorm and math.state_dict().keys() == bn.state_dict().keys()
    for step in range(4):
        bn.train(step < 3), math.train(step < 3)
        x = (torch.randn(shape) * 3 + 1).requires_grad_()
        y1, y2 = bn(x), math(x)
        assert torch.allclose(y1, y2, atol=1e-5)
        g1 = torch.autograd.grad(y1.square().sum(), [x, *bn.parameters()])
        g2 = torch.autograd.grad(y2.square().sum(), [x, *math.parameters()])
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g1, g2))
        for k, v in bn.state_dict().items():
            assert torch.allclose(v.float(), math.state_dict()[k].float(), atol=1e-6), (step, k)
    xs = torch.randn(3, *shape)  # three seeds under vmap: each as the module alone
    params, buffers = stack_module_state([math, copy.deepcopy(math), copy.deepcopy(math)])
    out = vmap(lambda p, b, x: functional_call(math, (p, b), (x,)))(params, buffers, xs)
    assert torch.allclose(out, torch.stack([bn(x) for x in xs]), atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.9, 1.0])
def test_the_stacked_loss_is_each_seeds_loss_summed(alpha):
    """One fused call over S seeds' (S, B, K) logits: each seed's parts and gradient equal
    ``soft_target_loss`` (or ``ce_only_loss``) on that seed's batch alone."""
    from kdablate.components import ce_only_loss, soft_target_loss, stacked_soft_target_loss

    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 32, 10, generator=g, requires_grad=True)
    y = torch.randint(0, 10, (4, 32), generator=g)
    q = torch.softmax(torch.randn(4, 32, 10, generator=g), -1)
    q[0, 0] = 0.0  # zero entries of q are exact (xlogy), as in the unstacked loss
    q[0, 0, y[0, 0]] = 1.0
    total, parts = stacked_soft_target_loss(z, y, None if alpha == 0 else q, 4.0, alpha)
    (grad,) = torch.autograd.grad(total, z)
    for s in range(4):
        zs = z[s].detach().requires_grad_()
        alone = ce_only_loss(zs, y[s]) if alpha == 0 else soft_target_loss(zs, y[s], q[s], 4.0, alpha)
        assert parts.keys() == alone.keys()
        for k in alone:
            assert torch.allclose(parts[k][s], alone[k].detach(), atol=1e-6), (s, k)
        assert torch.allclose(grad[s], torch.autograd.grad(alone["loss"], zs)[0], atol=1e-7), s


@pytest.mark.parametrize("arm", ["ls", "il"])
def test_a_stack_resumes_per_seed_stacked_or_alone(tiny, tmp_path, arm):
    """Each seed's checkpoint is in the unstacked format: a stopped stack resumes as a stack
    bit for bit, or a seed resumes alone; seeds at different epochs refuse to stack. 'il': a
    sketched explanation arm, whose draws resume per seed."""
    k = KNOWLEDGE["ls"] if arm == "ls" else il({"name": "explanation", "sketch": 2})
    spec, optim = ModelSpec(name="mlp", params={"hidden": 16}), OptimConfig(epochs=4, batch_size=32)
    ckpts = lambda: [Checkpoint(tmp_path / f"{s}.pt", every=1) for s in SEEDS]  # noqa: E731
    whole = fit_stacked(spec, tiny, optim, k, SEEDS, [None] * 3)

    def stop(i, epoch, metrics):
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_stacked(spec, tiny, optim, k, SEEDS, [None] * 3, on_epoch=stop, checkpoints=ckpts())
    assert [c.load()["epoch"] for c in ckpts()] == [2, 2, 2]
    resumed = fit_stacked(spec, tiny, optim, k, SEEDS, [None] * 3, checkpoints=ckpts())
    for a, b in zip(resumed, whole):
        assert all(torch.equal(v, b.model.state_dict()[key]) for key, v in a.model.state_dict().items())
        assert a.metrics == b.metrics
    alone = fit(spec, tiny, optim, k, SEEDS[1], checkpoint=Checkpoint(tmp_path / "1.pt", every=1))
    assert_same(alone, whole[1], len(tiny.y_test))
    (tmp_path / "1.pt").unlink()
    with pytest.raises(SeedsMismatch):
        fit_stacked(spec, tiny, optim, k, SEEDS, [None] * 3, checkpoints=ckpts())


def il(structure: dict) -> KnowledgeConfig:
    return KnowledgeConfig(mass={"name": "constant", "eps": 0.2}, structure=structure, alpha=0.9, temperature=4.0)


def test_a_stack_refuses_an_objective_that_is_not_row_wise(tiny):
    """Called directly (not through the runner's ``refusal``), the stack still refuses a target it
    cannot share rather than training it wrong."""
    scheduled = il({"name": "explanation", "every": 2})
    with pytest.raises(ValueError, match="not row-wise"):
        fit_stacked(ModelSpec(name="mlp", params={"hidden": 8}), tiny, OptimConfig(epochs=1), scheduled, SEEDS[:2],
                    [None] * 2)


@pytest.mark.parametrize("knowledge, why", [
    (il({"name": "explanation", "source": "cam"}), "reads a model"),  # the training forward's features
    (il({"name": "explanation", "source": "cam", "mode": "eval"}), "not row-wise"),  # the model's modules
    (il({"name": "explanation", "source": "gradcam", "source_params": {"layer": "features"}}), "not row-wise"),
    (il({"name": "explanation", "source": "saliency", "every": 2, "fraction": 0.5}), "not row-wise"),  # an EMA
    (il({"name": "explanation", "source": "saliency", "explainer": "teacher"}), "reads a model"),
    (il({"name": "permuted", "base": "explanation", "base_params": {"source": "cam"}}), "reads a model"),
    (KnowledgeConfig(mass="peer", structure="peer", alpha=0.9), "DML cohort"),
])
def test_what_is_not_per_seed_is_refused(knowledge, why):
    assert why in refusal(ModelSpec(name="mlp"), knowledge, [None], CPU)
    assert refusal(ModelSpec(name="mlp"), KNOWLEDGE["kd"], [None], dataclasses.replace(CPU, amp="fp16"))
    assert refusal(ModelSpec(name="mlp"), KNOWLEDGE["kd"], [None], CPU) == ""


STACKED_IL = {  # the student's own explanations, from every stackable source and schedule
    **{name: {"source": name, "source_params": dict(EXPLANATIONS.get(name).quick_params)}
       for name in EXPLANATIONS.names() if EXPLANATIONS.get(name).stackable},
    "saliency sketch=3": {"source": "saliency", "sketch": 3},
    "grad_input sketch=2 pearson": {"source": "grad_input", "sketch": 2, "similarity": "pearson"},
    "saliency differentiable": {"source": "saliency", "differentiable": True},
}


@pytest.mark.parametrize("spec", [ModelSpec(name="mlp", params={"hidden": 32}),
                                  ModelSpec(name="cnn1d", params={"channels": 8, "depth": 2})], ids=["mlp", "cnn1d"])
@pytest.mark.parametrize("arm", [*STACKED_IL, "permuted over saliency"])
def test_in_float64_an_explanation_stack_is_the_separate_runs(tiny, float64, spec, arm):
    """Introspective arms stack: every seed's rows are explained in one call on the stacked model
    (eval-mode BN with each seed's statistics in the CNN), each seed's sketch directions and
    permutations drawn from its own generator, gradients through the maps when differentiable.
    In float64 the seeds follow their separate runs to rounding level (1e-16 measured)."""
    data = dataclasses.replace(tiny, **{f"x_{s}": tiny.split(s)[0].double() for s in ("train", "val", "test")})
    structure = ({"name": "permuted", "base": "explanation", "base_params": {"source": "saliency"}}
                 if arm.startswith("permuted") else {"name": "explanation", **STACKED_IL[arm]})
    knowledge, optim = il(structure), OptimConfig(epochs=2, batch_size=32)
    assert refusal(spec, knowledge, [None], CPU) == ""
    alone = [fit(spec, data, optim, knowledge, s) for s in SEEDS[:2]]
    stacked = fit_stacked(spec, data, optim, knowledge, SEEDS[:2], [None, None])
    for a, b in zip(alone, stacked):
        assert a.metrics["report/test_acc"] == b.metrics["report/test_acc"]
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert all(torch.allclose(sa[k].double(), sb[k].double(), rtol=0, atol=1e-12) for k in sa)


# --- per row: what lets one context over a stack's S*B rows stand for S seeds' ---------------------

def components() -> list:
    """Every registered mass and structure at its default parameters, and some that are not
    row-wise: (kind, spec) pairs."""
    out = []
    for kind, registry in (("mass", MASSES), ("structure", STRUCTURES)):
        for name in registry.names():
            try:
                registry.params(name, {})
            except Exception:  # noqa: BLE001 - a component whose parameters have no defaults
                continue
            out.append(pytest.param(kind, {"name": name}, id=f"{kind}-{name}"))
    return out


def seed_rows(n: int = 6, k: int = 10) -> tuple[list[TargetContext], TargetContext]:
    """Three seeds' rows at one step (float64): each seed's context alone, with its own model, and
    the stack's one context over all of them, with the stacked model, as a stacked step makes it."""
    g = torch.Generator().manual_seed(7)
    y = torch.randint(0, k, (3 * n,), generator=g)
    z, t, p = (torch.randn(3 * n, k, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    x = torch.randn(3 * n, 1, 40, generator=g, dtype=torch.float64)
    st, models = three_seed_stack("cnn1d")
    common = {"num_classes": k, "class_groups": torch.arange(k) // 3}
    alone = [TargetContext(y[rows], student_logits=z[rows], teacher_logits=t[rows], peer_logits=p[rows], inputs=x[rows],
                           generators=(torch.Generator().manual_seed(10 + s),), models={"self": models[s]}, **common)
             for s, rows in enumerate(slice(s * n, (s + 1) * n) for s in range(3))]
    together = TargetContext(y, student_logits=z, teacher_logits=t, peer_logits=p, inputs=x, **common,
                             generators=tuple(torch.Generator().manual_seed(10 + s) for s in range(3)),
                             models={"self": StackView(st, n)})
    return alone, together


PERMUTED_OVER = [pytest.param("structure", {"name": "permuted", "base": b}, id=f"structure-permuted-over-{b}")
                 for b in ("self", "uniform", "oracle", "peer", "explanation")]
SCHEDULED = [pytest.param("structure", {"name": "explanation", **p}, id=f"structure-explanation-{k}")
             for k, p in (("every2", {"every": 2}), ("fraction0.5", {"fraction": 0.5}))]


@pytest.mark.parametrize("kind, spec", components() + PERMUTED_OVER + SCHEDULED)
def test_a_row_wise_component_gives_a_stacks_rows_what_each_seed_gets_alone(kind, spec):
    """What lets a stack build every seed's target in one call: a component that declares
    ``row_wise`` gives each seed's rows of the stack's one context what the seed's own call gives
    them, its draws from that seed's own generator and its explanations by that seed's weights
    included, and keeps nothing that one seed would own. One that is not row-wise is refused by
    the stack, which names it."""
    part = (MASSES if kind == "mass" else STRUCTURES).build(spec["name"], {k: v for k, v in spec.items() if k != "name"})
    if not part.row_wise:
        other = {"structure": "uniform"} if kind == "mass" else {"mass": {"name": "constant", "eps": 0.2}}
        knowledge = KnowledgeConfig(**{kind: spec}, **other, alpha=0.9, temperature=4.0)
        assert f"its {kind} '{spec['name']}' is not row-wise" in refusal(ModelSpec(name="mlp"), knowledge, [None], CPU)
        return
    alone_ctxs, together_ctx = seed_rows()
    alone = torch.cat([part(c, 4.0) for c in alone_ctxs])
    together = part(together_ctx, 4.0)
    assert torch.allclose(together.double(), alone.double(), rtol=0, atol=1e-10)
    for a, g in zip(alone_ctxs, together_ctx.generators):  # each generator advanced as far as alone
        assert torch.equal(a.generators[0].get_state(), g.get_state())
    assert all(v is None for v in part.state_dict().values())  # nothing kept that one seed would own


def test_a_scheduled_or_teacher_explanation_is_not_row_wise():
    """A schedule fills the rows it does not explain from a class EMA (state of its seed), and a
    memo or a training forward's features are not a row's own: such arms train seed by seed."""
    for params in ({"every": 2}, {"fraction": 0.5}, {"explainer": "teacher"}, {"source": "cam"}):
        assert not STRUCTURES.build("explanation", params).row_wise, params
    assert STRUCTURES.build("explanation", {}).row_wise


def test_a_subclass_that_changes_the_computation_is_not_row_wise_unless_it_says_so():
    from kdablate.components.structure import SourceStructure

    class Teacherish(SourceStructure):
        source = "teacher"

    class Counting(SourceStructure):
        def __call__(self, ctx, temperature):
            return super().__call__(ctx, temperature)

    class Declared(Counting):
        row_wise = True

    assert Teacherish.row_wise and not Counting.row_wise and Declared.row_wise


def test_a_component_without_the_temperature_argument_fails_where_it_is_defined():
    """A component written as ``__call__(self, ctx)`` would fail at its first training step; it
    fails when its class is defined instead, saying what the call takes."""
    from kdablate.components.context import Component

    with pytest.raises(TypeError, match=r"must take \(self, ctx, temperature\)"):
        class Old(Component):
            def __call__(self, ctx):
                return ctx.labels


def test_a_stacks_context_draws_per_seed_and_slices_to_a_seed():
    """The stack's context draws each seed's rows from that seed's generator; a source reading one
    generator over several seeds' rows is refused rather than drawing from the global RNG; a
    seed's slice is its rows and generator, with no model and no listener."""
    alone, together = seed_rows()
    assert together.seeds == 3 and together.uniform(4).shape == (18, 4)
    with pytest.raises(TypeError, match="3 seeds' rows"):
        AttributionContext(generators=together.generators).generator
    one = together.seed(1)
    assert torch.equal(one.labels, alone[1].labels) and torch.equal(one.inputs, alone[1].inputs)
    assert one.generators == together.generators[1:2] and one.models == {} and one.observe is None
    with pytest.raises(RuntimeError, match="has none"):
        TargetContext(one.labels, 10, one.student_logits).uniform(3)


@pytest.mark.parametrize("arm", [*sorted(KNOWLEDGE), "cp"])
def test_an_objectives_seeds_loss_is_each_seeds_loss(arm):
    """``Objective.seeds_loss`` over a stack's rows: each seed's parts and gradient are what the
    objective gives that seed's rows alone (the fused node, the default seed-by-seed path for DKD
    and the confidence penalty)."""
    knowledge = KnowledgeConfig(entropy_penalty=0.1) if arm == "cp" else KNOWLEDGE[arm]
    alone_ctxs, together = seed_rows()
    z = torch.randn(3, 6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    total, parts = build_objective(knowledge).seeds_loss(z, together)
    (grad,) = torch.autograd.grad(total, z)
    for s, ctx in enumerate(alone_ctxs):
        zs = z[s].detach().requires_grad_()
        alone = build_objective(knowledge)(zs, ctx)
        assert parts[s].keys() == alone.keys()
        assert all(torch.allclose(parts[s][k].detach(), alone[k].detach(), rtol=0, atol=1e-12) for k in alone)
        assert torch.allclose(grad[s], torch.autograd.grad(alone["loss"], zs)[0], rtol=0, atol=1e-12), s


def test_seeds_loss_refuses_logits_of_other_seeds_than_its_context():
    _, together = seed_rows()
    z = torch.zeros(2, 9, 10, dtype=torch.float64)
    for knowledge in (KNOWLEDGE["kd"], KNOWLEDGE["dkd"]):
        with pytest.raises(ValueError, match="2 seeds' logits of 9 rows each, but a context of 3 seeds' 18 rows"):
            build_objective(knowledge).seeds_loss(z, together)


@pytest.mark.parametrize("arm", ["permuted", "self"])
def test_a_stack_builds_every_seeds_target_in_one_call(tiny, arm, monkeypatch):
    """Each stacked step builds the target of all S seeds in one call over their S*B rows."""
    objective_type = type(build_objective(KNOWLEDGE[arm]))
    calls, original = [], objective_type.target
    monkeypatch.setattr(objective_type, "target", lambda self, ctx: calls.append(ctx.seeds) or original(self, ctx))
    fit_stacked(ModelSpec(name="mlp", params={"hidden": 8}), tiny, OptimConfig(epochs=1, batch_size=100),
                KNOWLEDGE[arm], SEEDS, [teacher_of(tiny)] * len(SEEDS))
    assert calls == [len(SEEDS)] * (len(tiny.y_train) // 100)


@pytest.mark.parametrize("name", EXPLANATIONS.names())
def test_every_explanation_source_is_per_sample(name):
    """Each sample's maps depend on that sample only (eval mode), the property a stacked
    explanation path rests on."""
    source = EXPLANATIONS.build(name, EXPLANATIONS.get(name).quick_params)
    torch.manual_seed(0)
    model = build_model("cnn1d", {"channels": 8, "depth": 2}, (1, 40), 10).eval()
    x = torch.randn(6, 1, 40)
    parts = torch.cat([source.attribute(model, x[:3]), source.attribute(model, x[3:])])
    assert torch.allclose(parts, source.attribute(model, x), atol=1e-5)


def three_seed_stack(name: str):
    """A stack of 3 freshly built seeds of ``name`` (float64, BN in train mode) and their own modules."""
    from kdablate.stacked import build_stack

    spec = ModelSpec(name=name, params={"channels": 8, "depth": 2} if name == "cnn1d" else {"hidden": 16})
    data = synthetic(10, (1, 40), 64)
    members = [make_member(spec, data, OptimConfig(epochs=1, batch_size=16), KnowledgeConfig(), s, 4) for s in SEEDS]
    for m in members:
        m.model.double()
    return build_stack(members, OptimConfig(epochs=1, batch_size=16), 4), [m.model for m in members]


@pytest.mark.parametrize("model_name", ["mlp", "cnn1d"])
@pytest.mark.parametrize("name", [n for n in EXPLANATIONS.names() if EXPLANATIONS.get(n).stackable])
def test_a_stackable_source_explains_a_stack_as_each_seed_alone(name, model_name):
    """On ``StackView`` (every seed's rows in one call, seed-major), a source that says ``stackable``
    gives each seed's rows the maps its own model gives them, in eval mode, and leaves the mode as it
    was; any other row count is refused, not silently split."""
    from kdablate.components.explanation import explain
    from kdablate.stacked import StackView

    source = EXPLANATIONS.build(name, EXPLANATIONS.get(name).quick_params)
    st, models = three_seed_stack(model_name)
    x = torch.randn(3 * 4, 1, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    view = StackView(st, 4)
    together = explain(view, source, x, eval_mode=True, ctx=AttributionContext())
    alone = torch.cat([explain(m, source, xs, eval_mode=True, ctx=AttributionContext()) for m, xs in zip(models, x.split(4))])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-12)
    assert view.training and st.base.training
    with pytest.raises(RuntimeError, match="rows per seed"):
        view(x[:10])


def test_a_source_subclass_is_not_stackable_unless_it_says_so():
    """A registered subclass of a stackable source (e.g. one that adds noise) must restate it."""
    from kdablate.attribution import Cost, Saliency

    name = "test_stacked_noisy_saliency"
    if name not in EXPLANATIONS:
        @EXPLANATIONS.register(name)
        class Noisy(Saliency):
            cost = Cost.PER_CLASS

    assert EXPLANATIONS.get("saliency").stackable and not EXPLANATIONS.get(name).stackable
    k = il({"name": "explanation", "source": name})
    assert "not row-wise" in refusal(ModelSpec(name="mlp"), k, [None], CPU)


# --- the runner: units of work, child runs per seed, the fallback -----------------------------

def test_work_units_group_the_seeds_of_a_cell():
    from kdablate.runner import RunOptions, work_units
    from kdablate.study import load_study

    smoke = load_study(Path(__file__).resolve().parents[1] / "studies" / "smoke.yaml")
    units = work_units(smoke.cells, RunOptions(device="cpu"))
    assert sorted(len(u) for u in units) == [2] * len(smoke.arms())
    assert all(len({(c.arm, c.config_hash()) for c in u}) == len(u) and len({c.arm for c in u}) == 1 for u in units)
    assert all(len(u) == 1 for u in work_units(smoke.cells, RunOptions(device="cpu", stack="off")))
    assert all(len(u) == 1 for u in work_units(smoke.cells, RunOptions(device="cpu", stack_max=1)))
    resnet = [c.model_copy(update={"student": ModelSpec(name="resnet8")}) for c in smoke.cells]
    assert all(len(u) == 1 for u in work_units(resnet, RunOptions(device="cpu")))  # auto: slower on a CPU
    # auto on CUDA stacks what the GPU rows measured faster, ResNet-8 included; a deeper ResNet
    # is unmeasured there, so it trains one by one. Placement only: no GPU is touched.
    assert sorted(len(u) for u in work_units(resnet, RunOptions(device="cuda"))) == [2] * len(smoke.arms())
    resnet20 = [c.model_copy(update={"student": ModelSpec(name="resnet20")}) for c in smoke.cells]
    assert all(len(u) == 1 for u in work_units(resnet20, RunOptions(device="cuda")))


def test_a_stacked_study_logs_each_seed_as_its_run_and_cam_arms_run_alone(mlflow_store, tmp_path, capsys):
    from kdablate import tracking
    from kdablate.runner import RunOptions, run_study
    from kdablate.study import load_study

    path = tmp_path / "st.yaml"
    path.write_text("""
base:
  data: {name: mnist1d, num_samples: 500}
  student: {name: mlp, hidden: 16, depth: 1}
  optim: {epochs: 2, batch_size: 64}
seeds: [0, 1]
arms:
  - {name: ls, mass: {name: constant, eps: 0.1}, structure: uniform, alpha: 1.0}
  - {name: il, mass: {name: constant, eps: 0.2}, structure: {name: explanation, source: saliency}, alpha: 0.9}
  - {name: cam, mass: {name: constant, eps: 0.2}, structure: {name: explanation, source: cam}, alpha: 0.9}
""")
    results = {}
    for stack in ("on", "off"):
        study = load_study(path)
        uri = f"sqlite:///{tmp_path / stack}.db"
        assert run_study(study, RunOptions(cache_dir=tmp_path / "cache", progress=False, stack=stack, uri=uri)) == 0
        client = tracking.client(uri)
        runs = tracking.search_cells(client, client.get_experiment_by_name(study.name).experiment_id, "FINISHED")
        results[stack] = {r.info.run_name: r for r in runs}
    out = capsys.readouterr().out
    assert "note: cam: seeds train one by one, not stacked" in out and "reads a model" in out
    assert "note: il:" not in out
    on, off = results["on"], results["off"]
    assert set(on) == set(off) == {f"{arm}/seed{s}" for arm in ("ls", "il", "cam") for s in (0, 1)}
    assert on["ls/seed0"].data.tags["kdablate.stacked"] == on["il/seed1"].data.tags["kdablate.stacked"] == "2"
    assert "kdablate.stacked" not in on["cam/seed0"].data.tags
    for name in on:
        assert abs(tracking.summary(on[name])["report/test_acc"] - tracking.summary(off[name])["report/test_acc"]) <= 0.002


@pytest.mark.parametrize("name", [n for n in MODELS.names() if hasattr(MODELS.get(n), "stacked_forward")])
def test_a_models_own_stacked_forward_is_vmap_over_its_forward(name):
    """A model's ``stacked_forward`` (the fast path) gives what vmap over ``forward`` gives,
    values and gradients, so either path trains the same seeds."""
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)
    models = [build_model(name, {}, (1, 40), 10) for _ in range(3)]
    params, buffers = stack_module_state(models)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    x = torch.randn(3, 8, 1, 40)
    fast = models[0].stacked_forward(params, x)
    slow = vmap(lambda p, b, xb: functional_call(models[0], (p, b), (xb,)))(params, buffers, x)
    assert torch.allclose(fast, slow, atol=1e-5)
    grads = [torch.autograd.grad(out.square().sum(), list(params.values())) for out in (fast, slow)]
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*grads))


def test_a_component_that_declares_it_reads_features_is_refused():
    """Declared needs are enough: a plugin that reads the feature map trains unstacked even if it
    says ``row_wise`` (a stacked step has no features to give it)."""
    from kdablate.components import Need
    from kdablate.components.context import Component
    from kdablate.components.structure import uniform_structure

    if "test_stacked_features" not in STRUCTURES:
        @STRUCTURES.register("test_stacked_features")
        class ReadsFeatures(Component):
            needs = Need.FEATURES
            row_wise = True

            def __call__(self, ctx, temperature):
                return uniform_structure(ctx.labels, ctx.num_classes)

    k = KnowledgeConfig(mass={"name": "constant", "eps": 0.1}, structure="test_stacked_features", alpha=1.0)
    assert "reads a model" in refusal(ModelSpec(name="mlp"), k, [], CPU)


def test_a_seed_that_fails_after_the_stack_trained_fails_alone(mlflow_store, tmp_path, monkeypatch, capsys):
    """Logging one seed's results fails: that seed is FAILED with the reason, the others are
    FINISHED once, and nothing trains again one by one."""
    from kdablate import tracking
    from kdablate.runner import cells
    from kdablate.runner import RunOptions, run_study
    from kdablate.study import load_study

    path = tmp_path / "fs.yaml"
    path.write_text("""
base: {data: {name: mnist1d, num_samples: 500}, student: {name: mlp, hidden: 16, depth: 1}, optim: {epochs: 1}}
seeds: [0, 1, 2]
arms: [{name: ce, mass: none, alpha: 0.0}]
""")
    real = cells.record_result

    def flaky(client, run_id, cell, *rest):
        if cell.seed == 1:
            raise OSError("disk full")
        return real(client, run_id, cell, *rest)

    monkeypatch.setattr(cells, "record_result", flaky)
    assert run_study(load_study(path), RunOptions(cache_dir=tmp_path / "cache", progress=False)) == 1
    client = tracking.client()
    runs = tracking.search_cells(client, client.get_experiment_by_name("fs").experiment_id)
    status = {r.info.run_name: r.info.status for r in runs}
    assert status == {"ce/seed0": "FINISHED", "ce/seed1": "FAILED", "ce/seed2": "FINISHED"}
    assert "not stacked" not in capsys.readouterr().out  # no fallback: nothing trained twice
