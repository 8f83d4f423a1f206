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
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Strict, Tag,
                      create_model, field_validator, model_validator)
from pydantic.fields import FieldInfo

from kdablate.components import MASSES, STRUCTURES, Need
from kdablate.components.feature import FEATURE_TERMS
from kdablate.data import DATASETS
from kdablate.hashing import file_digest, stable_hash
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
# Finite: an infinite T or penalty would train NaNs, and JSON (the hash, MLflow) writes inf as null.
Float = Annotated[float, BeforeValidator(_no_bool), AllowInfNan(False)]


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


class FeatureSpec(PluginSpec):
    registry = FEATURE_TERMS


class ModelSpec(PluginSpec):
    registry = MODELS


class DataSpec(PluginSpec):
    registry = DATASETS
    # Parameters that change only what a model trains on, never the validation or test split.
    TRAIN_ONLY: ClassVar[tuple[str, ...]] = ("train_subset", "augment")

    def same_split(self, other: "DataSpec") -> bool:
        """Whether ``other`` is this dataset with the same validation and test split."""
        def split(d: DataSpec) -> tuple:
            return d.name, {k: v for k, v in d.params.items() if k not in self.TRAIN_ONLY}

        return split(self) == split(other)


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

    @model_validator(mode="after")
    def _milestones(self) -> "OptimConfig":
        if self.milestones and self.schedule != "multistep":
            raise ValueError(f"milestones {list(self.milestones)} do nothing under schedule '{self.schedule}'; set "
                             "schedule: multistep or remove them")
        late = [m for m in self.milestones if not 0 < m < self.epochs]
        if late:
            room = f"keep them in 1..{self.epochs - 1}" if self.epochs > 1 else "a 1-epoch run has room for none"
            raise ValueError(f"milestone {late[0]} is not inside the {self.epochs} epochs, so it never decays the lr; "
                             f"{room} (an epochs override needs milestones too)")
        return self


class TeacherConfig(Frozen):
    """The teacher: trained once per this config (and data) and cached with its logits, or
    loaded from a weights file (``checkpoint``) or from the student an earlier run saved
    (``from_run``); nothing trains then.

    seed: a fixed seed shares one teacher across student seeds (the usual KD
    protocol); ``null`` pairs each student seed with a teacher of the same seed.
    views: with augmented data, 0 runs the teacher online on every batch (exact);
    V > 0 caches its logits on V fixed augmented views of the training set, and the
    student sees view (epoch mod V) of each image, so a KD step is a lookup again.
    min_accuracy: the quality gate. A teacher whose validation accuracy is below it is
    not distilled from: the cells that read it are FAILED with its accuracy. ``null``
    means halfway between chance and perfect, (1 + 1/K) / 2 (0.55 at K = 10).
    data: the data a trained teacher trains on, when not the students' (all training images
    for the teacher, ``train_subset`` for the students): the same dataset and the same
    validation and test split, so the teacher never sees the students' held-out images.
    checkpoint: a weights file (a state_dict, or one wrapped as {'model' | 'state_dict' |
    'net': ...}, RepDistiller's and mdistiller's names mapped); sha256: the file's, checked.
    from_run: the MLflow run id of a ``save_model: true`` cell whose student is the teacher
    (Born-Again chains); its saved spec gives the model.
    """

    model: ModelSpec = ModelSpec(name="cnn1d")
    optim: OptimConfig = OptimConfig()
    seed: Seed | None = 0
    views: Int = Field(0, ge=0)
    min_accuracy: Float | None = Field(None, ge=0, le=1)
    data: DataSpec | None = None
    checkpoint: str | None = Field(None, min_length=1)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    from_run: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherConfig":
        if self.checkpoint is not None and self.from_run is not None:
            raise ValueError("a teacher comes from a checkpoint or from_run, not both; keep one")
        if self.sha256 is not None and self.checkpoint is None:
            raise ValueError("sha256 checks a checkpoint file; set checkpoint or remove sha256")
        if self.data is not None and self.source != "trained":
            raise ValueError(f"data is what a trained teacher trains on; a {self.source} teacher does not "
                             "train, so remove teacher.data")
        return self

    @property
    def source(self) -> Literal["trained", "checkpoint", "run"]:
        """Where the weights come from: trained here, a checkpoint file, or an earlier run."""
        return "checkpoint" if self.checkpoint is not None else "run" if self.from_run is not None else "trained"

    def gate(self, num_classes: int) -> float:
        """The validation accuracy this teacher must reach to be used."""
        return (1 + 1 / num_classes) / 2 if self.min_accuracy is None else self.min_accuracy


