"""Study files: a small override of the cell defaults, expanded into cells.

A study YAML holds ``base`` (overrides of ``CellConfig``'s defaults), named
``arms`` (each a choice of knowledge components, optionally with a ``grid`` that
crosses component choices into sub-arms), ``axes`` crossed with every arm, and
``seeds``. Everything is validated before the first cell trains; a problem is a
``StudyError`` naming the file, the field and what is allowed.
"""
from __future__ import annotations

import codecs
import collections
import copy
import dataclasses
import itertools
import os
import re
import stat
import string
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from kdablate.checks import CellCheckError, check_cell
from kdablate.compose import CompositionError, apply_overrides, import_plugins, resolve_extends
from kdablate.config import (ArmConfig, CellConfig, check_axes, Float, Frozen, Int, KnowledgeConfig, Seed,
                             flatten)
from kdablate.factors import DEFAULT_FACTORS, FACTORS, factor_levels, has_crossing
from kdablate.registry import ConfigError, brief

KNOWLEDGE_KEYS = tuple(KnowledgeConfig.model_fields)  # an arm's fields, and the shortcuts of 'set' keys


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so `alpha: 0.9` ... `alpha: 0` would quietly train a different arm)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges; SafeLoader resolves it
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (lines {seen[key]} and {line}); keep one",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, StrictLoader.construct_mapping)

# Limits on what a study file may cost to read. The shipped studies are far below each (at most
# 4 KiB, nesting depth 7 and 306 YAML nodes; tests/test_hostile.py checks it). Pure-Python PyYAML
# parses ~10,000 nodes a second, so the node budget also bounds the parse time.
MAX_FILE_BYTES = 1 << 20
MAX_YAML_DEPTH = 64  # the composer recurses per level: 5,000 '[' were a RecursionError
MAX_YAML_NODES = 100_000  # counted with every alias expanded: a billion-laughs file is ~1 KiB
MAX_INT_CHARS = 100  # PyYAML reads '1:59:59:...' (base 60) in quadratic time, and '0xfff...' has no cap
DEFAULT_MAX_CELLS = 20_000  # the largest shipped study has 110; 10,000 seeds x 8 arms took 70 s to expand


class _Refused(yaml.MarkedYAMLError):
    """A YAML file refused by a limit; ``problem`` is the whole message, fix included."""

    def __init__(self, problem: str, mark: yaml.Mark | None) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class BoundedLoader(StrictLoader):
    """StrictLoader that refuses, while composing and before constructing anything, YAML nested
    deeper than MAX_YAML_DEPTH or of more than MAX_YAML_NODES nodes once aliases are expanded
    (construction shares aliased objects, but validation and error messages walk every copy)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._composed = 0
        self._extent: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, depth), aliases expanded

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._composed += 1  # each node or alias costs ~0.1 ms to parse: stop a flat flood early too
        if self._composed > MAX_YAML_NODES:
            raise _Refused(f"more than {MAX_YAML_NODES:,} YAML values; a study needs far fewer",
                           self.peek_event().start_mark)
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            if id(node) not in self._extent:  # its anchor is still open: the alias is inside it
                raise _Refused("an alias refers to a collection that contains it; remove the recursion", mark)
            return node
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _Refused(f"nested deeper than {MAX_YAML_DEPTH} levels; flatten the file",
                           self.peek_event().start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._extent[id(node)] = self._measure(node)
        return node

    def _measure(self, node: yaml.Node) -> tuple[int, int]:
        """(nodes, depth) of ``node`` with aliases expanded, from its children's, memoised: linear."""
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        sizes = [self._extent[id(c)] for c in children]
        nodes, depth = 1 + sum(n for n, _ in sizes), 1 + max((d for _, d in sizes), default=0)
        if nodes > MAX_YAML_NODES:
            raise _Refused(f"expands to more than {MAX_YAML_NODES:,} values (an alias counts each time it is "
                           "used); remove the aliases or shrink the file", node.start_mark)
        if depth > MAX_YAML_DEPTH:
            raise _Refused(f"nested deeper than {MAX_YAML_DEPTH} levels through aliases; flatten the file",
                           node.start_mark)
        return nodes, depth

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # PyYAML's scalar constructors raise plain errors ('2020-13-01': month must be in 1..12).
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError, OverflowError) as e:
            kind = node.tag.rsplit(":", 1)[-1]
            raise _Refused(f"cannot read this value as {clip(kind, 40)} ({clip(str(e), 120)}); "
                           "quote it if it is text", node.start_mark) from None

    def construct_bounded_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > MAX_INT_CHARS:
            raise _Refused(f"an integer of {len(node.value):,} characters; write at most {MAX_INT_CHARS}",
                           node.start_mark)
        return self.construct_yaml_int(node)


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_bounded_int)

