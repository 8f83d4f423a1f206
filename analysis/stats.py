"""Statistics for reporting over seeds: t intervals, paired tests, Holm correction, effect sizes.

Seeds are the unit of replication, and arms that share a seed share the init and
the data order (see ``kdablate.trainer``), so comparisons are paired by seed: a
paired t-test (scipy ``ttest_rel``) and a Wilcoxon signed-rank test (scipy
``wilcoxon``), the effect size Cohen's d_z = mean(d) / sd(d), and a t 95% CI of
the mean difference. A family of comparisons against one reference is corrected
with Holm's step-down method (Holm, 1979), which controls the family-wise error
without Bonferroni's loss of power.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

NAN = math.nan
DECIMALS = 10  # differences are compared at this precision
# Significance marks, strictest first: the one table both ``stars`` and the captions' legend
# (``MARKS``) are made from, so a threshold cannot change in one and not the other.
MARK_LEVELS = ((0.001, "***"), (0.01, "**"), (0.05, "*"))
ALPHA = MARK_LEVELS[-1][0]  # a comparison is called significant below this (Holm-adjusted) p
MARKS = ", ".join(f"{mark} p < {level:g}" for level, mark in reversed(MARK_LEVELS)) + " (paired t, Holm-adjusted)"


def t_ci(values: np.ndarray | list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean; (NaN, NaN) for fewer than 2 values.

    With 3-10 seeds a t interval is honest where a bootstrap is not.
    """
    v = np.asarray(values, dtype=float)
    if len(v) < 2:  # one seed has no spread to make an interval from
        return NAN, NAN
    m = float(v.mean())
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return m - half, m + half


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, float]:
    """Per-seed differences a - b over the seeds both have.

    Returns diff_mean, diff_std, n_pairs, ci_low / ci_high (t 95% CI of the mean
    difference), p_value (paired t, two-sided), p_wilcoxon (two-sided, exact for
    small n without ties) and d_z (Cohen's d for paired samples). Tests need 2
    pairs and a non-zero spread; otherwise their fields are NaN.
    """
    seeds = sorted(set(a) & set(b))
    # Accuracies are k/N fractions: a shift that is the same in every seed differs only by float
    # noise (1e-17), which a t-test would call overwhelmingly significant. Round it away.
    d = np.round(np.array([a[s] - b[s] for s in seeds], dtype=float), DECIMALS)
    out = {"diff_mean": NAN, "diff_std": NAN, "n_pairs": len(d), "ci_low": NAN, "ci_high": NAN,
           "p_value": NAN, "p_wilcoxon": NAN, "d_z": NAN}
    if len(d) == 0:
        return out
    out["diff_mean"] = float(d.mean())
    out["ci_low"], out["ci_high"] = t_ci(d)
    if len(d) < 2:
        return out
    out["diff_std"] = float(d.std(ddof=1))
    if out["diff_std"] > 0:  # the paired t-test is the one-sample t-test of the differences
        out["p_value"] = float(stats.ttest_1samp(d, 0.0).pvalue)
        out["d_z"] = out["diff_mean"] / out["diff_std"]
    if np.any(d != 0):
        out["p_wilcoxon"] = float(stats.wilcoxon(d).pvalue)
    return out


def one_sample(d: dict[int, float]) -> dict[str, float]:
    """The statistics of ``paired`` for per-seed values d already being differences."""
    return paired(d, {s: 0.0 for s in d})


def holm(p: list[float]) -> list[float]:
    """Holm-adjusted p-values (NaN stays NaN and does not count towards the family)."""
    idx = [i for i, v in enumerate(p) if not math.isnan(v)]
    order = sorted(idx, key=lambda i: p[i])
    out = [NAN] * len(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        out[i] = running
    return out


def stars(p: float) -> str:
    """'***' p < 0.001, '**' p < 0.01, '*' p < 0.05, '' otherwise (or NaN)."""
    return next((mark for level, mark in MARK_LEVELS if p < level), "")  # NaN compares False: ''


def holm_family(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (statistics of ``paired``, one comparison each) as one Holm family: a copy with
    p_holm and p_wilcoxon_holm (both tests adjusted over the rows) and mark (from p_holm)."""
    out = rows.copy()
    out["p_holm"] = holm(out.p_value.tolist())
    out["p_wilcoxon_holm"] = holm(out.p_wilcoxon.tolist())
    out["mark"] = out.p_holm.map(stars)
    return out


def pm(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    """'61.23 ± 0.71' (in percent by default)."""
    if math.isnan(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def fmt_p(p: float) -> str:
    """A p-value as papers print it: '0.041', '3.2e-06', '—' for NaN."""
    if math.isnan(p):
        return "—"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"
