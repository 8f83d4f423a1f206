"""The study figures. Each function takes frames and returns a matplotlib Figure, unsaved, so
tests can read the drawn data back (bar heights, line points) and compare it to the runs.

Accuracies are drawn in percent with Student-t 95% CIs over seeds.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from analysis.figures import COLUMN_IN, PAGE_IN, pyplot
from analysis.stats import MIN_INTERVAL_N, drawn_ci
from kdablate.factors import FACTOR_TABLE


def _rotate(ax: Any) -> None:
    for t in ax.get_xticklabels():
        t.set_rotation(35)
        t.set_ha("right")
        t.set_rotation_mode("anchor")


def _mean_ci(groups: list[pd.Series]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and 95% t-CI bounds (percent) of each group of fractions; NaN for an empty group, and
    NaN bounds (no interval drawn) for a group of fewer than MIN_INTERVAL_N."""
    out = np.full((len(groups), 3), np.nan)
    for i, v in enumerate(groups):
        v = v.dropna() * 100
        if len(v):
            out[i] = (v.mean(), *drawn_ci(v))
    return out[:, 0], out[:, 1], out[:, 2]


def decomposition(summary: pd.DataFrame, cells: pd.DataFrame, metric: str, vs: pd.DataFrame | None,
                  references: list[str], title: str) -> Any:
    """Top: per-arm mean with a 95% CI, seeds as dots, the ``references`` arms' means dashed.
    Bottom (with ``vs``, the comparisons against the baseline): bars of the paired difference
    to the baseline from zero, its 95% CI and its mark, so no bar is read off a cut axis."""
    plt = pyplot()
    rows = 2 if vs is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(PAGE_IN, 2.3 * rows + 0.6), sharex=True, squeeze=False)
    ax, x = axes[0, 0], np.arange(len(summary))
    _arm_points(ax, cells, list(summary.arm), metric)
    for j, ref in enumerate(r for r in references if r in set(summary.arm)):
        ax.axhline(float(summary.loc[summary.arm == ref, "mean"].iat[0]) * 100, ls="--", lw=0.8,
                   color=f"C{j + 1}", label=ref, zorder=1)
    if references:
        outside_legend(ax, title="reference (mean)")
    ax.set(ylabel=f"{metric} (%)", title=title)
    if vs is not None:
        _delta_bars(axes[1, 0], summary, vs)
    axes[-1, 0].set_xticks(x, summary.arm)
    _rotate(axes[-1, 0])
    fig.align_ylabels(axes[:, 0])
    return fig


def _delta_bars(ax: Any, summary: pd.DataFrame, vs: pd.DataFrame) -> None:
    """Bars of each arm's paired difference to the baseline (the arm absent from ``vs``)."""
    by = vs.set_index("a")
    d = np.array([by.diff_mean.get(a, 0.0) for a in summary.arm]) * 100
    few = np.array([by.n_pairs.get(a, 0) < MIN_INTERVAL_N for a in summary.arm])
    lo = np.where(few, np.nan, np.array([by.ci_low.get(a, np.nan) for a in summary.arm])) * 100
    hi = np.where(few, np.nan, np.array([by.ci_high.get(a, np.nan) for a in summary.arm])) * 100
    x = np.arange(len(summary))
    ax.bar(x, d, color=np.where(d >= 0, "C0", "C3"), alpha=0.8, width=0.7, zorder=2)
    ax.errorbar(x, d, yerr=[d - lo, hi - d], fmt="none", ecolor="black", capsize=2.5, lw=0.9, zorder=3)
    for i, arm in enumerate(summary.arm):
        mark = by.mark.get(arm, "")
        if mark:
            top = np.nan_to_num(hi[i] if d[i] >= 0 else lo[i], nan=d[i])
            ax.annotate(mark, (i, top), xytext=(0, 2 if d[i] >= 0 else -2), textcoords="offset points",
                        ha="center", va="bottom" if d[i] >= 0 else "top", fontsize=7)
    ax.axhline(0, color="0.2", lw=0.8)
    base = next(a for a in summary.arm if a not in by.index)
    ax.set(ylabel=f"Δ vs {base} (points)")
    ax.margins(y=0.15)


