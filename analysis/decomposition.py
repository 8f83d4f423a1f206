"""The numbers behind the figures: per-arm summaries, comparisons against reference arms, and
the factorial decomposition of any two factors (mass x structure by default; main effects and
interaction), all paired by seed.

Pure functions of the frames of ``analysis.runs``; nothing here reads MLflow or draws.
The factorial follows the paper's question (Gu, Wu & Tresp, ACCV 2020): how much
accuracy the non-ground-truth *mass* brings and how much the class-similarity
*structure* adds, and whether the two interact.
"""
from __future__ import annotations

import itertools

import pandas as pd

from analysis.stats import holm_family, one_sample, paired, t_ci
from kdablate.factors import DEFAULT_FACTORS, crossing_groups, largest_crossing


def summarize(cells: pd.DataFrame, order: list[str], metric: str, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per arm: mass, structure, T, alpha, feature, mean, std, n, ci_low, ci_high, and the mean of each ``extra``."""
    rows = []
    for arm in order:
        g = cells[cells.arm == arm]
        v = g[metric].dropna() if metric in g else pd.Series(dtype=float)
        if v.empty:
            continue
        lo, hi = t_ci(v)
        rows.append({"arm": arm, "mass": g.mass.iat[0], "structure": g.structure.iat[0],
                     "T": g.temperature.iat[0], "alpha": g.alpha.iat[0],
                     "feature": g.feature.iat[0] if "feature" in g else "none", "mean": v.mean(),
                     "std": v.std(ddof=1) if len(v) > 1 else float("nan"), "n": len(v), "ci_low": lo, "ci_high": hi,
                     **{m: g[m].mean() if m in g else float("nan") for m in extra}})
    return pd.DataFrame(rows)


def by_seed(cells: pd.DataFrame, arm: str, metric: str) -> dict[int, float]:
    """seed -> the arm's ``metric`` (seeds where it is missing left out)."""
    g = cells[cells.arm == arm].dropna(subset=[metric]) if metric in cells else cells.iloc[:0]
    return dict(zip(g.seed, g[metric]))


def compare(cells: pd.DataFrame, pairs: list[tuple[str, str]], metric: str) -> pd.DataFrame:
    """One row per (a, b): the paired statistics of a - b, with Holm-adjusted p-values over the family."""
    rows = [{"a": a, "b": b, **paired(by_seed(cells, a, metric), by_seed(cells, b, metric))} for a, b in pairs]
    return holm_family(pd.DataFrame(rows, columns=["a", "b", "diff_mean", "diff_std", "n_pairs", "ci_low",
                                                   "ci_high", "p_value", "p_wilcoxon", "d_z"]))


def against(cells: pd.DataFrame, order: list[str], reference: str, metric: str) -> pd.DataFrame:
    """Every other arm against ``reference``: one Holm family."""
    return compare(cells, [(a, reference) for a in order if a != reference], metric)


def factorial_cells(cells: pd.DataFrame, factors: tuple[str, str] = DEFAULT_FACTORS) -> tuple[pd.DataFrame, list[str]]:
    """The largest complete ``factors[0]`` x ``factors[1]`` crossing (>= 2 x 2) among soft-target
    arms that share every other factor (``kdablate.factors.held_constant``), one arm per cell; and
    the arms of that setting left out of it (a second arm on a cell already taken, e.g. an
    explanation schedule variant, or a level not crossed with every other). Empty when the study
    has none. The rule is ``kdablate.factors``', the one the study's load check uses.

    ``cells`` must be in study order: the first arm on a cell keeps it, and the levels
    keep the order in which the study's arms introduce them.
    """
    f1, f2 = factors
    best: list[dict] = []
    left_out: list[str] = []
    for group in crossing_groups(cells.to_dict("records"), factors):
        found = largest_crossing(group, f1, f2)
        if len({(r[f1], r[f2]) for r in found}) > len({(r[f1], r[f2]) for r in best}):
            best = found
            left_out = [a for a in dict.fromkeys(r["arm"] for r in group) if a not in {r["arm"] for r in best}]
    return cells[cells.arm.isin({r["arm"] for r in best})], left_out


def factorial(cells: pd.DataFrame, metric: str, factors: tuple[str, str] = DEFAULT_FACTORS) -> pd.DataFrame:
    """Main effects and interactions of a two-factor crossing (mass x structure by default;
    any two of ``FACTORS``, e.g. temperature x structure), paired by seed.

    Levels keep the study's order (e.g. structure uniform, permuted, teacher), and each
    contrast is a level minus the previous one. A main effect averages the contrast
    over the other factor's levels; an interaction is the difference of differences
    (a contrast of one factor under a contrast of the other), i.e. how much what one
    factor adds depends on the other. Rows: kind, effect, statistics of ``one_sample``,
    Holm p over all rows.
    """
    grid, _ = factorial_cells(cells, factors)
    if grid.empty:
        return pd.DataFrame()
    f1, f2 = factors
    table = grid.pivot_table(index="seed", columns=[f1, f2], values=metric)
    first, second = list(dict.fromkeys(grid[f1])), list(dict.fromkeys(grid[f2]))
    rows = []
    for factor, levels, others in ((f1, first, second), (f2, second, first)):
        for lo, hi in zip(levels, levels[1:]):
            cell = (lambda lvl, o: (lvl, o)) if factor == f1 else (lambda lvl, o: (o, lvl))
            diff = sum(table[cell(hi, o)] - table[cell(lo, o)] for o in others) / len(others)
            rows.append({"kind": "main", "effect": f"{factor}: {label(hi)} − {label(lo)}",
                         **one_sample(diff.dropna().to_dict())})
    for (a0, a1), (b0, b1) in itertools.product(zip(first, first[1:]), zip(second, second[1:])):
        dd = (table[(a1, b1)] - table[(a1, b0)]) - (table[(a0, b1)] - table[(a0, b0)])
        rows.append({"kind": "interaction", "effect": f"({label(a1)} − {label(a0)}) × ({label(b1)} − {label(b0)})",
                     **one_sample(dd.dropna().to_dict())})
    return holm_family(pd.DataFrame(rows))


def label(level: object) -> str:
    """A level as effects read: 4.0 -> '4', 'teacher' -> 'teacher'."""
    return f"{level:g}" if isinstance(level, float) else str(level)
