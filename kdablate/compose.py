"""How a study file is composed before it is validated: ``extends:``, ``x-*`` anchor keys,
``plugins:`` and command-line overrides (Hydra-style dotted paths).

    extends: components            # a study name, or a path relative to this file
    x-il: &il {temperature: 4.0, alpha: 0.9}   # x-* keys only hold YAML anchors
    plugins: [mylab.components]     # modules imported before validation
    base: {optim: {epochs: 10}}     # merged over the parent's base
    arms:                           # an arm named like one of the parent's replaces it
      - {name: kd, mass: teacher, structure: teacher, <<: *il}

    kdablate run components optim.epochs=2 seeds=[0,1] arms.kd.temperature=8

A child's ``base`` and ``analysis`` are merged key by key over the parent's; its
``arms`` replace the parent's arms of the same name and add the rest; every other
key it gives (seeds, axes, description) replaces the parent's. Installed packages
can register components through the entry-point group ``kdablate.plugins``.
"""
from __future__ import annotations

import copy
import importlib
import importlib.metadata
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from kdablate.config import ArmConfig
from kdablate.registry import ConfigError, brief

MAX_EXTENDS = 8  # a chain longer than this is a mistake, not a design
TOP_LEVEL = ("name", "description", "base", "seeds", "arms", "axes", "analysis", "published", "extends", "plugins")
ENTRY_POINT_GROUP = "kdablate.plugins"
_loaded_entry_points: set[str] = set()


class CompositionError(ValueError):
    """A problem composing a study; ``field`` names where (``extends``, ``plugins[0]``, an override)."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


def strip_anchor_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """The mapping without its ``x-*`` keys, which exist only to hold YAML anchors."""
    return {k: v for k, v in raw.items() if not (isinstance(k, str) and k.startswith("x-"))}


def merge(parent: Any, child: Any) -> Any:
    """``child`` deep-merged over ``parent``: mappings key by key, anything else replaced."""
    if isinstance(parent, dict) and isinstance(child, dict):
        out = dict(parent)
        for k, v in child.items():
            out[k] = merge(parent[k], v) if k in parent else v
        return out
    return copy.deepcopy(child)


def merge_arms(parent: list[Any], child: list[Any]) -> list[Any]:
    """The parent's arms with those the child names again replaced in place, then the child's new ones."""
    named = {a["name"]: a for a in child if isinstance(a, dict) and "name" in a}
    out = [named.pop(a["name"]) if isinstance(a, dict) and a.get("name") in named else a for a in parent]
    return out + [a for a in child if not (isinstance(a, dict) and a.get("name") in {
        p.get("name") for p in parent if isinstance(p, dict)})]


def extend(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """One ``extends`` step: ``child`` composed over the already-composed ``parent``."""
    out = {k: v for k, v in parent.items() if k not in ("name", "extends")}
    for key, value in child.items():
        if key in ("base", "analysis") and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif key == "arms" and isinstance(value, list) and isinstance(out.get("arms"), list):
            out["arms"] = merge_arms(out["arms"], value)
        elif key != "extends":
            out[key] = value
    out["plugins"] = list(dict.fromkeys([*parent.get("plugins", []), *child.get("plugins", [])]))
    return out


def resolve_extends(raw: dict[str, Any], path: Path, read: Callable[[Path], Any],
                    locate: Callable[[str, Path], Path], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """``raw`` with its ``extends`` chain applied, parents first. ``read(path)`` parses a study
    file's YAML; ``locate(name, folder)`` finds a parent by name or relative path."""
    raw = strip_anchor_keys(raw)
    if "extends" not in raw:
        return raw
    target = raw["extends"]
    if not isinstance(target, str) or not target:
        raise CompositionError("extends", f"must be a study name or a .yaml path, not {brief(target, 80)}")
    parent_path = locate(target, path.parent)
    chain = (*seen, path.resolve())
    if parent_path.resolve() in chain:
        raise CompositionError("extends", f"'{target}' extends this file again (a cycle); remove one extends")
    if len(chain) > MAX_EXTENDS:
        raise CompositionError("extends", f"more than {MAX_EXTENDS} studies deep; flatten the chain")
    parent = read(parent_path)
    if not isinstance(parent, dict):
        raise CompositionError("extends", f"{parent_path} is not a study mapping")
    return extend(resolve_extends(parent, parent_path, read, locate, chain), raw)


