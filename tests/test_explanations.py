"""Every explanation source against captum's per-class equivalent, to 1e-5, on 1-D models and a
2-D zoo ResNet (Grad-CAM at inner layers too), and CAM's identity with Grad-CAM; every source's
declared cost, and every source inside the explanation structure.

A new source adds one ``Reference`` to ``REFERENCES``: the parametrized tests pick it up, and a
registered source without one fails, naming what to add. ``check_matches_captum`` and
``check_source_in_structure`` are the checks themselves, reused by ``tests/test_newcomer.py``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable

import pytest
import torch

import captum.attr as captum_attr

from kdablate.attribution import (EXPLANATIONS, AttributionContext, Cost, Explanation, SourceRegistry,
                                  class_activation_maps, module_at)
from kdablate.components import STRUCTURES, TargetContext
from kdablate.components.context import Probe
from kdablate.components.explanation import explanation_similarity, structure_from_similarity
from kdablate.components.structure import uniform_structure
from kdablate.models import MODELS, build_model

K = 10
# The seed of any noise: ours draws it through ctx.generator, captum through the global RNG, and
# a CPU generator and the global RNG seeded alike give the same float32 normals.
NOISE_SEED = 5


def model_and_inputs(name: str, dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Module, torch.Tensor]:
    """An eval-mode model and its inputs: (6, 1, 40) signals, or (2, 3, 32, 32) images for the zoo's
    resnet8."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "resnet8":
        model = build_model(name, {}, (3, 32, 32), K).to(dtype).eval()
        return model, torch.randn(2, 3, 32, 32, dtype=dtype, generator=g)
    params = {"hidden": 32} if name == "mlp" else {"channels": 8, "depth": 2}
    model = build_model(name, params, (1, 40), K).to(dtype).eval()
    return model, torch.randn(6, 1, 40, dtype=dtype, generator=g)


@dataclasses.dataclass(frozen=True)
class Reference:
    """captum's per-class equivalent of one source.

    method: a captum attribution class (or a callable building one) taking the model, and the
        layer module when ``layer`` is set.
    kwargs: captum's ``attribute`` keywords besides the inputs and target.
    params: our source's parameters.
    layer: for a layer method, the layer (a name in ``named_modules``); its (B, 1, *L) maps are
        squeezed, and the MLP, whose layers have no spatial dims, is left out.
    times_positions: scale captum's maps by L, the number of positions of the layer.
    dtype: float32 where captum draws float32 noise, so both see the same noise.
    """

    method: Callable[..., captum_attr.Attribution]
    kwargs: dict = dataclasses.field(default_factory=dict)
    params: dict = dataclasses.field(default_factory=dict)
    layer: str | None = None
    times_positions: bool = False
    dtype: torch.dtype = torch.float64

    def models(self) -> tuple[str, ...]:
        return ("cnn1d", "resnet8") if self.layer else ("cnn1d", "mlp", "resnet8")


REFERENCES: dict[str, Reference] = {
    "saliency": Reference(captum_attr.Saliency, {"abs": False}),
    "grad_input": Reference(captum_attr.InputXGradient),
    "integrated_gradients": Reference(captum_attr.IntegratedGradients,
                                      {"baselines": 0.0, "n_steps": 32, "method": "riemann_middle"}),
    "gradcam": Reference(captum_attr.LayerGradCam, {"relu_attributions": True}, layer="features"),
    # CAM is Grad-CAM without the ReLU for a GAP + linear head, up to the 1/L of the pooling
    # (L = the number of positions, H * W for images).
    "cam": Reference(captum_attr.LayerGradCam, layer="features", times_positions=True),
}