AXIS = {f.name: f.label for f in FACTOR_TABLE}


def interaction(grid: pd.DataFrame, metric: str, factors: tuple[str, str] = ("mass", "structure")) -> Any:
    """Interaction plot: the second factor's levels on x, one line per level of the first, mean ± 95% CI."""
    plt = pyplot()
    lines, x = factors
    fig, ax = plt.subplots(figsize=(COLUMN_IN, 2.6))
    xs = list(dict.fromkeys(grid[x]))
    for j, (level, g) in enumerate(grid.groupby(lines, sort=False)):
        m, lo, hi = _mean_ci([g.loc[g[x] == v, metric] for v in xs])
        ax.errorbar(np.arange(len(xs)) + (j - 0.5) * 0.08, m, yerr=[m - lo, hi - m],
                    marker="o", ms=3.5, capsize=2.5, lw=1.2, label=f"{level:g}" if isinstance(level, float) else level,
                    color=f"C{j}")
    ax.set_xticks(range(len(xs)), [f"{v:g}" if isinstance(v, float) else v for v in xs])
    ax.set(xlabel=AXIS.get(x, x), ylabel=f"{metric} (%)", title=f"{lines} × {x}")
    outside_legend(ax, title=AXIS.get(lines, lines))
    return fig


def outside_legend(ax: Any, **kw: Any) -> None:
    """The axes' legend to the right of them, where it covers no data (the figure grows to hold it)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=True, **kw)


def temperature(cells: pd.DataFrame, metric: str, references: dict[str, float]) -> Any:
    """Accuracy against temperature (log2 axis), one line per arm family, mean ± 95% CI;
    arms without a temperature sweep as horizontal lines (``references``: name -> mean)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(COLUMN_IN, 2.6))
    for j, (fam, g) in enumerate(cells.groupby("family", sort=False)):
        ts = sorted(g.temperature.unique())
        m, lo, hi = _mean_ci([g.loc[g.temperature == t, metric] for t in ts])
        ax.errorbar(ts, m, yerr=[m - lo, hi - m], marker="o", ms=3.5, capsize=2.5, lw=1.2, label=fam,
                    color=f"C{j}")
    for k, (name, mean) in enumerate(references.items()):
        ax.axhline(mean * 100, ls="--", lw=0.8, color=f"C{k + 5}", label=name)
    ax.set_xscale("log", base=2)
    temps = sorted(cells.temperature.unique())
    ax.set_xticks(temps, [f"{t:g}" for t in temps])
    ax.minorticks_off()
    ax.set(xlabel="temperature T", ylabel=f"{metric} (%)", title="accuracy against temperature")
    outside_legend(ax)
    return fig


def _facets(n: int, per_row: int = 5, height: float = 1.5) -> tuple[Any, np.ndarray]:
    plt = pyplot()
    cols = min(n, per_row)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PAGE_IN, height * rows + 0.4), squeeze=False,
                             sharex=True, sharey=True)
    for i, ax in enumerate(axes.flat[n:], n):
        ax.set_visible(False)
        axes.flat[i - cols].xaxis.set_tick_params(labelbottom=True)  # the panel above ends its column
    return fig, axes.flat


def facet_title(arm: str) -> str:
    """A panel title that fits a fifth of a page: 'kd[temperature=4.0]' -> 'kd\n[T=4.0]'."""
    return arm.replace("[temperature=", "[T=").replace("[", "\n[", 1) if len(arm) > 18 else arm


def learning_curves(hist: pd.DataFrame, order: list[str]) -> Any:
    """Per arm: val and test accuracy against epoch, mean over seeds with a 95% CI band."""
    fig, axes = _facets(len(order))
    for ax, arm in zip(axes, order):
        for j, (metric, g) in enumerate(hist[hist.arm == arm].groupby("metric", sort=True)):
            by = g.groupby("epoch").value
            m = by.mean() * 100
            # An accuracy lies in [0, 100]; no band at all where too few seeds make one.
            band = np.clip(np.array([drawn_ci(v) for _, v in by]) * 100, 0, 100)
            ax.plot(m.index, m.to_numpy(), lw=1, color=f"C{j}", label=metric)
            ax.fill_between(m.index, band[:, 0], band[:, 1], color=f"C{j}", alpha=0.25, lw=0)
        ax.set_title(facet_title(arm))
    fig.supxlabel("epoch", fontsize=8)
    fig.supylabel("accuracy (%)", fontsize=8)
    fig.tight_layout()
    # The legend below the panels, where it covers none of them.
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(names), frameon=False)
    return fig