def parse_override(text: str, parse_value: Callable[[str], Any]) -> tuple[list[str], Any]:
    """'optim.epochs=2' -> (['optim', 'epochs'], 2); the value is read as YAML, so 2 is an int,
    [0,1] a list and {name: constant, eps: 0.1} a plugin."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise CompositionError(f"override {brief(text, 80)}",
                               "write KEY=VALUE with a dotted key, e.g. optim.epochs=2 or arms.kd.temperature=8")
    return parts, parse_value(value.strip())


def apply_override(raw: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    """Set one parsed override in the composed study mapping ``raw`` (before validation).

    Top-level keys (seeds, axes, analysis...) are set as given; ``arms.<name>.<field>`` sets
    an arm's field (any other dotted field goes to the arm's ``set``); anything else is a
    path under ``base`` (``optim.epochs`` means ``base.optim.epochs``)."""
    if parts[0] == "arms" and len(parts) >= 3:
        arm, field = find_arm(raw, parts[1:], text)
        if field in ArmConfig.model_fields:
            arm[field] = value
        else:
            arm.setdefault("set", {})[field] = value
        return
    if parts[0] not in TOP_LEVEL:
        parts = ["base", *parts]
    node = raw
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise CompositionError(f"override {brief(text, 80)}", f"'{p}' is not a mapping, so it has no field "
                                                                  f"'{parts[-1]}'; check the path")
        node = nxt
    node[parts[-1]] = value


def find_arm(raw: dict[str, Any], parts: list[str], text: str) -> tuple[dict[str, Any], str]:
    """The arm of the file that ``parts`` ('ls', 'alpha' or 'ls0.1', 'alpha') start with, as
    written in the file (a grid arm by its template), and the dotted field after its name."""
    arms = [a for a in (raw.get("arms") if isinstance(raw.get("arms"), list) else []) if isinstance(a, dict)]
    for end in range(len(parts) - 1, 0, -1):  # the longest name first: arm names may hold dots
        name = ".".join(parts[:end])
        for arm in arms:
            if arm.get("name") == name:
                return arm, ".".join(parts[end:])
    known = ", ".join(str(a.get("name")) for a in arms)
    raise CompositionError(f"override {brief(text, 80)}", f"no arm named '{parts[0]}' in the study file "
                                                          f"(a grid arm goes by its template); arms: {known}")


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], parse_value: Callable[[str], Any]) -> dict[str, Any]:
    """A copy of ``raw`` with every override applied, in order."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        apply_override(raw, *parse_override(text, parse_value), text)
    return raw


def import_plugins(modules: Any, folder: Path) -> None:
    """Import every module of a study's ``plugins:`` list (registering its components), with the
    study's folder and the working directory importable; then the installed entry points."""
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        raise CompositionError("plugins", f"must be a list of module names, not {brief(modules, 80)}")
    for extra in (str(Path.cwd()), str(folder.resolve())):
        if extra not in sys.path:
            sys.path.append(extra)  # appended: a plugin never shadows an installed package
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure of a user's module is reported the same way
            raise CompositionError(f"plugins[{i}]", f"cannot import '{brief(name, 80)}' ({type(e).__name__}: "
                                                    f"{brief(str(e), 160)}); check the module name and that it is "
                                                    "on PYTHONPATH or beside the study file") from None
    load_entry_points()


def load_entry_points() -> None:
    """Import each installed package's ``kdablate.plugins`` entry point, once per process."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.value in _loaded_entry_points:
            continue
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"entry point '{ep.name}' ({ep.value}) of group {ENTRY_POINT_GROUP} fails to load: "
                              f"{type(e).__name__}: {brief(str(e), 160)}; fix or uninstall that package") from None
        _loaded_entry_points.add(ep.value)
