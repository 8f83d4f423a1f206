"""Configs as frozen pydantic models: data only (registry names and numbers).

A *cell* is one fully resolved training run: data, student, optimiser, teacher,
knowledge components and seed. A study file (see ``kdablate.study``) is a small
override of these defaults. Every plugin spec is checked against its registry
and normalised to carry all of its parameters, so the config hash of a cell
does not depend on whether a default was spelled out.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, model_validator

from kdablate.components import MASSES, STRUCTURES, Need
from kdablate.data import DATASETS
from kdablate.hashing import stable_hash
from kdablate.models import MODELS
from kdablate.objectives import OBJECTIVES, build_objective
from kdablate.registry import Registry


def _no_bool(v: Any) -> Any:
    # YAML reads `true` as a bool and pydantic would take it as 1.0: a typo would become a number.
    if isinstance(v, bool):
        raise ValueError(f"must be a number, not a boolean ({str(v).lower()})")
    return v


# Numbers that refuse booleans: `seeds: [true, false]` must not be read as seeds 1 and 0.
Int = Annotated[int, Strict()]
# Seeds feed torch generators after mixing (seed * 1_000_003 + stream), which must stay in 64 bits.
Seed = Annotated[int, Strict(), Field(ge=0, lt=2**32)]
Float = Annotated[float, BeforeValidator(_no_bool)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PluginSpec(Frozen):
    """``name`` of a registered plugin and its parameters; YAML: ``"name"`` or ``{name: ..., **params}``."""

    registry: ClassVar[Registry]
    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"name": v}
        if isinstance(v, dict) and "params" not in v and "name" in v:
            return {"name": v["name"], "params": {k: x for k, x in v.items() if k != "name"}}
        return v

    @model_validator(mode="after")
    def _check(self) -> "PluginSpec":
        parsed = self.registry.params(self.name, self.params)
        object.__setattr__(self, "params", dataclasses.asdict(parsed))
        return self

    def flat(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}


class MassSpec(PluginSpec):
    registry = MASSES


class StructureSpec(PluginSpec):
    registry = STRUCTURES


class ObjectiveSpec(PluginSpec):
    registry = OBJECTIVES


class ModelSpec(PluginSpec):
    registry = MODELS


class DataSpec(PluginSpec):
    registry = DATASETS


class OptimConfig(Frozen):
    """SGD with momentum; ``schedule`` is applied per step.

    multistep: lr x ``gamma`` at each epoch in ``milestones`` (the CIFAR KD recipe:
    240 epochs, decays at 150, 180, 210).
    """

    epochs: Int = Field(30, gt=0)
    batch_size: Int = Field(128, gt=1)
    lr: Float = Field(0.05, gt=0)
    momentum: Float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: Float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "constant", "multistep"] = "cosine"
    milestones: tuple[Int, ...] = ()
    gamma: Float = Field(0.1, gt=0, le=1)


class TeacherConfig(Frozen):
    """The teacher is trained once per this config (and data), then cached with its logits.

    seed: a fixed seed shares one teacher across student seeds (the usual KD
    protocol); ``null`` pairs each student seed with a teacher of the same seed.
    views: with augmented data, 0 runs the teacher online on every batch (exact);
    V > 0 caches its logits on V fixed augmented views of the training set, and the
    student sees view (epoch mod V) of each image, so a KD step is a lookup again.
    min_accuracy: the quality gate. A teacher whose validation accuracy is below it is
    not distilled from: the cells that read it are FAILED with its accuracy. ``null``
    means halfway between chance and perfect, (1 + 1/K) / 2 (0.55 at K = 10).
    """

    model: ModelSpec = ModelSpec(name="cnn1d")
    optim: OptimConfig = OptimConfig()
    seed: Seed | None = 0
    views: Int = Field(0, ge=0)
    min_accuracy: Float | None = Field(None, ge=0, le=1)

    def gate(self, num_classes: int) -> float:
        """The validation accuracy this teacher must reach to be used."""
        return (1 + 1 / num_classes) / 2 if self.min_accuracy is None else self.min_accuracy


class KnowledgeConfig(Frozen):
    """How the target is built and weighted.

    objective: ``soft_target`` (q from mass and structure) or another registered loss (``dkd``).
    alpha: the distillation weight (for ``dkd``: the TCKD weight).
    warmup_epochs: alpha ramps linearly from 0 over these epochs.
    warmup_by: 'step' ramps every step; 'epoch' holds epoch e's weight at e / warmup_epochs (mdistiller's DKD).
    entropy_penalty: beta of the confidence penalty, loss - beta * H(p_student).
    """

    objective: ObjectiveSpec = ObjectiveSpec(name="soft_target")
    mass: MassSpec = MassSpec(name="none")
    structure: StructureSpec = StructureSpec(name="uniform")
    temperature: Float = Field(1.0, gt=0)
    alpha: Float = Field(0.0, ge=0, le=1)
    warmup_epochs: Int = Field(0, ge=0)
    warmup_by: Literal["step", "epoch"] = "step"
    entropy_penalty: Float = Field(0.0, ge=0)

    def needs(self) -> Need:
        """What this knowledge reads beyond the student, computed once per distinct config."""
        return _needs(self.model_dump_json())


class CellConfig(Frozen):
    """One training run, fully resolved. Its hash identifies it in MLflow."""

    arm: str
    seed: Seed
    data: DataSpec = DataSpec(name="mnist1d")
    student: ModelSpec = ModelSpec(name="mlp")
    optim: OptimConfig = OptimConfig()
    teacher: TeacherConfig | None = TeacherConfig()
    knowledge: KnowledgeConfig = KnowledgeConfig()
    report: Literal["last", "best_val"] = "best_val"
    # Log the reported student's weights (kdablate.saved); what is kept, not what is trained.
    save_model: bool = False

    def config_hash(self) -> str:
        """Hash of what differs from the defaults (see ``canonical``), so upgrading kdablate with a
        new field or plugin parameter leaves the hashes of finished cells, and their reuse, intact."""
        fields = canonical(self)
        # The gate decides whether a cell may run, not what it computes: changing it must not
        # retrain finished cells.
        (fields.get("teacher") or {}).pop("min_accuracy", None)  # teacher: null has no gate
        fields.pop("save_model", None)  # likewise: keeping the weights changes no number
        return stable_hash({"schema": HASH_SCHEMA, **fields})

    def teacher_seed(self) -> int:
        """The teacher's seed: its own, or (None) the cell's, so each seed gets its own teacher."""
        return self.seed if self.teacher is None or self.teacher.seed is None else self.teacher.seed

    def teacher_key(self) -> str:
        """Identifies the teacher checkpoint: data, teacher config and the teacher's seed."""
        assert self.teacher is not None
        seed = self.teacher_seed()
        # views and the gate are how the teacher is used, not how it is trained.
        teacher = {k: v for k, v in canonical(self.teacher).items() if k not in ("views", "min_accuracy")}
        return stable_hash({"data": canonical(self.data), "teacher": teacher, "seed": seed})


