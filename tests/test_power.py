"""Power and equivalence per comparison, checked against statsmodels (a test dependency only)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired

from analysis.stats import (detectable_effect, paired_power, seeds_for_equivalence, seeds_needed, tost,
                            with_power)

GRID = [(n, sd) for n in (3, 5, 10, 40) for sd in (0.005, 0.013, 0.02)]


@pytest.mark.parametrize("n,sd", GRID)
def test_power_is_statsmodels_ttestpower(n, sd):
    for effect in (0.002, 0.01, 0.03):
        want = TTestPower().power(effect_size=effect / sd, nobs=n, alpha=0.05, alternative="two-sided")
        # scipy's noncentral t (and so statsmodels) gives NaN far in the tail, where the power is 1
        assert paired_power(effect, sd, n) == (pytest.approx(1.0, abs=1e-9) if math.isnan(want)
                                               else pytest.approx(want, abs=1e-10))


@pytest.mark.parametrize("n,sd", GRID)
def test_detectable_effect_has_80_percent_power(n, sd):
    mde = detectable_effect(sd, n)
    assert TTestPower().power(effect_size=mde / sd, nobs=n, alpha=0.05, alternative="two-sided") == \
        pytest.approx(0.8, abs=1e-6)
    solved = TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
    assert mde / sd == pytest.approx(solved, abs=1e-6)


@pytest.mark.parametrize("sd", [0.004, 0.009, 0.013, 0.02])
def test_seeds_needed_is_statsmodels_rounded_up(sd):
    for target in (0.005, 0.01):
        nobs = TTestPower().solve_power(effect_size=target / sd, alpha=0.05, power=0.8, alternative="two-sided")
        assert seeds_needed(target, sd) == max(2, math.ceil(nobs))


def test_tost_is_statsmodels_ttost_paired():
    rng = np.random.default_rng(0)
    for shift in (0.0, 0.002, 0.006):
        a = rng.normal(0.6, 0.01, 8)
        b = a - shift - rng.normal(0, 0.004, 8)
        d = a - b
        want = ttost_paired(a, b, -0.005, 0.005)[0]
        assert tost(d.mean(), d.std(ddof=1), len(d), 0.005) == pytest.approx(want, abs=1e-10)


def test_seeds_for_equivalence_is_the_first_n_with_the_power():
    sd, margin = 0.01, 0.005
    n = int(seeds_for_equivalence(sd, margin))
    from scipy import stats

    def power(k: int) -> float:
        return 2 * stats.t.cdf(margin / (sd / math.sqrt(k)) - stats.t.isf(0.05, k - 1), k - 1) - 1

    assert power(n) >= 0.8 > power(n - 1)
    assert seeds_for_equivalence(sd / 2, margin) < n  # less noise, fewer seeds


def test_no_spread_plans_nothing():
    import pandas as pd

    rows = pd.DataFrame([{"diff_mean": 0.01, "diff_std": 0.0, "n_pairs": 5},
                         {"diff_mean": 0.01, "diff_std": float("nan"), "n_pairs": 1}])
    out = with_power(rows, 0.01, 0.005)
    assert out[["mde", "n_target", "p_tost", "n_equivalence"]].isna().all().all()
