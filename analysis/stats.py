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
from collections.abc import Callable

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


# The fewest seeds a figure draws an interval for: at n = 2 the t interval's half-width is 12.7
# standard errors, drawn it dwarfs the data and says little; the caption says so instead.
MIN_INTERVAL_N = 3



def drawn_ci(values: np.ndarray | list[float] | pd.Series, level: float = 0.95) -> tuple[float, float]:
    """``t_ci`` where a figure draws an interval: (NaN, NaN) for fewer than MIN_INTERVAL_N values
    (the tables still print n = 2's)."""
    return t_ci(values, level) if len(values) >= MIN_INTERVAL_N else (NAN, NAN)


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


# Power and equivalence, per comparison. A null result is only as strong as the test's power: the
# smallest effect the seeds at hand detect, and the seeds a target effect needs, say how strong.
POWER = 0.8


def paired_power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` to detect a mean difference ``effect``
    from ``n`` pairs whose differences have standard deviation ``sd`` (the noncentral t, as
    statsmodels' ``TTestPower``)."""
    df, nc = n - 1, abs(effect) / sd * math.sqrt(n)
    crit = stats.t.isf(alpha / 2, df)
    wrong_side = stats.nct.cdf(-crit, df, nc)  # scipy's is NaN for some large nc at df = 1, where it is ~0
    return float(stats.nct.sf(crit, df, nc) + (0.0 if math.isnan(wrong_side) else wrong_side))


def detectable_effect(sd: float, n: int, power: float = POWER, alpha: float = ALPHA) -> float:
    """The smallest mean difference (in ``sd``'s units) that ``n`` pairs detect with ``power``; NaN
    without 2 pairs or a spread."""
    if n < 2 or not sd > 0:
        return NAN
    hi = sd
    while paired_power(hi, sd, n, alpha) < power:
        hi *= 2
    from scipy.optimize import brentq

    return float(brentq(lambda e: paired_power(e, sd, n, alpha) - power, 0.0, hi, xtol=1e-14 * hi, rtol=1e-12))


def smallest_n(enough: Callable[[int], bool], cap: int = 100_000) -> float:
    """The smallest n >= 2 with ``enough(n)`` (monotone in n), by doubling then bisection; NaN past ``cap``."""
    hi = 2
    while not enough(hi):
        if hi > cap:
            return NAN
        hi *= 2
    lo = max(2, hi // 2)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid + 1, hi)
    return float(lo)


def seeds_needed(effect: float, sd: float, power: float = POWER, alpha: float = ALPHA) -> float:
    """Pairs the paired t-test needs to detect ``effect`` with ``power`` at the observed ``sd``."""
    if not (sd > 0 and effect > 0):
        return NAN
    return smallest_n(lambda n: paired_power(effect, sd, n, alpha) >= power)


def tost(mean: float, sd: float, n: int, margin: float) -> float:
    """p of two one-sided paired t-tests (TOST) that the true difference lies within ±``margin``:
    the larger of the two one-sided p-values; NaN without 2 pairs or a spread."""
    if n < 2 or not sd > 0:
        return NAN
    se, df = sd / math.sqrt(n), n - 1
    return float(max(stats.t.sf((mean + margin) / se, df), stats.t.cdf((mean - margin) / se, df)))


def seeds_for_equivalence(sd: float, margin: float, power: float = POWER, alpha: float = ALPHA) -> float:
    """Pairs TOST needs to show equivalence within ±``margin`` with ``power`` when the true
    difference is 0, at the observed ``sd`` (the usual approximation: 2 F(margin/se - t) - 1)."""
    if not sd > 0:
        return NAN

    def enough(n: int) -> bool:
        se, crit = sd / math.sqrt(n), stats.t.isf(alpha, n - 1)
        return 2 * stats.t.cdf(margin / se - crit, n - 1) - 1 >= power

    return smallest_n(enough)


def with_power(rows: pd.DataFrame, target: float, margin: float | None = None) -> pd.DataFrame:
    """``rows`` (statistics of ``paired``) with, per comparison: mde, the smallest difference its
    seeds detect with 80% power (two-sided paired t, alpha 0.05, the observed SD of the
    differences); n_target, the seeds that detect ``target``; with a ``margin`` (all in the
    metric's units), p_tost and n_equivalence (the seeds TOST needs at a true difference of 0)."""
    out = rows.copy()
    sd, n = out.diff_std.tolist(), out.n_pairs.tolist()
    out["mde"] = [detectable_effect(s, int(k)) for s, k in zip(sd, n)]
    out["target"], out["n_target"] = target, [seeds_needed(target, s) for s in sd]
    if margin is not None:
        out["p_tost"] = [tost(m, s, int(k), margin) for m, s, k in zip(out.diff_mean, sd, n)]
        out["margin"], out["n_equivalence"] = margin, [seeds_for_equivalence(s, margin) for s in sd]
    return out