def reliability(bins: dict[str, dict[str, np.ndarray]], ece: dict[str, tuple[float, float]],
                min_share: float = 0.005) -> Any:
    """Reliability diagrams: per arm, accuracy against confidence over seeds' pooled bins, the
    diagonal of perfect calibration, and ECE (mean ± std over seeds) in the title. Bins
    holding less than ``min_share`` of the samples are not drawn: one or two samples
    would set a bar's height by chance."""
    fig, axes = _facets(len(bins), height=1.45)
    for ax, (arm, b) in zip(axes, bins.items()):
        n = len(b["count"])
        centers = (np.arange(n) + 0.5) / n
        keep = b["count"] >= max(1.0, min_share * b["count"].sum())
        acc = np.divide(b["correct_sum"], b["count"], out=np.full(n, np.nan), where=keep)
        ax.bar(centers, acc, width=1 / n, color="C0", alpha=0.8, edgecolor="white", lw=0.3)
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.3")
        m, s = ece[arm]
        ax.set_title(f"{facet_title(arm)}\nECE {m * 100:.2f} ± {s * 100:.2f}")
        ax.set(xlim=(0, 1), ylim=(0, 1))
    fig.supxlabel("confidence", fontsize=8)
    fig.supylabel("accuracy", fontsize=8)
    fig.tight_layout()
    return fig


def _arm_points(ax: Any, cells: pd.DataFrame, order: list[str], metric: str) -> None:
    """At x = 0, 1, ...: each arm's mean ± 95% CI of ``metric`` in percent, its seeds as dots beside."""
    m, lo, hi = _mean_ci([cells.loc[cells.arm == arm, metric] for arm in order])
    ax.errorbar(np.arange(len(order)), m, yerr=[m - lo, hi - m], fmt="D", ms=3.5, capsize=2.5, lw=0.9,
                color="C0", zorder=3)
    for i, arm in enumerate(order):
        v = cells.loc[cells.arm == arm, metric].dropna() * 100
        ax.scatter(i + 0.22 + np.linspace(-0.05, 0.05, len(v)), v, s=4, color="0.45", zorder=2, linewidths=0)


def metric_points(cells: pd.DataFrame, order: list[str], metric: str, title: str,
                  line: float | None = None) -> Any:
    """Per arm: mean ± 95% CI of ``metric`` (in percent) with the seeds as dots."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(PAGE_IN, 2.4))
    _arm_points(ax, cells, order, metric)
    if line is not None:
        ax.axhline(line * 100, ls="--", lw=0.8, color="C1")
    ax.set_xticks(range(len(order)), order)
    _rotate(ax)
    ax.set(ylabel=f"{metric} (%)", title=title)
    return fig


def heatmaps(panels: list[tuple[str, np.ndarray]], per_row: int = 3) -> Any:
    """Class-similarity (K, K) matrices side by side, ``per_row`` to a row of the page width,
    each on its own colour scale."""
    import seaborn as sns

    plt = pyplot()
    cols = min(len(panels), per_row)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PAGE_IN, 6.6 / max(per_row, 3) * rows + 0.3), squeeze=False)
    # Each panel on its own scale: a teacher at T=4 is far flatter than a sharp explanation softmax,
    # and the question is which classes are similar, not how peaked the rows are.
    for ax, (title, m) in zip(axes.flat, panels):
        sns.heatmap(m, ax=ax, cmap="viridis", vmin=0, square=True, cbar=True, cbar_kws={"shrink": 0.7},
                    xticklabels=m.shape[0] <= 20, yticklabels=m.shape[0] <= 20)
        ax.set(title=title, xlabel="class c", ylabel="true class y")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig
