"""Load-time checks of a study's cells against their data and models.

A study file can be valid field by field and still describe cells that would train to a
wrong number: a batch larger than the training split (zero steps, chance accuracy), a
component that reads what the dataset lacks, a model that does not fit the inputs, an
explanation source its model cannot support. Each such cell is refused here, when the
study loads (``kdablate dry-run`` catches it), with the field to blame and the fix.

Work is done once per distinct thing: each dataset is loaded once, each model built and
run once on two real training inputs, each knowledge config probed once.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import torch
from torch import nn

from kdablate.components import Need
from kdablate.components.context import Probe
from kdablate.config import CellConfig, KnowledgeConfig, ModelSpec
from kdablate.data import DataShape, describe_dataset
from kdablate.models import build_model
from kdablate.objectives import build_objective
from kdablate.registry import ConfigError


class CellCheckError(ConfigError):
    """A cell that must not run; ``field`` is the dotted config path to blame."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


@dataclasses.dataclass(frozen=True)
class DataFacts:
    """A dataset's shape and two inputs of that shape, (2, *input_shape), to run models on."""

    name: str
    shape: DataShape
    inputs: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape.input_shape

    @property
    def num_classes(self) -> int:
        return self.shape.num_classes


@functools.lru_cache(maxsize=16)
def _facts(name: str, params_json: str) -> DataFacts:
    shape = describe_dataset(name, json.loads(params_json))
    # Seeded noise of the right shape: what a model or an explanation source does with an
    # input's shape does not depend on its values.
    inputs = torch.randn(2, *shape.input_shape, generator=torch.Generator().manual_seed(0))
    return DataFacts(name, shape, inputs)


def data_facts(cell: CellConfig) -> DataFacts:
    """The cell's dataset, described once per distinct data spec (ConfigError if it cannot load)."""
    return _facts(cell.data.name, json.dumps(cell.data.params, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _model(name: str, params_json: str, shape: tuple[int, ...], k: int, inputs: torch.Tensor) -> nn.Module:
    model = build_model(name, json.loads(params_json), shape, k)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.eval()(inputs)
    if tuple(out.shape) != (len(inputs), k):
        raise ValueError(f"it maps inputs {tuple(inputs.shape)} to {tuple(out.shape)}, not ({len(inputs)}, {k}) logits")
    return model


def fitted_model(spec: ModelSpec, facts: DataFacts, field: str) -> nn.Module:
    """``spec`` built for the data and run on two of its inputs; CellCheckError if it does not fit."""
    try:
        return _model(spec.name, json.dumps(spec.params, sort_keys=True), facts.input_shape, facts.num_classes,
                      facts.inputs)
    except Exception as e:  # noqa: BLE001 - any failure to run is a misfit, reported in one line
        reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise CellCheckError(field, f"model '{spec.name}' does not fit dataset '{facts.name}' (inputs "
                                    f"{facts.input_shape}, {facts.num_classes} classes): {reason}; "
                                    "choose a model for this input shape") from None


def check_cell(cell: CellConfig, blame: dict[str, str]) -> None:
    """Refuse ``cell`` if it cannot train to a meaningful number; ``blame`` maps a dotted
    config path ('optim.batch_size', 'student', 'teacher', 'knowledge') to the study field
    that set it."""
    try:
        facts = data_facts(cell)
    except Exception as e:  # noqa: BLE001 - unreadable data is the study's error, not a traceback
        raise CellCheckError(blame["data"], str(e).splitlines()[0][:300] if str(e) else type(e).__name__) from None
    batches = [("optim.batch_size", cell.optim.batch_size)]
    if cell.teacher is not None:
        batches.append(("teacher.optim.batch_size", cell.teacher.optim.batch_size))
    for path, size in batches:
        if size > facts.shape.n_train:
            raise CellCheckError(blame[path], f"batch_size {size} is larger than the {facts.shape.n_train} training "
                                              "samples, so no optimiser step would run; lower it")
    models = {"self": fitted_model(cell.student, facts, blame["student"])}
    names = {"self": cell.student.name}
    if cell.teacher is not None:
        models["teacher"] = fitted_model(cell.teacher.model, facts, blame["teacher"])
        names["teacher"] = cell.teacher.model.name
    check_knowledge(cell.knowledge, facts, Probe(facts.inputs, facts.num_classes, models, names), blame["knowledge"],
                    has_teacher=cell.teacher is not None)


def check_knowledge(knowledge: KnowledgeConfig, facts: DataFacts, probe: Probe, field: str, has_teacher: bool) -> None:
    """The knowledge's needs against what the config and data provide, then its components' own checks."""
    needs = knowledge.needs()
    if needs & (Need.TEACHER | Need.TEACHER_MODEL) and not has_teacher:
        raise CellCheckError(field, "this arm reads a teacher but base.teacher is null; set base.teacher")
    if Need.HIERARCHY in needs and not facts.shape.has_hierarchy:
        raise CellCheckError(field, f"this arm needs a class hierarchy (class groups), which dataset "
                                    f"'{facts.name}' does not have; use cifar100 or another structure")
    _probe(knowledge.model_dump_json(), probe, field)


_probed: set[tuple] = set()


def _probe(knowledge_json: str, probe: Probe, field: str) -> None:
    key = (knowledge_json, *(id(m) for m in probe.models.values()))
    if key in _probed:  # models are cached, so their ids name them
        return
    try:
        build_objective(KnowledgeConfig.model_validate_json(knowledge_json)).check(probe)
    except ConfigError as e:
        raise CellCheckError(field, str(e)) from None
    _probed.add(key)
