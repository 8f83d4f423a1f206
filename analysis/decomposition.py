"""The numbers behind the figures: per-arm summaries, comparisons against reference arms, and
the mass x structure factorial decomposition (main effects and interaction), all paired by seed.

Pure functions of the frames of ``analysis.runs``; nothing here reads MLflow or draws.
The factorial follows the paper's question (Gu, Wu & Tresp, ACCV 2020): how much
accuracy the non-ground-truth *mass* brings and how much the class-similarity
*structure* adds, and whether the two interact.
"""
from __future__ import annotations

import itertools

import pandas as pd

from analysis.stats import holm_family, one_sample, paired, t_ci


def summarize(cells: pd.DataFrame, order: list[str], metric: str, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per arm: mass, structure, T, alpha, mean, std, n, ci_low, ci_high, and the mean of each ``extra``."""
    rows = []
    for arm in order:
        g = cells[cells.arm == arm]
        v = g[metric].dropna() if metric in g else pd.Series(dtype=float)
        if v.empty:
            continue
        lo, hi = t_ci(v)
        rows.append({"arm": arm, "mass": g.mass.iat[0], "structure": g.structure.iat[0],
                     "T": g.temperature.iat[0], "alpha": g.alpha.iat[0], "mean": v.mean(),
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


def factorial_cells(cells: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The largest complete mass x structure crossing (>= 2 x 2) among soft-target arms that
    share (T, alpha), one arm per (mass, structure) cell; and the arms of that (T, alpha)
    left out of it (a second arm on a cell already taken, e.g. an explanation schedule
    variant, or a level not crossed with every mass). Empty when the study has none.

    ``cells`` must be in study order: the first arm on a cell keeps it, and the levels
    keep the order in which the study's arms introduce them.
    """
    kd = cells[(cells.alpha > 0) & ~cells.mass.isin(["none", "—"])]
    best, size, left_out = kd.iloc[:0], 0, []
    for _, group in kd.groupby(["temperature", "alpha"], sort=False):
        firsts = group.drop_duplicates(["mass", "structure"])  # the first arm on each cell
        group = group[group.arm.isin(firsts.arm)]
        masses = list(dict.fromkeys(group.mass))
        has = {m: set(group.structure[group.mass == m]) for m in masses}
        for r in range(2, len(masses) + 1):
            for subset in itertools.combinations(masses, r):
                structs = set.intersection(*(has[m] for m in subset))
                if len(structs) >= 2 and r * len(structs) > size:
                    best = group[group.mass.isin(subset) & group.structure.isin(structs)]
                    size = r * len(structs)
                    everyone = kd[(kd.temperature == best.temperature.iat[0]) & (kd.alpha == best.alpha.iat[0])]
                    left_out = [a for a in dict.fromkeys(everyone.arm) if a not in set(best.arm)]
    return best, left_out


def factorial(cells: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Main effects and interactions of the mass x structure grid, paired by seed.

    Levels keep the study's order (e.g. structure uniform, permuted, teacher), and each
    contrast is a level minus the previous one. A main effect averages the contrast
    over the other factor's levels; an interaction is the difference of differences
    (mass contrast under one structure contrast), i.e. how much what one factor adds
    depends on the other. Rows: kind, effect, statistics of ``one_sample``, Holm p over
    all rows.
    """
    grid, _ = factorial_cells(cells)
    if grid.empty:
        return pd.DataFrame()
    table = grid.pivot_table(index="seed", columns=["mass", "structure"], values=metric)
    masses, structs = list(dict.fromkeys(grid.mass)), list(dict.fromkeys(grid.structure))
    rows = []
    for factor, levels, others in (("mass", masses, structs), ("structure", structs, masses)):
        for lo, hi in zip(levels, levels[1:]):
            cell = (lambda lvl, o: (lvl, o)) if factor == "mass" else (lambda lvl, o: (o, lvl))
            diff = sum(table[cell(hi, o)] - table[cell(lo, o)] for o in others) / len(others)
            rows.append({"kind": "main", "effect": f"{factor}: {hi} − {lo}", **one_sample(diff.dropna().to_dict())})
    for (m0, m1), (s0, s1) in itertools.product(zip(masses, masses[1:]), zip(structs, structs[1:])):
        dd = (table[(m1, s1)] - table[(m1, s0)]) - (table[(m0, s1)] - table[(m0, s0)])
        rows.append({"kind": "interaction", "effect": f"({m1} − {m0}) × ({s1} − {s0})",
                     **one_sample(dd.dropna().to_dict())})
    return holm_family(pd.DataFrame(rows))