def captum_maps(ref: Reference, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """captum's single-class attributions for every class, stacked: (B, K, *S)."""
    method = ref.method(model, module_at(model, ref.layer)) if ref.layer else ref.method(model)

    def one(c: int) -> torch.Tensor:
        torch.manual_seed(NOISE_SEED)  # every class sees the same noise, as ours draws it once for all K
        out = method.attribute(x, target=c, **ref.kwargs)
        return out.squeeze(1) if ref.layer else out

    maps = torch.stack([one(c) for c in range(K)], dim=1)
    return maps * math.prod(maps.shape[2:]) if ref.times_positions else maps


def check_matches_captum(source: str, ref: Reference, model_name: str) -> torch.Tensor:
    """Our maps of ``source`` with ``ref.params`` equal captum's to 1e-5; returns captum's."""
    model, x = model_and_inputs(model_name, ref.dtype)
    ctx = AttributionContext(generators=(torch.Generator().manual_seed(NOISE_SEED),))
    ours = EXPLANATIONS.build(source, ref.params).attribute(model, x, ctx=ctx)
    theirs = captum_maps(ref, model, x)
    assert ours.shape == theirs.shape and ours.shape[:2] == (len(x), K)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    return theirs


CASES = [(m, s) for s in EXPLANATIONS.names()
         for m in (REFERENCES[s].models() if s in REFERENCES else ("cnn1d",))]


@pytest.mark.parametrize("model_name,source", CASES)
def test_matches_captum(source, model_name):
    if source not in REFERENCES:
        pytest.fail(f"explanation source '{source}' has no captum reference: add a Reference (captum class, "
                    "params, layer) to REFERENCES in tests/test_explanations.py")
    check_matches_captum(source, REFERENCES[source], model_name)


# Grad-CAM away from the default layer: a whole stage-2 block (16 x 16), the first conv-BN-ReLU
# inside a stage-1 block (32 x 32), and a BatchNorm whose output is signed (32 x 32).
LAYERS = {"features": (8, 8), "features.2": (16, 16), "features.1.body.0": (32, 32), "features.1.body.1.1": (32, 32)}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_gradcam_at_any_layer_of_a_2d_resnet_matches_captum(layer):
    ref = dataclasses.replace(REFERENCES["gradcam"], params={"layer": layer}, layer=layer)
    theirs = check_matches_captum("gradcam", ref, "resnet8")
    assert theirs.shape == (2, K, *LAYERS[layer])
    assert (theirs > 0).any() and (theirs == 0).any()  # the ReLU cut something, and left something


@pytest.mark.parametrize("source", EXPLANATIONS.names())
def test_every_source_declares_its_cost_and_quick_params(source):
    cls = EXPLANATIONS.get(source)
    assert isinstance(cls.cost, Cost) and isinstance(cls.quick_params, dict)
    model, x = model_and_inputs("cnn1d")
    ctx = AttributionContext(generators=(torch.Generator().manual_seed(NOISE_SEED),))
    maps = EXPLANATIONS.build(source, cls.quick_params).attribute(model, x, ctx=ctx)
    assert maps.shape[:2] == (len(x), K) and torch.isfinite(maps).all()


def test_the_registry_refuses_a_source_without_a_cost_or_with_wrong_quick_params():
    reg = SourceRegistry("explanation")

    class Free(Explanation):
        def attribute(self, model, inputs, *, ctx=AttributionContext()):
            return inputs

    with pytest.raises(TypeError, match="explanation 'free' \\(Free\\) declares no cost"):
        reg.register("free")(Free)

    class Typo(Free):
        cost = Cost.PER_CLASS
        quick_params = {"step": 8}

    with pytest.raises(TypeError, match="quick_params are not its parameters: .*no parameter 'step'"):
        reg.register("typo")(Typo)
    assert reg.names() == []  # a refused source leaves no entry behind


def check_source_in_structure(source: str, params: dict, ctx: TargetContext) -> torch.Tensor:
    """The explanation structure over ``source`` accepts the cnn1d in ``ctx.models['self']`` at load
    (its ``check``) and gives a (B, K) distribution off the true class; returns it."""
    structure = STRUCTURES.build("explanation", {"source": source, "source_params": params})
    model = ctx.models["self"]
    structure.check(Probe(ctx.inputs[:4], K, {"self": model}, {"self": "cnn1d"}))
    r = structure(ctx, 4.0)
    y = ctx.labels
    assert r.shape == (len(y), K) and torch.isfinite(r).all() and (r >= 0).all()
    assert (r.gather(1, y[:, None]) == 0).all()
    torch.testing.assert_close(r.sum(1), torch.ones(len(y)))
    return r


def cnn_context(batch: dict) -> TargetContext:
    """A step's context whose explainer ('self') is the batch's cnn1d, with its feature map."""
    cnn = batch["models"]["teacher"]
    return TargetContext(labels=batch["labels"], num_classes=batch["k"], student_logits=batch["student"],
                         generators=(torch.Generator().manual_seed(0),), inputs=batch["inputs"], models={"self": cnn},
                         features=cnn.features(batch["inputs"]).detach(), step=0)


@pytest.mark.parametrize("source", EXPLANATIONS.names())
def test_every_source_makes_a_structure(source, batch):
    check_source_in_structure(source, EXPLANATIONS.get(source).quick_params, cnn_context(batch))


SKETCHABLE = [n for n in EXPLANATIONS.names() if EXPLANATIONS.get(n).sketchable]


@pytest.mark.parametrize("model_name", ["cnn1d", "mlp"])
@pytest.mark.parametrize("source", SKETCHABLE)
def test_a_sketchable_source_projects_and_explains_one_class_as_its_maps_do(source, model_name):
    """``project`` gives <E_c, v> for every class and direction, ``attribute_labels`` E_y: both
    against the source's own ``attribute`` (the sketched structure relies on nothing else)."""
    model, x = model_and_inputs(model_name)
    src = EXPLANATIONS.build(source)
    maps = src.attribute(model, x)  # (B, K, 1, 40)
    v = torch.randn(3, *x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(2))
    expected = torch.einsum("bkd,mbd->bkm", maps.flatten(2), v.flatten(2))
    torch.testing.assert_close(src.project(model, x, v), expected, rtol=1e-10, atol=1e-12)
    y = torch.arange(len(x)) % K
    torch.testing.assert_close(src.attribute_labels(model, x, y), maps[torch.arange(len(x)), y], rtol=1e-10,
                               atol=1e-12)


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


def test_cam_reads_the_training_forwards_features():
    model, x = model_and_inputs("cnn1d")
    cam = EXPLANATIONS.build("cam")
    features = model.features(x)
    torch.testing.assert_close(cam.attribute(model, x, ctx=AttributionContext(features=features)),
                               cam.attribute(model, x), rtol=0, atol=0)
    fake = AttributionContext(features=torch.zeros_like(features))
    assert (cam.attribute(model, x, ctx=fake) == 0).all()  # it used them, rather than a forward of its own


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
    maps = EXPLANATIONS.build("saliency").attribute(model, x, ctx=AttributionContext(create_graph=True))
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


def test_a_schedule_gives_the_rows_it_does_not_explain_the_ema_before_the_step(batch):
    """fraction < 1: the first n rows are explained, the rest take their class's EMA as it was
    before this step (then the EMA moves toward the explained rows); a skipped step (every > 1)
    takes the EMA for every row. Both report what they explained to the measurements."""
    from kdablate.components.context import Observation

    seen: list[Observation] = []
    ctx = dataclasses.replace(cnn_context(batch), observe=seen.append)
    y, n = ctx.labels, len(ctx.labels) // 2
    structure = STRUCTURES.build("explanation", {"every": 2, "fraction": 0.5, "ema": 0.5})
    for step in (0, 1, 2):
        before = None if structure.class_matrix is None else structure.class_matrix.clone()
        r = structure(dataclasses.replace(ctx, step=step), 4.0)
        ema = uniform_structure(torch.arange(K), K) if before is None else before
        if step % 2:
            assert torch.equal(r, ema[y]) and len(seen[-1].rows) == 0
        else:
            assert torch.equal(r[n:], ema[y[n:]]) and torch.equal(seen[-1].rows, r[:n])
            assert not torch.equal(structure.class_matrix, ema)  # moved after the step
    assert len(seen) == 3


def test_a_frozen_teachers_similarities_are_computed_once_per_row_and_label():
    """The teacher explainer memoises its similarities per (input row, label): over steps that
    repeat rows, the structure gives what explaining every row afresh gives (to float rounding:
    a row's batch differs), explains each row once, and forgets when the teacher changes."""
    torch.manual_seed(0)
    teacher = build_model("cnn1d", {"channels": 8, "depth": 2}, (1, 40), K).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 1, 40, generator=g), torch.randint(0, K, (12,), generator=g)
    calls: list[int] = []

    def step(structure, rows: list[int]) -> torch.Tensor:
        ctx = TargetContext(labels=y[rows], num_classes=K, student_logits=torch.zeros(len(rows), K),
                            inputs=x[rows], models={"teacher": teacher}, step=0)
        return structure(ctx, 4.0)

    memo = STRUCTURES.build("explanation", {"explainer": "teacher"})
    fresh = STRUCTURES.build("explanation", {"explainer": "teacher"})
    fresh.memoizes = False
    assert memo.memoizes
    original = memo.similarity
    memo.similarity = lambda model, xs, ys, c: calls.append(len(xs)) or original(model, xs, ys, c)
    for rows in ([0, 1, 2, 3], [2, 3, 4, 5, 6], [6, 0, 5, 1], list(range(12))):
        torch.testing.assert_close(step(memo, rows), step(fresh, rows), rtol=1e-5, atol=1e-6)
    assert calls == [4, 3, 5]  # each row explained once; the third step explained nothing
    y[0] = (y[0] + 1) % K  # the same input row with another label is another entry
    step(memo, [0])
    with torch.no_grad():
        teacher.head.bias.add_(1.0)  # a changed teacher: everything is explained again
    step(memo, [1, 2])
    assert calls == [4, 3, 5, 1, 2]
    for params in ({"explainer": "teacher", "sketch": 2}, {"explainer": "self"}):
        assert not STRUCTURES.build("explanation", params).memoizes


