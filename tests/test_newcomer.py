"""The extension points are one class each: a newcomer's explanation source (SmoothGrad over any
source), structure (a pure function and a registered class) and epoch-dependent mass, written here
as a plugin author would, registered for one test at a time, and put through the same checks the
parametrized registry tests run over every registered plugin, then one tiny training cell each.

SmoothGrad: Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise", as captum's
``NoiseTunnel(nt_type='smoothgrad')``.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import captum.attr as captum_attr

from kdablate.attribution import EXPLANATIONS, PLAIN, AttributionContext, Cost, Explanation
from kdablate.components import MASSES, STRUCTURES, TargetContext
from kdablate.components.context import Component
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.data import load_dataset
from kdablate.trainer import fit
# Modules, not their test functions: a test function imported here would be collected twice.
from tests import test_components as component_tests
from tests import test_explanations as explanation_tests
from tests import test_registry as registry_tests


# --- (a) an explanation source: one class ---------------------------------------------------------

class SmoothGrad(Explanation):
    """E_c = mean_i E^base_c(x + n_i), n_i ~ N(0, sigma^2), ``samples`` draws from ``ctx.generator``."""

    cost = Cost.PER_CLASS_STEPS  # the base's K backward passes, over samples x the batch
    quick_params = {"samples": 4}

    @dataclasses.dataclass(frozen=True)
    class Params:
        base: str = "saliency"
        samples: int = 8
        sigma: float = 0.1

        def __post_init__(self) -> None:
            if self.samples < 1 or self.sigma < 0:
                raise ValueError(f"need samples >= 1 and sigma >= 0, got {self.samples} and {self.sigma}")
            EXPLANATIONS.get(self.base)  # an unknown base fails at load time, listing the known ones

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.base = EXPLANATIONS.build(params.base)

    def attribute(self, model: torch.nn.Module, inputs: torch.Tensor, *,
                  ctx: AttributionContext = PLAIN) -> torch.Tensor:
        """(B, *shape) -> (B, K, *S); the noise of sample b's copies is row b of one (B, n, *shape) draw."""
        if ctx.generator is None:
            raise ValueError("smoothgrad draws its noise from ctx.generator, and none was given")
        b, n, g = inputs.shape[0], self.params.samples, ctx.generator
        noise = torch.randn((b, n, *inputs.shape[1:]), generator=g, dtype=inputs.dtype, device=g.device)
        noisy = (inputs[:, None] + self.params.sigma * noise.to(inputs.device)).flatten(0, 1)
        # The training forward's features belong to the clean inputs, not to these.
        maps = self.base.attribute(model, noisy, ctx=dataclasses.replace(ctx, features=None))
        return maps.view(b, n, *maps.shape[1:]).mean(1)


# --- (b) a structure: a pure tensor function and one class ----------------------------------------

def label_distance_structure(labels: torch.Tensor, num_classes: int, scale: float) -> torch.Tensor:
    """(B,) labels -> (B, K): r_c proportional to exp(-|c - y| / scale) off the true class, 0 at y."""
    c = torch.arange(num_classes, device=labels.device)
    logits = -(c[None] - labels[:, None]).abs().float() / scale
    return torch.softmax(logits.scatter(1, labels[:, None], float("-inf")), dim=1)


class LabelDistance(Component):
    """Neighbouring class indices are similar (ordinal labels); a fixed function of the labels."""

    static = True

    @dataclasses.dataclass(frozen=True)
    class Params:
        scale: float = 1.0

        def __post_init__(self) -> None:
            if self.scale <= 0:
                raise ValueError(f"scale must be > 0, got {self.scale}")

    def __call__(self, ctx: TargetContext, temperature: float) -> torch.Tensor:
        return label_distance_structure(ctx.labels, ctx.num_classes, self.params.scale)


# --- (c) a mass that depends on the epoch ---------------------------------------------------------

class RampedMass(Component):
    """m = eps * min(1, epoch / ramp): label smoothing switched on over the first ``ramp`` epochs."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        eps: float = 0.2
        ramp: int = 2

    def __call__(self, ctx: TargetContext, temperature: float) -> torch.Tensor:
        m = self.params.eps * min(1.0, ctx.epoch / self.params.ramp)
        return torch.full(ctx.labels.shape, m, dtype=ctx.student_logits.dtype, device=ctx.labels.device)


NEWCOMERS = ((EXPLANATIONS, "smoothgrad", SmoothGrad), (STRUCTURES, "label_distance", LabelDistance),
             (MASSES, "ramped", RampedMass))


@pytest.fixture
def newcomers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the three plugins for one test; the registries are restored after it."""
    for registry, name, cls in NEWCOMERS:
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
        registry.register(name)(cls)


@pytest.fixture(scope="module")
def mnist1d():
    return load_dataset("mnist1d", {"num_samples": 500})


def train_one_cell(data, knowledge: KnowledgeConfig) -> dict[str, float]:
    """One epoch of a small MLP; the epoch's logged metrics, all finite."""
    logs: list[dict] = []
    fit(ModelSpec(name="mlp", params={"hidden": 16}), data, OptimConfig(epochs=1, batch_size=32), knowledge, 0,
        on_epoch=lambda e, m: logs.append(m))
    assert len(logs) == 1 and all(math.isfinite(v) for v in logs[0].values())
    return logs[0]