def _teacher_kind(v: Any) -> str:
    return "ensemble" if isinstance(v, (list, tuple)) else "one"


# A teacher or a list of them; the discriminator sends each input to one branch, so an error
# names the field of the branch the input is (never "not a valid dictionary" for a list).
TeacherSpec = Annotated[Union[Annotated[TeacherConfig, Tag("one")],
                              Annotated[tuple[TeacherConfig, ...], Field(min_length=2), Tag("ensemble")]],
                        Discriminator(_teacher_kind)]


def _ensemble(v: Any) -> Any:
    # `teacher: [spec]` is that one teacher, so an ensemble of one is the very same cell.
    return v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else v


class KnowledgeConfig(Frozen):
    """How the target is built and weighted.

    objective: ``soft_target`` (q from mass and structure) or another registered loss (``dkd``).
    alpha: the distillation weight (for ``dkd``: the TCKD weight).
    warmup_epochs: alpha ramps linearly from 0 over these epochs.
    warmup_by: 'step' ramps every step; 'epoch' holds epoch e's weight at e / warmup_epochs (mdistiller's DKD).
    entropy_penalty: beta of the confidence penalty, loss - beta * H(p_student).
    feature: feature and relation terms added to the loss, each ``weight * loss`` of the student's
        and the teacher's features (``kdablate.components.feature``): e.g. [{name: at}].
    """

    objective: ObjectiveSpec = ObjectiveSpec(name="soft_target")
    mass: MassSpec = MassSpec(name="none")
    structure: StructureSpec = StructureSpec(name="uniform")
    temperature: Float = Field(1.0, gt=0)
    alpha: Float = Field(0.0, ge=0, le=1)
    warmup_epochs: Int = Field(0, ge=0)
    warmup_by: Literal["step", "epoch"] = "step"
    entropy_penalty: Float = Field(0.0, ge=0)
    feature: tuple[FeatureSpec, ...] = ()

    def needs(self) -> Need:
        """What this knowledge reads beyond the student, computed once per distinct config."""
        return _needs(self.model_dump_json())


def check_axes(v: dict[str, list[Any]]) -> dict[str, list[Any]]:
    for key, values in v.items():
        if not values:
            raise ValueError(f"axis '{key}' is empty; give at least one value")
    return v


