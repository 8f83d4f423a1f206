"""The factors a study crosses and the rule for a complete crossing, written once: the study
refuses ``analysis.factorial`` without a crossing when it loads, and the analysis tabulates the
crossing it finds, both by these functions.

A cell's factor levels come from its flattened config (``kdablate.config.flatten``; the MLflow
params of its run are the same keys): the explanation source is part of the structure's label,
and an objective other than the soft target stands in for mass and structure.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence


@dataclasses.dataclass(frozen=True)
class Factor:
    """A factor a study crosses: its name (``analysis.factorial``, the analysis' columns), the
    cell run's tag that carries its level, and its axis label in the figures."""

    name: str
    tag: str
    label: str


# Every factor, declared here only; the order is the cell runs' tag order in the MLflow UI.
FACTOR_TABLE = (Factor("objective", "objective", "objective"), Factor("mass", "mass", "non-GT mass"),
                Factor("structure", "structure", "class-similarity structure"),
                Factor("temperature", "T", "temperature T"), Factor("alpha", "alpha", "α"),
                Factor("source", "source", "explanation source"), Factor("feature", "feature", "feature knowledge"))
FACTORS = tuple(f.name for f in FACTOR_TABLE)
DEFAULT_FACTORS = ("mass", "structure")  # the crossing ``factorial: true`` means


def factor_levels(params: dict[str, Any]) -> dict[str, Any]:
    """A cell's level of every factor, from its flattened config (or its run's params)."""
    objective = params.get("knowledge.objective.name", "soft_target")
    if objective != "soft_target":
        mass, structure = "—", str(objective)
    else:
        s = params.get("knowledge.structure.name", "uniform")
        base = params.get("knowledge.structure.base")
        detail = params.get("knowledge.structure.source") or (base if base not in (None, "teacher") else None)
        mass, structure = str(params.get("knowledge.mass.name", "none")), f"{s}:{detail}" if detail else str(s)
    return {"mass": mass, "structure": structure, "temperature": params.get("knowledge.temperature"),
            "alpha": params.get("knowledge.alpha"), "source": params.get("knowledge.structure.source") or "n/a",
            "objective": objective, "feature": feature_level(params.get("knowledge.feature"))}


def feature_level(terms: Any) -> str:
    """The feature terms' names joined by '+' ('at+rkd'), 'none' without any, from the flattened
    config's list of specs (a run's param arrives parsed: ``analysis.runs.cast_param``)."""
    return "+".join(t["name"] for t in terms or ()) or "none"


def held_constant(factors: Sequence[str]) -> list[str]:
    """The factors a crossing of ``factors`` keeps fixed (the arms compared share them). The
    explanation source is part of the structure's label, so crossing it frees the structure;
    crossing alpha (logit knowledge or none: CE is alpha 0) frees what the soft target is made of."""
    free = set(factors) | ({"structure"} if "source" in factors else set())
    free |= {"mass", "structure", "temperature"} if "alpha" in factors else set()
    return [f for f in ("temperature", "alpha", "mass", "structure", "feature") if f not in free]


def distils(row: dict[str, Any]) -> bool:
    """Whether an arm builds a soft target (the crossings are among these)."""
    return bool(row["alpha"]) and row["alpha"] > 0 and row["mass"] not in ("none", "—")


def largest_crossing(rows: Sequence[dict[str, Any]], f1: str, f2: str) -> list[dict[str, Any]]:
    """The rows of the largest complete f1 x f2 crossing (>= 2 x 2) among ``rows`` (each with an
    'arm' and its factor levels, in study order; the first arm on each cell keeps it)."""
    firsts: dict[tuple, str] = {}
    for r in rows:
        firsts.setdefault((r[f1], r[f2]), r["arm"])
    rows = [r for r in rows if r["arm"] in set(firsts.values())]
    levels = list(dict.fromkeys(r[f1] for r in rows))
    has = {lv: {r[f2] for r in rows if r[f1] == lv} for lv in levels}
    best: list[dict[str, Any]] = []
    size = 0
    for k in range(2, len(levels) + 1):
        for subset in itertools.combinations(levels, k):
            seconds = set.intersection(*(has[lv] for lv in subset))
            if len(seconds) >= 2 and k * len(seconds) > size:
                best, size = [r for r in rows if r[f1] in subset and r[f2] in seconds], k * len(seconds)
    return best


def crossing_groups(rows: Sequence[dict[str, Any]], factors: Sequence[str]) -> list[list[dict[str, Any]]]:
    """The distilling rows (every row when alpha is crossed) grouped by the factors a crossing of
    ``factors`` holds constant, in study order."""
    held = held_constant(factors)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if distils(r) or "alpha" in factors:
            groups.setdefault(tuple(r.get(f) for f in held), []).append(r)  # rows made before a factor existed lack it
    return list(groups.values())


def has_crossing(rows: Sequence[dict[str, Any]], factors: Sequence[str]) -> bool:
    """Whether some setting of the held-constant factors crosses ``factors`` completely (>= 2 x 2)."""
    return any(largest_crossing(g, *factors) for g in crossing_groups(rows, factors))