SMOOTHGRAD = explanation_tests.Reference(
    lambda model: captum_attr.NoiseTunnel(captum_attr.Saliency(model)),
    {"nt_type": "smoothgrad", "nt_samples": 4, "stdevs": 0.1, "abs": False},
    params={"samples": 4, "sigma": 0.1}, dtype=torch.float32)


def test_a_new_source_is_one_class_and_one_reference(newcomers, batch, monkeypatch, mnist1d):
    with pytest.raises(pytest.fail.Exception, match="'smoothgrad' has no captum reference: add a Reference"):
        explanation_tests.test_matches_captum("smoothgrad", "cnn1d")
    monkeypatch.setitem(explanation_tests.REFERENCES, "smoothgrad", SMOOTHGRAD)  # the one test parameter
    for model_name in SMOOTHGRAD.models():
        explanation_tests.test_matches_captum("smoothgrad", model_name)
    explanation_tests.test_every_source_declares_its_cost_and_quick_params("smoothgrad")
    explanation_tests.test_every_source_makes_a_structure("smoothgrad", batch)
    for base in ("grad_input", "gradcam"):  # a wrapper over any source, CAM-style ones too
        explanation_tests.check_source_in_structure(
            "smoothgrad", {"base": base, "samples": 2}, explanation_tests.cnn_context(batch))
    il = KnowledgeConfig(mass={"name": "constant", "eps": 0.2}, temperature=4.0, alpha=0.9,
                         structure={"name": "explanation", "source": "smoothgrad", "source_params": {"samples": 2}})
    logs = train_one_cell(mnist1d, il)
    assert logs["train/loss_kd"] > 0 and logs["time/explain_ms"] > 0


def test_smoothgrad_is_reproducible_through_the_context_generator(newcomers):
    model, x = explanation_tests.model_and_inputs("cnn1d")
    sg = EXPLANATIONS.build("smoothgrad", {"samples": 3})
    maps = [sg.attribute(model, x, ctx=AttributionContext(generators=(torch.Generator().manual_seed(s),)))
            for s in (1, 1, 2)]
    assert torch.equal(maps[0], maps[1]) and not torch.equal(maps[0], maps[2])
    with pytest.raises(ValueError, match="ctx.generator"):
        sg.attribute(model, x)


def test_a_new_structure_is_a_function_and_a_class(newcomers, batch, mnist1d):
    registry_tests.test_a_component_marked_static_is_the_same_at_every_step("structure", "label_distance", batch)
    for mass in MASSES.names():
        component_tests.test_every_target_is_a_distribution(batch, mass, "label_distance")
    r = STRUCTURES.build("label_distance", {"scale": 2.0})(registry_tests.full_context(batch, 0), 4.0)
    y = batch["labels"]
    r, y = r[y < 8], y[y < 8]  # the next class and the one after it are both real classes
    assert (r.gather(1, (y + 1)[:, None]) > r.gather(1, (y + 2)[:, None])).all()
    train_one_cell(mnist1d, KnowledgeConfig(mass={"name": "constant", "eps": 0.2}, temperature=2.0, alpha=0.5,
                                            structure={"name": "label_distance", "scale": 2.0}))


def test_a_new_epoch_dependent_mass_is_one_class(newcomers, batch, mnist1d):
    registry_tests.test_a_component_marked_static_is_the_same_at_every_step("mass", "ramped", batch)
    for structure in STRUCTURES.names():
        component_tests.test_every_target_is_a_distribution(batch, "ramped", structure)
    ramped = MASSES.build("ramped", {"eps": 0.2, "ramp": 2})
    ctx = registry_tests.full_context(batch, 0)
    by_epoch = [ramped(dataclasses.replace(ctx, epoch=e), 4.0)[0].item() for e in (1, 2, 3)]  # epochs count from 1
    assert by_epoch == pytest.approx([0.1, 0.2, 0.2])

    # The static trap sees the epoch: the same mass wrongly marked static is caught.
    MASSES.register("ramped_static")(type("RampedStatic", (RampedMass,), {"static": True}))
    with pytest.raises(AssertionError):
        registry_tests.test_a_component_marked_static_is_the_same_at_every_step("mass", "ramped_static", batch)

    # And the trainer fills in the epoch it is in.
    seen: set[tuple[int, int]] = set()

    class Recorded(RampedMass):
        def __call__(self, ctx: TargetContext, temperature: float) -> torch.Tensor:
            seen.add((ctx.epoch, ctx.steps_per_epoch))
            return super().__call__(ctx, temperature)

    MASSES.register("ramped_recorded")(Recorded)
    logs = train_one_cell(mnist1d, KnowledgeConfig(mass={"name": "ramped_recorded"}, structure="uniform",
                                                   temperature=2.0, alpha=0.5))
    assert seen == {(1, len(mnist1d.y_train) // 32)} and logs["train/loss_kd"] > 0
