"""Any two-factor factorial (analysis.factorial: [temperature, structure], ...), checked by hand
on a frame with known effects."""
from __future__ import annotations

import itertools

import pandas as pd
import pytest

from analysis import decomposition as dec
from kdablate.study import StudyError, load_study


def frame() -> pd.DataFrame:
    """T in {1, 4} x structure in {uniform, teacher}, mass teacher, alpha 0.9, 4 seeds:
    acc = 0.6 + 0.02 [T=4] + 0.03 [teacher] + 0.01 [T=4 and teacher] + seed noise."""
    rows = []
    for (t, s), seed in itertools.product(itertools.product([1.0, 4.0], ["uniform", "teacher"]), range(4)):
        acc = 0.6 + 0.02 * (t == 4.0) + 0.03 * (s == "teacher") + 0.01 * (t == 4.0 and s == "teacher")
        rows.append({"arm": f"{s}@{t:g}", "seed": seed, "mass": "teacher", "structure": s, "temperature": t,
                     "alpha": 0.9, "source": "n/a", "objective": "soft_target", "acc": acc + 0.001 * seed})
    rows.append({"arm": "ce", "seed": 0, "mass": "none", "structure": "uniform", "temperature": 1.0, "alpha": 0.0,
                 "source": "n/a", "objective": "soft_target", "acc": 0.5})
    return pd.DataFrame(rows)


def test_temperature_by_structure_main_effects_and_interaction():
    effects = dec.factorial(frame(), "acc", ("temperature", "structure")).set_index("effect")
    assert effects.loc["temperature: 4 − 1", "diff_mean"] == pytest.approx(0.025)  # (0.02 + 0.03) / 2
    assert effects.loc["structure: teacher − uniform", "diff_mean"] == pytest.approx(0.035)
    assert effects.loc["(4 − 1) × (teacher − uniform)", "diff_mean"] == pytest.approx(0.01)
    grid, left_out = dec.factorial_cells(frame(), ("temperature", "structure"))
    assert set(grid.arm) == {"uniform@1", "teacher@1", "uniform@4", "teacher@4"} and left_out == []


def test_mass_by_structure_stays_the_default_and_finds_no_crossing_here():
    assert dec.factorial(frame(), "acc").empty  # one mass level: no 2 x 2


STUDY = """
base: {data: {name: mnist1d, num_samples: 500}, student: {name: mlp, hidden: 8, depth: 1},
       teacher: {model: {name: cnn1d, channels: 8, depth: 2}}}
seeds: [0]
arms:
  - {name: ce, mass: none, alpha: 0.0}
%s
analysis: {factorial: %s}
"""
GRID = """  - name: "{mass}+{structure}"
    alpha: 0.9
    grid: {mass: [{name: constant, eps: 0.4}, teacher], structure: [uniform, teacher], temperature: [1.0, 4.0]}"""


@pytest.mark.parametrize("value, arms, ok", [("true", GRID, True), ("[temperature, structure]", GRID, True),
                                             ("true", "", False), ("[temperature, structure]", "", False),
                                             ("[temperature]", GRID, False), ("[mass, mass]", GRID, False),
                                             ("[speed, mass]", GRID, False)])
def test_study_declares_the_factors(tmp_path, value, arms, ok):
    """Two different known factors, which the arms must cross (a 2 x 2 at least): else refused at load."""
    path = tmp_path / "f.yaml"
    path.write_text(STUDY % (arms, value))
    if ok:
        assert load_study(path).config.analysis.factors() in (("mass", "structure"), ("temperature", "structure"))
    else:
        with pytest.raises(StudyError, match="analysis.factorial"):
            load_study(path)


def test_crossing_alpha_takes_ce_as_its_none_level_and_frees_the_soft_targets_parts():
    """Logit knowledge {none, KD} x feature knowledge: CE (alpha 0, no mass) is the 'none' level of
    alpha, so crossing alpha keeps the rows that distil nothing and frees mass, structure and T."""
    from kdablate.factors import has_crossing, held_constant, largest_crossing

    def row(arm, alpha, mass, structure, feature):
        return {"arm": arm, "alpha": alpha, "mass": mass, "structure": structure, "temperature": 4.0 if alpha else 1.0,
                "source": "n/a", "objective": "soft_target", "feature": feature}

    rows = [row("ce", 0.0, "none", "uniform", "none"), row("at", 0.0, "none", "uniform", "at"),
            row("kd", 0.9, "teacher", "teacher", "none"), row("kd+at", 0.9, "teacher", "teacher", "at")]
    assert held_constant(("alpha", "feature")) == []
    assert has_crossing(rows, ("alpha", "feature"))
    assert {r["arm"] for r in largest_crossing(rows, "alpha", "feature")} == {"ce", "at", "kd", "kd+at"}
    assert not has_crossing(rows, ("mass", "feature"))  # without alpha, only the distilling rows cross