_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")  # everything str.splitlines() splits on


def clip(text: str, limit: int = 200) -> str:
    """``text`` on one line and at most ``limit`` characters, its middle cut (the fix at the end
    of a message survives); slices first, so a megabyte costs nothing."""
    if len(text) > limit:
        head = (limit - 5) * 2 // 3
        text = text[:head] + " ... " + text[len(text) - (limit - 5 - head):]
    return _BREAKS.sub(" ", text)


class StudyError(Exception):
    """A bad study file; ``str()`` is the one-line message the CLI prints."""

    def __init__(self, file: str | Path, field: str, message: str) -> None:
        self.file, self.field, self.message = str(file), field, message
        super().__init__(f"{file}: {field}: {message}" if field else f"{file}: {message}")


class EquivalenceConfig(Frozen):
    """TOST per comparison: is the difference within ±``margin`` points?"""

    margin: Float = Field(gt=0, le=100)


class AnalysisConfig(Frozen):
    """What the analysis scripts draw.

    baseline: the arm paired differences are taken against; reference: arms drawn
    as lines; factorial: draw and tabulate the mass x structure contrasts;
    extra_metrics: more columns for the table; heatmaps: arms whose
    explanation-derived class similarity is drawn beside the teacher's; pairs:
    (a, b) arms compared paired by seed; target_effect: the difference in points whose seeds
    needed every comparison reports (80% power, two-sided paired t, alpha 0.05); equivalence:
    ``{margin: m}`` tests each comparison for equivalence within ±m points (TOST).
    """

    baseline: str | None = None
    reference: list[str] = Field(default_factory=list)
    # true: mass x structure; or the two factors to cross, from kdablate.factors.FACTORS
    factorial: bool | list[Literal[FACTORS]] = False
    extra_metrics: list[str] = Field(default_factory=list)
    heatmaps: list[str] = Field(default_factory=list)
    pairs: list[tuple[str, str]] = Field(default_factory=list)
    target_effect: Float = Field(1.0, gt=0, le=100)
    equivalence: EquivalenceConfig | None = None

    @field_validator("factorial")
    @classmethod
    def _two_factors(cls, v: bool | list[str]) -> bool | list[str]:
        if isinstance(v, list) and (len(v) != 2 or v[0] == v[1]):
            raise ValueError(f"factorial crosses two different factors, e.g. [temperature, structure]; got {v}")
        return v

    def factors(self) -> tuple[str, str] | None:
        """The two factors the report crosses, or None."""
        if self.factorial is True:
            return DEFAULT_FACTORS
        return tuple(self.factorial) if self.factorial else None


