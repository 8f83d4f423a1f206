"""Small statistics for reporting over seeds: mean ± std, t confidence intervals, paired tests."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def t_ci(values: np.ndarray | list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean; (mean, mean) for fewer than 2 values.

    With 3-10 seeds a t interval is honest where a bootstrap is not.
    """
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, m
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return m - half, m + half


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, float]:
    """Per-seed differences a - b over the seeds both have: mean, std, n, two-sided paired-t p."""
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    if len(d) == 0:
        return {"diff_mean": math.nan, "diff_std": math.nan, "n_pairs": 0, "p_value": math.nan}
    std = float(d.std(ddof=1)) if len(d) > 1 else math.nan
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if len(d) > 1 and std > 0 else math.nan
    return {"diff_mean": float(d.mean()), "diff_std": std, "n_pairs": len(d), "p_value": p}


def pm(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    """'61.23 ± 0.71' (in percent by default)."""
    if math.isnan(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