@functools.lru_cache(maxsize=256)
def _needs(knowledge_json: str) -> Need:
    return build_objective(KnowledgeConfig.model_validate_json(knowledge_json)).needs


# Bump when a default *changes meaning*: canonical() leaves defaults out of the hash.
HASH_SCHEMA = 1


def canonical(model: BaseModel) -> dict[str, Any]:
    """The fields of ``model`` that differ from their defaults, recursively; plugin specs keep
    their name and the parameters that differ from the plugin's own defaults."""
    if isinstance(model, PluginSpec):
        # Field defaults read off the dataclass: instantiating Params would run its checks
        # (a data_root that must exist, say) on values nobody asked for.
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(model.registry.get(model.name).Params)}
        return {"name": model.name, "params": {k: v for k, v in model.params.items() if defaults.get(k) != v}}
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            sub = canonical(value)
            default = field.default if isinstance(field.default, BaseModel) else None
            if default is None or sub != canonical(default):
                out[name] = sub
        elif field.is_required() or value != field.default:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params are flat.

    Plugin specs {'name': n, 'params': {...}} flatten to 'x.name', 'x.<param>'.
    """
    out: dict[str, Any] = {}
    if set(d) == {"name", "params"} and isinstance(d["params"], dict):
        d = {"name": d["name"], **d["params"]}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
