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
from typing import Callable

import torch
from torch import nn

from kdablate.components import Need
from kdablate.components.context import Probe
from kdablate.components.feature import FEATURE_TERMS
from kdablate.config import CellConfig, DataSpec, KnowledgeConfig, ModelSpec, TeacherConfig
from kdablate.data import DataShape, describe_dataset
from kdablate.models import build_model
from kdablate.models.factory import MAX_PARAMS, param_count
from kdablate.models.checkpoint import checkpoint_digest, fit_state_dict, read_checkpoint
from kdablate.models.ensemble import Ensemble
from kdablate.models import stages
from kdablate.saved import read_saved, saved_mismatch
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
    """``spec`` built for the data and run on two of its inputs; CellCheckError if it does not fit,
    or (before anything is built) if it would have more than ``MAX_PARAMS`` parameters."""
    try:
        n = param_count(spec.name, spec.params, facts.input_shape, facts.num_classes)
    except Exception:  # noqa: BLE001 - a spec that cannot be sized is reported by the build below
        n = 0
    if n > MAX_PARAMS:
        raise CellCheckError(field, f"model '{spec.name}' {spec.params} would have about {n:.2g} parameters, more than "
                                    f"the limit of {MAX_PARAMS:.0e}; check its size parameters")
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
    batches += [("teacher.optim.batch_size", m.optim.batch_size) for m in cell.teachers() if m.source == "trained"]
    for path, size in batches:
        if size > facts.shape.n_train:
            raise CellCheckError(blame[path], f"batch_size {size} is larger than the {facts.shape.n_train} training "
                                              "samples, so no optimiser step would run; lower it")
    check_schedule(cell, facts, blame["knowledge"])
    models = {"self": fitted_model(cell.student, facts, blame["student"])}
    names = {"self": cell.student.name}
    if cell.teacher is not None:
        models["teacher"], names["teacher"] = teacher_probe(cell, facts, blame)
    check_knowledge(cell.knowledge, facts, Probe(facts.inputs, facts.num_classes, models, names), blame["knowledge"],
                    has_teacher=cell.teacher is not None)


def teacher_probe(cell: CellConfig, facts: DataFacts, blame: dict[str, str]) -> tuple[nn.Module, str]:
    """The cell's teacher model, each member checked against its source and the data; an ensemble
    as one ``Ensemble`` module at the cell's temperature (what its explanations read)."""
    members = cell.teachers()
    models = []
    for i, member in enumerate(members):
        def field(path: str) -> str:  # base.teacher.checkpoint -> base.teacher[1].checkpoint
            return blame[path] if len(members) == 1 else blame[path].replace("teacher", f"teacher[{i}]", 1)

        if len(members) > 1 and member.views:
            raise CellCheckError(field("teacher.views"), "an ensemble's members share no view cache: on augmented "
                                                         "data the ensemble runs online; set views: 0")
        models.append(member_model(cell, member, facts, field))
    if len(models) == 1:
        return models[0], members[0].model.name
    return Ensemble(models, cell.knowledge.temperature).eval(), "ensemble"


def member_model(cell: CellConfig, member: TeacherConfig, facts: DataFacts, field: Callable[[str], str]) -> nn.Module:
    """One teacher's model, its weights' source checked (a file, a run) or its own data's split."""
    try:
        if member.source == "checkpoint":
            model = fitted_model(member.model, facts, field("teacher.model"))
            _checkpoint_fits(member, model, facts.num_classes)
            return model
        if member.source == "run":
            return _saved_model(member.from_run, cell.data, member, facts)
    except ConfigError as e:
        raise CellCheckError(field("teacher." + ("checkpoint" if member.checkpoint else "from_run")), str(e)) from None
    if member.data is not None and not member.data.same_split(cell.data):
        raise CellCheckError(field("teacher.data"), f"the teacher's data must be the students' dataset with the same "
                                                    f"validation and test split; only {', '.join(DataSpec.TRAIN_ONLY)} "
                                                    "may differ, so the teacher never sees their held-out images")
    return fitted_model(member.model, facts, field("teacher.model"))