class StudyConfig(Frozen):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")  # never '.' or '..'
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    seeds: list[Seed] = Field(min_length=1)
    arms: list[ArmConfig] = Field(min_length=1)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    analysis: AnalysisConfig = AnalysisConfig()
    # Published test accuracies in percent, per arm name (and `teacher`): the report's "Δ to published".
    published: dict[str, Annotated[Float, Field(ge=0, le=100)]] = Field(default_factory=dict)

    @field_validator("axes")
    @classmethod
    def _axes(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return check_axes(v)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[Int]) -> list[Int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat: {v}")
        return v

    @model_validator(mode="after")
    def _arms(self) -> "StudyConfig":
        names = [a.name for a in self.arms]
        dup = sorted(n for n, k in collections.Counter(names).items() if k > 1)  # list.count: 25 s for 30k arms
        if dup:
            raise ValueError(f"duplicate arm name '{dup[0]}'; arm names must be unique")
        return self


@dataclasses.dataclass(frozen=True)
class Study:
    """A validated study: its config, its file and its expanded cells (arm-major, then seed),
    the plugin modules it imported and the command-line overrides applied to it."""

    config: StudyConfig
    path: Path
    cells: tuple[CellConfig, ...]
    plugins: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.config.name

    def arms(self) -> list[str]:
        return list(dict.fromkeys(c.arm for c in self.cells))

    def with_seeds(self, seeds: Sequence[int]) -> "Study":
        """This study over ``seeds`` (a ``seeds=`` override), keeping its selected arms."""
        full = load_study(self.path, [*self.overrides, f"seeds=[{', '.join(map(str, seeds))}]"])
        arms = set(self.arms())
        return dataclasses.replace(full, cells=tuple(c for c in full.cells if c.arm in arms))

    def select(self, arms: Sequence[str] = (), seeds: Sequence[int] = ()) -> "Study":
        """The study restricted to the arms matching any glob in ``arms`` and the ``seeds``
        (either empty: all); a pattern or seed that selects nothing is a StudyError."""
        names = self.arms()
        for pattern in arms:
            if not any(fnmatchcase(n, pattern) for n in names):
                raise StudyError(self.path, "--arm", f"'{clip(pattern, 80)}' matches no arm; arms: {', '.join(names)}")
        for seed in seeds:
            if seed not in self.config.seeds:
                raise StudyError(self.path, "--seed", f"{seed} is not one of the study's seeds {self.config.seeds}")
        cells = tuple(c for c in self.cells if (not arms or any(fnmatchcase(c.arm, p) for p in arms))
                      and (not seeds or c.seed in seeds))
        return dataclasses.replace(self, cells=cells)


STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # a plain file name: never '.', '..' or a path


# The studies shipped with kdablate: found from any folder (after ./studies and ./NAME.yaml).
SHIPPED = Path(__file__).resolve().parents[1] / "studies"


def resolve_path(study: str | Path, studies_dir: Path = Path("studies")) -> Path:
    """A ``.yaml``/``.yml`` path as given; for a bare name, the first of ``studies/<name>.yaml``,
    ``./<name>.yaml`` and the shipped ``<name>.yaml`` that exists (else the first, which the
    loader reports as missing)."""
    p = Path(study)
    if p.suffix in (".yaml", ".yml"):
        return p
    if STUDY_NAME.fullmatch(str(study)):
        candidates = [studies_dir / f"{study}.yaml", Path(f"{study}.yaml"), SHIPPED / f"{study}.yaml"]
        return next((c for c in candidates if is_file(c)), candidates[0])
    raise StudyError(clip(str(study), 120), "", "not a study: give a name from studies/ (letters, digits, "
                     "'_', '-', '.', not starting with '.') or the path of a .yaml/.yml file")


def is_file(path: Path) -> bool:
    """Whether ``path`` is a regular file; False for a name the OS refuses (too long, say): the
    loader then reports it in one line."""
    try:
        return path.is_file()
    except OSError:
        return False


def load_study(study: str | Path, overrides: Sequence[str] = (), arms: Sequence[str] = (),
               seeds: Sequence[int] = ()) -> Study:
    """Read, compose (``extends``, ``plugins``, ``overrides``: see ``kdablate.compose``), validate
    and expand a study file, keeping the cells of ``arms`` (globs) and ``seeds``; raises
    StudyError on any problem."""
    path = Path(str(study))
    try:
        path = resolve_path(study)
        raw = compose(path, overrides)
        plugins = raw.pop("plugins", [])
        import_plugins(plugins, path.parent)
        try:
            config = StudyConfig.model_validate(raw)
        except ValidationError as e:
            raise _as_study_error(path, e, ()) from None
        full = Study(config, path, tuple(expand(config, path)), tuple(plugins), tuple(overrides))
        return full.select(arms, seeds)
    except CompositionError as e:
        raise _one_line(StudyError(path, e.field, e.message)) from None
    except StudyError as e:
        raise _one_line(e) from None


def _one_line(e: StudyError) -> StudyError:
    """Whatever a validator echoed, the CLI's line stays one line of at most ~500 characters."""
    file, field = clip(e.file, 150), clip(e.field, 100)
    return StudyError(file, field, clip(e.message, 496 - len(file) - len(field)))


def read_mapping(path: Path) -> dict[str, Any]:
    raw = parse_yaml(read_text(path), path)
    if not isinstance(raw, dict):
        raise StudyError(path, "", "a study file must be a YAML mapping with base, seeds and arms")
    return raw


def locate(target: str, folder: Path) -> Path:
    """An ``extends`` target: a .yaml path relative to the extending file, or a study name found
    beside it or in ./studies."""
    if target.endswith((".yaml", ".yml")):
        return folder / target
    beside = folder / f"{target}.yaml"
    return beside if STUDY_NAME.fullmatch(target) and is_file(beside) else resolve_path(target)


def compose(path: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """The study mapping with its ``extends`` chain and ``x-*`` keys resolved and the overrides set."""
    raw = resolve_extends(read_mapping(path), path, read_mapping, locate)
    raw.setdefault("name", path.stem)
    return apply_overrides(raw, overrides, lambda text: override_value(text, path))


def override_value(text: str, path: Path) -> Any:
    """A command-line override's value, read as YAML with the study file's limits."""
    try:
        return parse_yaml(text, path) if text else None
    except StudyError as e:
        raise CompositionError(f"override value {clip(text, 60)!r}", e.message) from None


def read_text(path: Path) -> str:
    """The file's text: a regular file of at most MAX_FILE_BYTES, strictly UTF-8 (a BOM is allowed)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise StudyError(path, "", f"no such study file; known studies: {_known(path.parent)}") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise StudyError(path, "", f"cannot be read ({getattr(e, 'strerror', None) or e}); check the path") from None
    if stat.S_ISDIR(mode):
        raise StudyError(path, "", "is a directory, not a study file; give a .yaml file")
    if not stat.S_ISREG(mode):  # reading a FIFO would block, a device never end
        raise StudyError(path, "", "is not a regular file (a FIFO, socket or device); give a .yaml file")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise StudyError(path, "", f"cannot be read ({e.strerror or e}); check its permissions") from None
    if len(data) > MAX_FILE_BYTES:
        raise StudyError(path, "", f"is larger than {MAX_FILE_BYTES:,} bytes ({MAX_FILE_BYTES >> 20} MiB); a study "
                                   "file is a few KiB: keep only the study in it")
    return decode_utf8(data, path)


def _known(folder: Path) -> str:
    try:
        names = sorted(q.stem for q in folder.glob("*.yaml")) if folder.is_dir() else []
    except OSError:
        names = []
    return ", ".join(names[:30]) + (", ..." if len(names) > 30 else "") if names else "none"


def decode_utf8(data: bytes, path: Path) -> str:
    """``data`` as UTF-8 text, or a StudyError naming the first bad byte, its offset and line."""
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at, what = skip + e.start, f"byte 0x{data[skip + e.start]:02x} at byte offset {skip + e.start} ({e.reason})"
    else:
        if b"\0" not in data:  # UTF-16 without a BOM decodes, with a NUL beside each ASCII letter
            return text
        at = data.index(b"\0")
        what = f"a NUL byte at byte offset {at}"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\0" in data[:at + 2]:
        what += "; it looks like UTF-16 or binary"
    line = data.count(b"\n", 0, at) + 1
    raise StudyError(path, f"line {line}", f"not UTF-8 text: {what}; save the file as UTF-8")


def parse_yaml(text: str, path: Path) -> Any:
    """The one YAML document in ``text``, read with BoundedLoader; StudyError on any problem."""
    try:
        loader = BoundedLoader(text)  # checks the characters already
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise StudyError(path, f"line {line}", f"character #x{e.character:04x} is not allowed in YAML "
                                               f"({e.reason}); remove it") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "yaml"
        problem = clip(str(getattr(e, "problem", None) or e), 200)
        message = problem if isinstance(e, _Refused) else f"invalid YAML ({problem}); fix the syntax"
        raise StudyError(path, where, message) from None


UNION_TAGS = ("one", "ensemble")  # the branches of CellConfig.teacher: not fields of the file


def _validator_tag(part: object) -> bool:
    # pydantic names a model with an after-validator in a union 'function-after[...]'
    return isinstance(part, str) and part.startswith(("function-after[", "function-before["))


def _as_study_error(path: Path, e: ValidationError, prefix: tuple) -> StudyError:
    """The first pydantic error as a StudyError with a dotted field path; echoes are cut short."""
    err = e.errors(include_url=False)[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{clip(str(p), 60)}"
                  for p in (*prefix, *err["loc"]) if p not in UNION_TAGS and not _validator_tag(p)).lstrip(".")
    msg = clip(err["msg"].removeprefix("Value error, "), 300)
    if err["type"] == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
    elif err["type"] == "string_pattern_mismatch" and loc == "name":
        msg = (f"{msg} (got {brief(err['input'], 80)}); a study name is letters, digits, '_', '-' and '.', "
               "not starting with '.' (without name:, the file's name is used)")
    elif err["type"] not in ("value_error", "missing") and "input" in err:  # 'missing' would echo the parent
        msg = f"{msg} (got {brief(err['input'])})"
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


TEMPLATE_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def template_pieces(template: str) -> list[tuple[str, str | None]]:
    """An arm-name template as (literal text, field or None) pieces; ValueError unless every field
    is a plain ``{key}``: a format spec (``{mass:>1000000000}``) can allocate a gigabyte, and
    attribute or index access (``{mass.__class__}``) reaches into Python objects."""
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"{e}; write '{{{{' or '}}}}' for a literal brace") from None
    for _, field, spec, conversion in pieces:
        if field is not None and (spec or conversion or not TEMPLATE_FIELD.fullmatch(field)):
            shown = clip(f"{{{field}" + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}",
                         60)
            raise ValueError(f"field {shown} is not a plain {{key}}: no format spec, '!' conversion, "
                             "attribute or index; write e.g. '{mass}+{structure}'")
    return [(text, field) for text, field, _, _ in pieces]


def arm_name(template: str, combo: dict[str, Any]) -> str:
    """The arm's name for one grid/axes combination: the template filled in, plus
    ``[key=value,...]`` for every key the template does not mention.

    A template field is a key (``{mass}``: a plugin reads as its name) or a
    plugin parameter (``{structure_source}``). Fields are substituted as text, never
    through ``str.format``; a field that is not a key raises KeyError.
    """
    fields: dict[str, str] = {}
    for key, v in combo.items():
        k = key.replace(".", "_")
        fields[k] = label(v)
        if isinstance(v, dict):
            fields.update({f"{k}_{p}": str(x) for p, x in v.items() if p != "name"})
    pieces = template_pieces(template)
    used = {f for _, f in pieces if f}
    name = "".join(text + (fields[f] if f else "") for text, f in pieces) if used else template
    rest = [f"{key.replace('.', '_')}={label(v)}" for key, v in combo.items()
            if not any(u == key.replace(".", "_") or u.startswith(key.replace(".", "_") + "_") for u in used)]
    return f"{name}[{','.join(rest)}]" if rest else name


def count_cells(config: StudyConfig) -> int:
    """How many cells ``expand`` would make: per arm, the product of its grid and the axes sizes,
    times the seeds; by multiplication, before anything is expanded."""
    total = 0
    for arm in config.arms:
        n = len(config.seeds)
        for values in {**arm.grid, **config.axes}.values():
            n *= len(values)
        total += n
    return total


def max_cells(path: Path) -> int:
    """The cell limit: KDABLATE_MAX_CELLS, or DEFAULT_MAX_CELLS."""
    text = os.environ.get("KDABLATE_MAX_CELLS", "").strip()
    if not text:
        return DEFAULT_MAX_CELLS
    if not (text.isascii() and text.isdigit()) or len(text) > 18 or int(text) < 1:
        raise StudyError(path, "", f"KDABLATE_MAX_CELLS={brief(text, 40)} is not a positive whole number; "
                                   "fix or unset it")
    return int(text)


def check_size(config: StudyConfig, path: Path) -> None:
    """Refuse a study of more cells than the limit before expanding it (10,000 seeds took 89 s)."""
    n, limit = count_cells(config), max_cells(path)
    if n > limit:
        shown = f"{n:,}" if n.bit_length() < 64 else f"about 10^{int(n.bit_length() * 0.30103)}"
        raise StudyError(path, "arms", f"the study expands to {shown} cells (arms x grid x axes x seeds), more "
                                       f"than the limit of {limit:,}; use fewer values or seeds, or raise "
                                       "the environment variable KDABLATE_MAX_CELLS")


def expand(config: StudyConfig, path: Path) -> list[CellConfig]:
    """Arms x grid x axes x seeds -> cells, each validated with the field it came from."""
    check_size(config, path)
    for i, arm in enumerate(config.arms):
        try:
            template_pieces(arm.name)
        except ValueError as e:
            raise StudyError(path, f"arms[{i}].name", f"template {brief(arm.name, 80)}: {e}") from None
    try:
        CellConfig.model_validate({**config.base, "arm": "base", "seed": 0})
    except ValidationError as e:
        raise _as_study_error(path, e, ("base",)) from None
    cells: list[CellConfig] = []
    for i, arm in enumerate(config.arms):
        cells += _expand_arm(config, arm, path, f"arms[{i}]")
    names = [c.arm for c in cells if c.seed == config.seeds[0]]
    dup = sorted(n for n, k in collections.Counter(names).items() if k > 1)  # list.count here was quadratic
    if dup:
        raise StudyError(path, "arms", f"two cells are both named '{dup[0]}'; use a name template like '{{mass}}+{{structure}}'")
    _check_analysis(config, path, set(names))
    firsts = [c for c in cells if c.seed == config.seeds[0]]
    _check_reads(config, path, firsts)
    _check_ignored(config, path, firsts)
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
            **{f"teacher.{f}": who(f"teacher.{f}") for f in ("model", "checkpoint", "from_run", "data", "views")},
            "knowledge": field}


def _check_analysis(config: StudyConfig, path: Path, arms: set[str]) -> None:
    a = config.analysis
    wanted = [("analysis.baseline", a.baseline)] + [
        (f"analysis.{key}[{i}]", r) for key in ("reference", "heatmaps") for i, r in enumerate(getattr(a, key))
    ] + [(f"analysis.pairs[{i}]", r) for i, pair in enumerate(a.pairs) for r in pair]
    wanted += [(f"published.{arm}", arm) for arm in config.published if arm != "teacher"]
    for field, arm in wanted:
        if arm is not None and arm not in arms:
            raise StudyError(path, field, f"no arm named '{arm}'; arms: {', '.join(sorted(arms))}")
    for i, (x, y) in enumerate(a.pairs):
        if x == y:
            raise StudyError(path, f"analysis.pairs[{i}]", f"compares '{x}' with itself (a difference of 0 in every "
                                                           "seed); name two different arms")


def explains(cell: CellConfig) -> bool:
    """Whether the cell's structure is built from explanations (so it has a similarity to draw)."""
    s = cell.knowledge.structure
    return "explanation" in (s.name, s.params.get("base"))


def _check_reads(config: StudyConfig, path: Path, cells: list[CellConfig]) -> None:
    """The analysis asks only for what the arms make: heatmaps of arms that explain, a factorial
    of a crossing the arms hold."""
    a, by_arm = config.analysis, {c.arm: c for c in cells}
    for i, arm in enumerate(a.heatmaps):
        if not explains(by_arm[arm]):
            raise StudyError(path, f"analysis.heatmaps[{i}]", f"arm '{arm}' has no explanation structure, so it has "
                                                              "no explanation similarity to draw; list arms whose "
                                                              "structure is explanation")
    factors = a.factors()
    if factors and not has_crossing([{"arm": c.arm, **factor_levels(flatten(c.model_dump(mode="json")))}
                                     for c in cells], factors):
        raise StudyError(path, "analysis.factorial", f"no arms cross {factors[0]} x {factors[1]} (at least 2 x 2 "
                                                     "soft-target arms that share every other factor); add them "
                                                     "(a grid) or remove factorial")


def effective(cell: CellConfig) -> str:
    """The cell's hash with what its knowledge ignores reset: a soft target at alpha 0 reads no
    mass, structure, temperature or warm-up (plain CE, with its confidence penalty)."""
    k = cell.knowledge
    if k.objective.name == "soft_target" and k.alpha == 0:
        k = KnowledgeConfig(entropy_penalty=k.entropy_penalty)
    return cell.model_copy(update={"knowledge": k, "arm": ""}).config_hash()


def _check_ignored(config: StudyConfig, path: Path, cells: list[CellConfig]) -> None:
    """Refuse an axis or grid that makes cells of one arm that differ only in what the arm
    ignores: identical training under different hashes (CE at alpha 0 crossed with T)."""
    seen: dict[str, str] = {}
    for c in cells:
        key = effective(c)
        if key in seen and family(seen[key]) == family(c.arm):
            raise StudyError(path, "axes", f"cells '{seen[key]}' and '{c.arm}' differ only in what they ignore "
                                           "(alpha 0 reads no mass, structure or temperature), so they train the "
                                           "same model twice; give such arms one value (e.g. in their set:)")
        seen.setdefault(key, c.arm)


def family(arm: str) -> str:
    """The arm an expanded cell came from: its name before a '[key=value]' suffix."""
    return arm.split("[", 1)[0]
