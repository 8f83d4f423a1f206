"""Study files: a small override of the cell defaults, expanded into cells.

A study YAML holds ``base`` (overrides of ``CellConfig``'s defaults), named
``arms`` (each a choice of knowledge components, optionally with a ``grid`` that
crosses component choices into sub-arms), ``axes`` crossed with every arm, and
``seeds``. Everything is validated before the first cell trains; a problem is a
``StudyError`` naming the file, the field and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from kdablate.checks import CellCheckError, check_cell
from kdablate.config import CellConfig, Float, Frozen, Int, MassSpec, ObjectiveSpec, StructureSpec
from kdablate.registry import ConfigError

KNOWLEDGE_KEYS = ("objective", "mass", "structure", "temperature", "alpha", "warmup_epochs", "warmup_by", "entropy_penalty")


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so `alpha: 0.9` ... `alpha: 0` would quietly train a different arm)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (lines {seen[key]} and {line}); keep one",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, StrictLoader.construct_mapping)


class StudyError(Exception):
    """A bad study file; ``str()`` is the one-line message the CLI prints."""

    def __init__(self, file: str | Path, field: str, message: str) -> None:
        self.file, self.field, self.message = str(file), field, message
        super().__init__(f"{file}: {field}: {message}" if field else f"{file}: {message}")


class ArmConfig(Frozen):
    """One arm: knowledge overrides, optional ``set`` overrides of any other field
    (dotted paths), and an optional ``grid`` crossed into sub-arms."""

    name: str = Field(min_length=1)
    objective: ObjectiveSpec | None = None
    mass: MassSpec | None = None
    structure: StructureSpec | None = None
    temperature: Float | None = Field(None, gt=0)
    alpha: Float | None = Field(None, ge=0, le=1)
    warmup_epochs: Int | None = Field(None, ge=0)
    warmup_by: Literal["step", "epoch"] | None = None
    entropy_penalty: Float | None = Field(None, ge=0)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    set: dict[str, Any] = Field(default_factory=dict)  # dotted overrides of base, e.g. {optim.lr: 0.1}

    @field_validator("grid")
    @classmethod
    def _nonempty(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return _check_axes(v)


class AnalysisConfig(Frozen):
    """What the analysis scripts draw.

    baseline: the arm paired differences are taken against; reference: arms drawn
    as lines; factorial: draw and tabulate the mass x structure contrasts;
    extra_metrics: more columns for the table; heatmaps: arms whose
    explanation-derived class similarity is drawn beside the teacher's; pairs:
    (a, b) arms compared paired by seed.
    """

    baseline: str | None = None
    reference: list[str] = Field(default_factory=list)
    factorial: bool = False
    extra_metrics: list[str] = Field(default_factory=list)
    heatmaps: list[str] = Field(default_factory=list)
    pairs: list[tuple[str, str]] = Field(default_factory=list)


class StudyConfig(Frozen):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    seeds: list[Int] = Field(min_length=1)
    arms: list[ArmConfig] = Field(min_length=1)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    analysis: AnalysisConfig = AnalysisConfig()

    @field_validator("axes")
    @classmethod
    def _axes(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return _check_axes(v)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[Int]) -> list[Int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat: {v}")
        return v

    @model_validator(mode="after")
    def _arms(self) -> "StudyConfig":
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate arm name '{dup[0]}'; arm names must be unique")
        return self


def _check_axes(v: dict[str, list[Any]]) -> dict[str, list[Any]]:
    for key, values in v.items():
        if not values:
            raise ValueError(f"axis '{key}' is empty; give at least one value")
    return v


@dataclasses.dataclass(frozen=True)
class Study:
    """A validated study: its config, its file and its expanded cells (arm-major, then seed)."""

    config: StudyConfig
    path: Path
    cells: tuple[CellConfig, ...]

    @property
    def name(self) -> str:
        return self.config.name

    def arms(self) -> list[str]:
        return list(dict.fromkeys(c.arm for c in self.cells))


def resolve_path(study: str | Path, studies_dir: Path = Path("studies")) -> Path:
    """A path as given, or ``studies/<name>.yaml`` for a bare name."""
    p = Path(study)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return studies_dir / f"{study}.yaml"


def load_study(study: str | Path) -> Study:
    """Read, validate and expand a study file; raises StudyError on any problem."""
    path = resolve_path(study)
    if not path.is_file():
        known = sorted(q.stem for q in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise StudyError(path, "", f"no such study file; known studies: {', '.join(known) or 'none'}")
    try:
        raw = yaml.load(path.read_text(), Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "yaml"
        raise StudyError(path, where, f"invalid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise StudyError(path, "", "a study file must be a YAML mapping with base, seeds and arms")
    raw.setdefault("name", path.stem)
    try:
        config = StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise _as_study_error(path, e, ()) from None
    return Study(config, path, tuple(expand(config, path)))


def _as_study_error(path: Path, e: ValidationError, prefix: tuple) -> StudyError:
    """The first pydantic error as a StudyError with a dotted field path."""
    err = e.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in (*prefix, *err["loc"])).lstrip(".")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
    elif err["type"] != "value_error" and "input" in err:
        msg = f"{msg} (got {err['input']!r})"
    return StudyError(path, loc, msg)


def set_path(d: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted ``key`` ('optim.lr') in nested dict ``d``; knowledge keys are shortcuts."""
    parts = ["knowledge", key] if key in KNOWLEDGE_KEYS else key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"'{key}' does not name a config field")
    d[parts[-1]] = value