def optional_fields(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s fields, each with its constraints but optional (default None: not set)."""
    return {name: (f.annotation | None, FieldInfo.merge_field_infos(f, default=None))
            for name, f in model.model_fields.items()}


# An arm sets any of the knowledge's fields; they are declared once, in KnowledgeConfig.
ArmKnowledge = create_model("ArmKnowledge", __base__=Frozen, **optional_fields(KnowledgeConfig))


class ArmConfig(ArmKnowledge):
    """One arm: knowledge overrides (any field of ``KnowledgeConfig``), optional ``set`` overrides
    of any other field (dotted paths), and an optional ``grid`` crossed into sub-arms."""

    name: str = Field(min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    set: dict[str, Any] = Field(default_factory=dict)  # dotted overrides of base, e.g. {optim.lr: 0.1}

    @field_validator("grid")
    @classmethod
    def _nonempty(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return check_axes(v)


class CellConfig(Frozen):
    """One training run, fully resolved. Its hash identifies it in MLflow."""

    arm: str
    seed: Seed
    data: DataSpec = DataSpec(name="mnist1d")
    student: ModelSpec = ModelSpec(name="mlp")
    optim: OptimConfig = OptimConfig()
    # One teacher, or an ensemble ([spec, spec, ...]: the mean of the members' probabilities at T).
    teacher: Annotated[TeacherSpec | None, BeforeValidator(_ensemble)] = TeacherConfig()
    knowledge: KnowledgeConfig = KnowledgeConfig()
    report: Literal["last", "best_val"] = "best_val"
    # Log the reported student's weights (kdablate.saved); what is kept, not what is trained.
    save_model: bool = False

    def config_hash(self) -> str:
        """Hash of what differs from the defaults (see ``canonical``), so upgrading kdablate with a
        new field or plugin parameter leaves the hashes of finished cells, and their reuse, intact."""
        fields = canonical(self)
        teachers = fields.get("teacher") or {}  # teacher: null has no gate
        for member, spec in zip(self.teachers(), teachers if isinstance(teachers, list) else [teachers]):
            # The gate decides whether a cell may run, not what it computes: changing it must not
            # retrain finished cells.
            spec.pop("min_accuracy", None)
            if member.checkpoint is not None:  # a file replaced at the same path is another teacher
                spec["file_sha256"] = _digest_or_missing(member.checkpoint)
        fields.pop("save_model", None)  # likewise: keeping the weights changes no number
        return stable_hash({"schema": HASH_SCHEMA, **fields})

    def teachers(self) -> tuple[TeacherConfig, ...]:
        """The teacher's members: one for a single teacher, none without a teacher."""
        if self.teacher is None:
            return ()
        return self.teacher if isinstance(self.teacher, tuple) else (self.teacher,)

    def teacher_seed(self, member: TeacherConfig | None = None) -> int:
        """A teacher's seed: its own, or (None) the cell's, so each seed gets its own teacher."""
        member = member or (self.teachers() or (None,))[0]
        return self.seed if member is None or member.seed is None else member.seed

    def teacher_key(self, member: TeacherConfig | None = None, file_sha256: str = "") -> str:
        """Identifies a teacher's cache: its data, config and seed (and a checkpoint's file by its
        sha256). Without ``member``: the cell's teacher, an ensemble by its members' keys."""
        if member is None:
            members = self.teachers()
            assert members, "a cell without a teacher has no teacher key"
            if len(members) == 1:
                return self.teacher_key(members[0], file_sha256)
            return stable_hash({"ensemble": [self.teacher_key(m) for m in members]})
        # views and the gate are how the teacher is used, not how it is made; a checkpoint is its
        # content, not its path. Its own data replaces the students' in its identity.
        drop = ("views", "min_accuracy", "checkpoint", "sha256", "data")
        teacher = {k: v for k, v in canonical(member).items() if k not in drop}
        if member.checkpoint is not None:
            teacher["file_sha256"] = file_sha256 or file_digest(member.checkpoint)
        data = canonical(member.data if member.data is not None else self.data)
        return stable_hash({"data": data, "teacher": teacher, "seed": self.teacher_seed(member)})


def _digest_or_missing(path: str) -> str:
    try:
        return file_digest(path)
    except OSError:  # refused when the study loads; status and dry-run still name the cell
        return "missing"


@functools.lru_cache(maxsize=256)
def _needs(knowledge_json: str) -> Need:
    knowledge = KnowledgeConfig.model_validate_json(knowledge_json)
    # A feature term reads the teacher network's features, run online on each batch.
    return build_objective(knowledge).needs | (Need.TEACHER_MODEL if knowledge.feature else Need.NONE)


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
        elif isinstance(value, tuple) and value and isinstance(value[0], BaseModel):
            out[name] = [canonical(v) for v in value]
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