@functools.lru_cache(maxsize=32)
def _checked_file(path: str, sha256: str | None, spec_json: str, model: nn.Module, k: int, digest: str) -> None:
    state, _ = read_checkpoint(path, sha256)
    spec = json.loads(spec_json)
    fit_state_dict(model, spec["name"], spec["params"], state, path, k)


def _checkpoint_fits(member: TeacherConfig, model: nn.Module, k: int) -> None:
    """ConfigError unless ``member``'s checkpoint is there, is its sha256's, and fits ``model``; each
    distinct file (by content) is read once."""
    path, sha256 = member.checkpoint, member.sha256
    spec = json.dumps({"name": member.model.name, "params": member.model.params}, sort_keys=True)
    _checked_file(path, sha256, spec, model, k, checkpoint_digest(path, sha256))


def _saved_model(run_id: str, data: DataSpec, member: TeacherConfig, facts: DataFacts) -> nn.Module:
    """The model run ``run_id`` saved, if it was made for this data (and is the ``model`` named)."""
    saved = read_saved(run_id)
    why = saved_mismatch(saved.spec, data, facts.input_shape, facts.num_classes)
    if why is None and "model" in member.model_fields_set and member.model.flat() != {
            "name": saved.spec["name"], **saved.spec["params"]}:
        why = (f"it saved a '{saved.spec['name']}', not the teacher.model '{member.model.name}' named here; remove "
               "teacher.model (the run's spec gives it)")
    if why:
        raise ConfigError(f"run {run_id}: {why}")
    return saved.build()


def check_schedule(cell: CellConfig, facts: DataFacts, field: str) -> None:
    """Settings that would train something other than what they say: a warm-up longer than the
    training (alpha never reaches its value), or an explanation every more steps than a cell has."""
    k, epochs = cell.knowledge, cell.optim.epochs
    if k.alpha > 0 and k.warmup_epochs > epochs:
        raise CellCheckError(field, f"warmup_epochs {k.warmup_epochs} is longer than the {epochs} epochs, so alpha "
                                    f"never reaches {k.alpha:g}; shorten the warm-up or train longer")
    structure = {**k.structure.params, **k.structure.params.get("base_params", {})}
    steps = facts.shape.n_train // cell.optim.batch_size * epochs
    if structure.get("every", 1) > steps:
        raise CellCheckError(field, f"structure every {structure['every']} is more than the {steps} steps of a cell "
                                    "(about one explanation per cell); lower every")
    if k.objective.name != "soft_target" and (k.mass.name, k.structure.name) != ("none", "uniform"):
        raise CellCheckError(field, f"objective '{k.objective.name}' builds no soft target, so it ignores mass "
                                    f"'{k.mass.name}' and structure '{k.structure.name}', yet they would enter the "
                                    "cell's hash; remove them from the arm (mass: none, structure: uniform)")


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
    knowledge = KnowledgeConfig.model_validate_json(knowledge_json)
    try:
        build_objective(knowledge).check(probe)
    except ConfigError as e:
        raise CellCheckError(field, str(e)) from None
    check_features(knowledge, probe, field)
    _probed.add(key)


def check_features(knowledge: KnowledgeConfig, probe: Probe, field: str) -> None:
    """Each feature term against the student's and the teacher's features on the probe inputs."""
    if not knowledge.feature:
        return
    if not all(hasattr(probe.models[who], m) for who in ("self", "teacher") for m in ("features", "head")):
        raise CellCheckError(f"{field}.feature", "feature terms read one student's and one teacher's stage outputs; "
                                                 "a teacher ensemble has none: give the arm a single teacher")
    feats = {who: stages.probe(probe.models[who], probe.inputs) for who in ("self", "teacher")}
    for i, spec in enumerate(knowledge.feature):
        why = FEATURE_TERMS.build(spec.name, spec.params).refusal(feats["self"], feats["teacher"])
        if why:
            raise CellCheckError(f"{field}.feature[{i}]", f"{why} (student {probe.names['self']}, teacher "
                                                          f"{probe.names['teacher']}); remove the term or change the models")
