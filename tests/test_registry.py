"""Registry behaviour, and every registered model / dataset checked automatically."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kdablate.components import MASSES, STRUCTURES, TargetContext
from kdablate.components.context import Component
from kdablate.config import KnowledgeConfig
from kdablate.data import DATASETS, load_dataset
from kdablate.models import MODELS, build_model
from kdablate.objectives import build_objective
from kdablate.registry import ConfigError, Registry


def test_unknown_name_lists_known_names():
    with pytest.raises(ConfigError) as err:
        STRUCTURES.get("teachr")
    assert str(err.value) == f"unknown structure 'teachr'; known: {', '.join(STRUCTURES.names())}"
    assert {"permuted", "teacher", "uniform", "explanation"} <= set(STRUCTURES.names())


def test_unknown_parameter_lists_allowed():
    with pytest.raises(ConfigError, match="mass 'constant' has no parameter 'epsilon'; allowed: eps"):
        MASSES.build("constant", {"epsilon": 0.1})


def test_parameter_types_and_ranges_are_checked():
    with pytest.raises(ConfigError, match="must be float, got str"):
        MASSES.build("constant", {"eps": "0.1"})
    with pytest.raises(ConfigError, match=r"eps must be in \[0, 1\]"):
        MASSES.build("constant", {"eps": 1.5})
    with pytest.raises(ConfigError, match="must be int, got bool"):
        MODELS.params("mlp", {"hidden": True})
    assert MASSES.build("constant", {"eps": 1}).params.eps == 1.0  # ints are fine for floats


def test_double_registration_fails():
    reg: Registry = Registry("thing")
    reg.register("a")(type("A", (), {}))
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(type("B", (), {}))


def test_a_new_structure_needs_one_class_and_no_other_edit(monkeypatch, batch):
    """What a plugin author writes: a pure function and a small registered class."""
    monkeypatch.setattr(STRUCTURES, "_entries", dict(STRUCTURES._entries))

    def next_class(labels: torch.Tensor, k: int) -> torch.Tensor:
        return torch.nn.functional.one_hot((labels + 1) % k, k).float()

    @STRUCTURES.register("next_class")
    class NextClass(Component):
        @dataclasses.dataclass(frozen=True)
        class Params:
            pass

        def __call__(self, ctx: TargetContext, temperature: float) -> torch.Tensor:
            return next_class(ctx.labels, ctx.num_classes)

    obj = build_objective(KnowledgeConfig(mass={"name": "constant", "eps": 0.2}, structure="next_class", alpha=1.0))
    ctx = TargetContext(batch["labels"], 10, batch["student"])
    q = obj.target(ctx)
    assert torch.allclose(q.gather(1, ((batch["labels"] + 1) % 10)[:, None]), torch.tensor(0.2))
    assert "next_class" in STRUCTURES.names()


def input_shape_for(name: str) -> tuple[int, ...]:
    """Image models (the zoo) take (3, 32, 32); the MNIST-1D models a (1, 40) signal."""
    return (3, 32, 32) if MODELS.get(name).__module__ == "kdablate.models.zoo" else (1, 40)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_maps_inputs_to_logits(name):
    shape = input_shape_for(name)
    model = build_model(name, {}, shape, 10)
    out = model(torch.randn(4, *shape))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_has_disjoint_labelled_splits(name, tmp_path):
    from tests.datafiles import WRITERS

    assert name in WRITERS, f"add a writer of '{name}' files to tests/datafiles.py"
    data = load_dataset(name, WRITERS[name](tmp_path))
    for split in ("train", "val", "test"):
        x, y = data.split(split)
        assert len(x) == len(y) > 0
        assert x.dtype in (torch.float32, torch.uint8) and y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) < data.num_classes
        batch = data.prepare(x[:4], train=True, generator=torch.Generator().manual_seed(0))
        assert batch.dtype == torch.float32 and batch.shape == x[:4].shape and torch.isfinite(batch).all()
    assert data.x_train.shape[1:] == data.x_val.shape[1:] == data.x_test.shape[1:]


def full_context(batch: dict, step: int, student_scale: float = 1.0) -> TargetContext:
    """Every source a component may read, at ``step`` (and its epoch, 7 steps each); the student's
    own logits scaled (they change in training, while labels, cached teacher logits and class
    groups do not)."""
    return TargetContext(batch["labels"], batch["k"], batch["student"] * student_scale, batch["teacher"],
                         (torch.Generator().manual_seed(step),), peer_logits=batch["peer"] * student_scale,
                         inputs=batch["inputs"], models=batch["models"], features=batch["features"], step=step,
                         epoch=1 + step // 7, steps_per_epoch=7, class_groups=batch["groups"])


@pytest.mark.parametrize("kind,name", [("mass", n) for n in MASSES.names()] + [("structure", n) for n in STRUCTURES.names()])
def test_a_component_marked_static_is_the_same_at_every_step(kind, name, batch):
    """The trainer builds a static component's target once per cell: a component that says
    `static` but depends on the step, the RNG or the student (e.g. a copied `static = True`
    on an epoch-dependent mass) would be frozen at its first value, with every other test
    passing. Every registered component is called at two steps with different student logits."""
    component = (MASSES if kind == "mass" else STRUCTURES).build(name, {})
    if not component.static:
        return  # only a static claim is a promise to check here
    early, late = (component(full_context(batch, s, scale), 4.0) for s, scale in ((0, 1.0), (10_007, 3.0)))
    torch.testing.assert_close(early, late, rtol=0, atol=0)