def label(v: Any) -> str:
    """How a grid value reads in an arm name: a plugin by its name, a number as itself."""
    if isinstance(v, dict) and "name" in v:
        return str(v["name"])
    return str(v)


def arm_name(template: str, combo: dict[str, Any]) -> str:
    """The arm's name for one grid/axes combination: the template filled in, plus
    ``[key=value,...]`` for every key the template does not mention.

    A template field is a key (``{mass}``: a plugin reads as its name) or a
    plugin parameter (``{structure_source}``).
    """
    fields: dict[str, str] = {}
    for key, v in combo.items():
        k = key.replace(".", "_")
        fields[k] = label(v)
        if isinstance(v, dict):
            fields.update({f"{k}_{p}": str(x) for p, x in v.items() if p != "name"})
    used = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    name = template.format(**fields) if used else template
    rest = [f"{key.replace('.', '_')}={label(v)}" for key, v in combo.items()
            if not any(u == key.replace(".", "_") or u.startswith(key.replace(".", "_") + "_") for u in used)]
    return f"{name}[{','.join(rest)}]" if rest else name


def expand(config: StudyConfig, path: Path) -> list[CellConfig]:
    """Arms x grid x axes x seeds -> cells, each validated with the field it came from."""
    try:
        CellConfig.model_validate({**config.base, "arm": "base", "seed": 0})
    except ValidationError as e:
        raise _as_study_error(path, e, ("base",)) from None
    cells: list[CellConfig] = []
    for i, arm in enumerate(config.arms):
        cells += _expand_arm(config, arm, path, f"arms[{i}]")
    names = [c.arm for c in cells if c.seed == config.seeds[0]]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StudyError(path, "arms", f"two cells are both named '{dup[0]}'; use a name template like '{{mass}}+{{structure}}'")
    _check_analysis(config, path, set(names))
    return cells


def _expand_arm(config: StudyConfig, arm: ArmConfig, path: Path, field: str) -> list[CellConfig]:
    knowledge = {k: getattr(arm, k) for k in KNOWLEDGE_KEYS if getattr(arm, k) is not None}
    axes = {**arm.grid, **config.axes}
    out = []
    for values in itertools.product(*axes.values()):
        combo = dict(zip(axes, values))
        try:
            name = arm_name(arm.name, combo)
        except (KeyError, IndexError, ValueError) as e:
            raise StudyError(path, f"{field}.name", f"template '{arm.name}' uses {e}, which is not a grid or axis key") from None
        for seed in config.seeds:
            d = copy.deepcopy(config.base)
            for k, v in knowledge.items():
                set_path(d, k, v.flat() if hasattr(v, "flat") else v)
            try:
                for k, v in {**arm.set, **combo}.items():
                    set_path(d, k, v)
                cell = CellConfig.model_validate({**d, "arm": name, "seed": seed})
            except ConfigError as e:
                raise StudyError(path, f"{field}.grid", str(e)) from None
            except ValidationError as e:
                raise _as_study_error(path, e, (field, f"<cell {name}>")) from None
            try:
                check_cell(cell, blame(arm, combo, f"{field} ({name})"))
            except CellCheckError as e:
                raise StudyError(path, e.field, str(e)) from None
            out.append(cell)
    return out


def blame(arm: ArmConfig, combo: dict[str, Any], field: str) -> dict[str, str]:
    """Which study field set each part of a cell that ``check_cell`` may refuse: the arm's
    when its ``set``, ``grid`` or the axes override it, else ``base``'s."""
    overridden = [*arm.set, *combo]

    def who(path: str) -> str:
        hit = any(k == path or path.startswith(k + ".") or k.startswith(path + ".") for k in overridden)
        return f"{field}: {path}" if hit else f"base.{path}"

    return {"data": who("data"), "optim.batch_size": who("optim.batch_size"), "student": who("student"),
            "teacher.optim.batch_size": who("teacher.optim.batch_size"), "teacher": who("teacher.model"),
            "knowledge": field}


def _check_analysis(config: StudyConfig, path: Path, arms: set[str]) -> None:
    a = config.analysis
    wanted = [("analysis.baseline", a.baseline)] + [
        (f"analysis.{key}[{i}]", r) for key in ("reference", "heatmaps") for i, r in enumerate(getattr(a, key))
    ] + [(f"analysis.pairs[{i}]", r) for i, pair in enumerate(a.pairs) for r in pair]
    for field, arm in wanted:
        if arm is not None and arm not in arms:
            raise StudyError(path, field, f"no arm named '{arm}'; arms: {', '.join(sorted(arms))}")