def test_a_teacher_explainer_cell_resumes_bit_for_bit_with_its_memo(tmp_path, monkeypatch):
    """The memo is checkpointed with the structure (tensors only) and kept across the teacher's
    reload (its values' digest, not its tensors' identity), so a resumed cell explains exactly the
    rows an uninterrupted one explains and ends with the same weights, bit for bit."""
    from kdablate.components.explanation import ExplanationStructure
    from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
    from kdablate.data import load_dataset
    from kdablate.storage import Checkpoint
    from kdablate.trainer import TeacherSignal, fit

    data = load_dataset("mnist1d", {"num_samples": 400})
    torch.manual_seed(0)
    teacher = build_model("cnn1d", {"channels": 8, "depth": 2}, (1, 40), 10).eval().requires_grad_(False)
    with torch.no_grad():
        signal = TeacherSignal({s: teacher(data.split(s)[0]) for s in ("train", "val", "test")}, model=teacher)
    k = KnowledgeConfig(mass={"name": "constant", "eps": 0.2}, temperature=4.0, alpha=0.9,
                        structure={"name": "explanation", "explainer": "teacher", "every": 2})
    spec, optim = ModelSpec(name="mlp", params={"hidden": 16}), OptimConfig(epochs=4, batch_size=32)
    rows: list[int] = []  # rows explained afresh, call by call
    original = ExplanationStructure.similarity
    monkeypatch.setattr(ExplanationStructure, "similarity",
                        lambda self, model, x, y, c: rows.append(len(x)) or original(self, model, x, y, c))
    by_epoch: dict[int, int] = {}
    whole = fit(spec, data, optim, k, 0, teacher=signal, on_epoch=lambda e, m: by_epoch.setdefault(e, sum(rows)))

    def stop(epoch, metrics):
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(spec, data, optim, k, 0, teacher=signal, on_epoch=stop, checkpoint=Checkpoint(tmp_path / "c.pt", every=1))
    saved = Checkpoint(tmp_path / "c.pt", every=1).load()["members"][0]["method"]
    assert saved["structure.memo_keys"].shape[0] > 0 and saved["structure.memo_values"].shape[1] == 10
    reloaded = copy.deepcopy(teacher)  # new tensors, same values: the memo is kept
    rows.clear()
    resumed = fit(spec, data, optim, k, 0, teacher=dataclasses.replace(signal, model=reloaded),
                  checkpoint=Checkpoint(tmp_path / "c.pt", every=1))
    assert sum(rows) == by_epoch[4] - by_epoch[2] > 0  # epochs 3 and 4 explain only what they would have
    assert all(torch.equal(v, whole.model.state_dict()[key]) for key, v in resumed.model.state_dict().items())
    assert resumed.metrics == whole.metrics
