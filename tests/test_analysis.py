"""The analysis against a synthetic MLflow store with known numbers: tables, statistics
(checked against scipy), the factorial, every figure's file and drawn data, partial studies."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import decomposition as dec
from analysis import document, plots, report, runs as runs_mod
from analysis import stats as astats
from analysis.stats import holm, paired, t_ci
from kdablate import cli, tracking
from kdablate.config import flatten
from kdablate.study import load_study

STUDY = """
description: synthetic
base:
  data: {name: mnist1d, num_samples: 600}
  student: {name: mlp, hidden: 16, depth: 1}
  optim: {epochs: 3, batch_size: 64}
  teacher: {model: {name: cnn1d, channels: 8, depth: 2}, optim: {epochs: 2}}
  report: best_val
seeds: [0, 1, 2, 3, 4]
arms:
  - {name: ce, mass: none, alpha: 0.0}
  - name: "{mass}+{structure}"
    temperature: 4.0
    alpha: 0.9
    grid: {mass: [{name: constant, eps: 0.45}, teacher], structure: [uniform, teacher]}
  - {name: kd, mass: teacher, structure: teacher, alpha: 0.9, grid: {temperature: [2.0, 8.0]}}
  - {name: il, mass: {name: constant, eps: 0.2}, structure: {name: explanation, source: cam}, temperature: 4.0, alpha: 0.9}
analysis:
  baseline: ce
  reference: [ce, teacher+teacher]
  factorial: true
  pairs: [[teacher+teacher, teacher+uniform]]
  heatmaps: [il]
"""
# Per-arm means (fractions); a seed effect shared by all arms makes the pairing matter.
MEANS = {"ce": 0.60, "constant+uniform": 0.63, "constant+teacher": 0.66, "teacher+uniform": 0.62,
         "teacher+teacher": 0.67, "kd[temperature=2.0]": 0.64, "kd[temperature=8.0]": 0.65, "il": 0.64}
FAILED, ABSENT = ("il", 4), ("kd[temperature=8.0]", 3)
# Provenance tags as kdablate.runner.provenance writes them: most runs on one CPU machine, the
# 'il' arm on a GPU in bf16, and one older run without the tags.
CPU_RUN = {"cpu_model": "Intel(R) Xeon(R) Platinum 8481C", "cpu_capability": "AVX512", "torch_version": "2.14.1+cpu",
           "torch_cuda": "none", "threads": "1", "device": "cpu", "amp": "none", "host": "node-a",
           "python_version": "3.11.9"}
GPU_RUN = {**CPU_RUN, "cpu_model": "AMD EPYC 9B45", "torch_version": "2.14.1+cu130", "torch_cuda": "13.0",
           "device": "cuda (NVIDIA H100 80GB HBM3)", "amp": "bf16", "host": "gpu-1"}
UNTAGGED = ("ce", 0)
BINS = {"count": [0.0] * 13 + [40.0, 60.0], "conf_sum": [0.0] * 13 + [36.0, 58.0], "correct_sum": [0.0] * 13 + [30.0, 57.0]}


def value(arm: str, seed: int) -> float:
    rng = np.random.default_rng(seed * 100 + sorted(MEANS).index(arm))
    return MEANS[arm] + 0.01 * (seed - 2) + float(rng.normal(0, 0.006))


# The student's own class similarity (KD, LS and IL arms; not ce): the teacher's at T = 1 plus
# noise, so each run's Spearman correlation differs. kd[temperature=2.0] seed 0 is an older run
# without it, so that arm's panel comes from seed 1.
STUDENT_ARMS = ("constant+uniform", "kd[temperature=2.0]", "kd[temperature=8.0]", "il")
OLD_RUN = ("kd[temperature=2.0]", 0)
TEACHER_T1 = np.random.default_rng(7).dirichlet(np.ones(9), 10)
TEACHER_T1 = np.stack([np.insert(r, i, 0.0) for i, r in enumerate(TEACHER_T1)])


def student_similarity(arm: str, seed: int) -> tuple[np.ndarray, float] | None:
    """The (K, K) matrix and logged Spearman correlation of a run, or None if it logged none."""
    if arm not in STUDENT_ARMS or (arm, seed) == OLD_RUN:
        return None
    import torch

    from kdablate.metrics import offdiagonal, spearman

    noise = np.random.default_rng(seed * 10 + STUDENT_ARMS.index(arm)).uniform(0, 0.2, (10, 10))
    m = (TEACHER_T1 + noise) * (1 - np.eye(10))
    m /= m.sum(1, keepdims=True)
    return m, spearman(offdiagonal(torch.as_tensor(m)), offdiagonal(torch.as_tensor(TEACHER_T1)))


def provenance(arm: str, seed: int) -> dict[str, str]:
    return {} if (arm, seed) == UNTAGGED else GPU_RUN if arm == "il" else CPU_RUN


def log_cell(client, exp_id: str, parent: str, cell, status: str = "FINISHED") -> None:
    tags = {"kind": "cell", "arm": cell.arm, "seed": str(cell.seed), "config_hash": cell.config_hash(),
            **provenance(cell.arm, cell.seed)}
    run_id = tracking.start_run(client, exp_id, f"{cell.arm}/s{cell.seed}", tags, parent)
    tracking.log_params(client, run_id, flatten(cell.model_dump(mode="json")))
    v = value(cell.arm, cell.seed)
    for epoch in (1, 2, 3):  # val/test climb to the reported value
        tracking.log_metrics(client, run_id, {"val/acc": v - 0.1 / epoch, "test/acc": v - 0.12 / epoch}, epoch)
    tracking.log_metrics(client, run_id, {"report/test_acc": v, "report/val_acc": v + 0.01, "report/test_ece": 0.05,
                                          "report/test_agreement": v + 0.02, "teacher/test_acc": 0.98}, 3)
    client.log_text(run_id, json.dumps(BINS), "calibration/test.json")
    if cell.arm == "il":
        k = np.arange(100, dtype=float).reshape(10, 10)
        client.log_text(run_id, json.dumps((k / k.sum(1, keepdims=True)).tolist()), "similarity/similarity_explanation.json")
        client.log_text(run_id, json.dumps((k.T / k.T.sum(1, keepdims=True)).tolist()), "similarity/similarity_teacher.json")
        client.log_text(run_id, json.dumps(np.eye(10)[::-1].tolist()), "similarity/similarity_oracle.json")
    if student_similarity(cell.arm, cell.seed) is not None:
        student, rho = student_similarity(cell.arm, cell.seed)
        client.log_text(run_id, json.dumps(student.tolist()), "similarity/similarity_student.json")
        client.log_text(run_id, json.dumps(TEACHER_T1.tolist()), "similarity/similarity_teacher_t1.json")
        tracking.log_metrics(client, run_id, {"report/student_similarity_spearman": rho}, 3)
    if status != "FINISHED":
        tracking.terminate(client, run_id, status, "RuntimeError: synthetic failure")
    else:
        tracking.terminate(client, run_id, status)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The synthetic store, built once, and the report of it in figs/synth/ (module-wide: it takes seconds)."""
    tmp_path = tmp_path_factory.mktemp("analysis")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
        mp.chdir(tmp_path)
        path = tmp_path / "synth.yaml"
        path.write_text(STUDY)
        study = load_study(path)
        client = tracking.client()
        exp_id = tracking.experiment_id(client, study.name)
        parent = tracking.start_run(client, exp_id, "synth-parent", {"kind": "study"})
        for cell in study.cells:
            if (cell.arm, cell.seed) != ABSENT:
                log_cell(client, exp_id, parent, cell, "FAILED" if (cell.arm, cell.seed) == FAILED else "FINISHED")
        assert report.main([str(path), "--out", str(tmp_path / "figs")]) == 0
        yield study, tmp_path, parent, runs_mod.load(study), client.list_artifacts(parent, "figures")


def known(arm: str) -> dict[int, float]:
    return {s: value(arm, s) for s in range(5) if (arm, s) not in (FAILED, ABSENT)}


def test_params_come_back_typed(store):
    runs = store[3]
    row = runs.cells[runs.cells.arm == "kd[temperature=2.0]"].iloc[0]
    cols = runs.cells
    assert row["temperature"] == 2.0 and pd.api.types.is_float_dtype(cols["temperature"])
    assert pd.api.types.is_integer_dtype(cols["param:optim.epochs"]) and pd.api.types.is_integer_dtype(cols.seed)
    assert cols["param:optim.nesterov"].dtype == bool and row["param:optim.milestones"] == []
    assert row["param:knowledge.mass.name"] == "teacher" and row["family"] == "kd"
    assert runs_mod.cast_param("None") is None and runs_mod.cast_param("cnn1d") == "cnn1d"


def test_partial_study_lists_missing_cells(store):
    runs = store[3]
    missing = {(r.arm, r.seed): r.status for r in runs.missing.itertuples()}
    assert missing == {FAILED: "FAILED", ABSENT: "NOT STARTED"}
    assert len(runs.cells) == len(store[0].cells) - 2


def test_report_says_where_the_numbers_were_made_and_warns_when_mixed(store):
    study, tmp_path, runs = store[0], store[1], store[3]
    text = (tmp_path / "figs" / "synth" / "report.md").read_text()
    finished = [(c.arm, c.seed) for c in study.cells if (c.arm, c.seed) not in (FAILED, ABSENT)]
    for tag in runs_mod.PROVENANCE:
        counts: dict[str, int] = {}
        for arm, seed in finished:
            v = provenance(arm, seed).get(tag, "unknown")
            counts[v] = counts.get(v, 0) + 1
        listed = "; ".join(f"{v} ({n} run{'s' if n > 1 else ''})" for v, n in
                           sorted(counts.items(), key=lambda vn: (-vn[1], vn[0])))
        assert f"- `{tag}`: {listed}" in text, tag
    assert "- `cpu_model`: Intel(R) Xeon(R) Platinum 8481C (33 runs); AMD EPYC 9B45 (4 runs); unknown (1 run)" in text
    section = text[text.index("## Where these numbers were made"):text.index("## Arms")]
    assert "not all made on one machine and library build" in section and "bit-identical only on one machine" in section
    assert "agree only within seed noise" in section and "`cpu_model`, `cpu_capability`" in section
    mixes = {line for line in section.splitlines() if "Warning: this table mixes" in line}
    assert len(mixes) == 2  # device and amp
    assert any("mixes devices" in m and "cuda (NVIDIA H100 80GB HBM3) for il (4 runs)" in m for m in mixes)
    assert any("mixes precisions" in m and "bf16 for il (4 runs)" in m for m in mixes)
    # Only the runs on the one CPU machine: every tag has one value, and nothing is flagged.
    same = runs.cells[(runs.cells.arm != "il") & ~((runs.cells.arm == UNTAGGED[0]) & (runs.cells.seed == UNTAGGED[1]))]
    lines = report.provenance_section(dataclasses.replace(runs, cells=same))
    assert f"- `device`: cpu ({len(same)} runs)" in lines and not any("Warning" in line for line in lines)
    assert report.mixed_provenance(same) == []

def test_table_values_match_the_runs(store):
    tmp_path = store[1]
    table = pd.read_csv(tmp_path / "figs" / "synth" / "table.csv").set_index("arm")
    for arm in MEANS:
        v = np.array(list(known(arm).values()))
        # The CSV holds what the table shows: percent with 2 decimals, i.e. 4 decimals of a fraction.
        assert table.loc[arm, "mean"] == pytest.approx(v.mean(), abs=5e-5)
        assert table.loc[arm, "std"] == pytest.approx(v.std(ddof=1), abs=5e-5)
        assert table.loc[arm, "n"] == len(v)
        assert (table.loc[arm, "ci_low"], table.loc[arm, "ci_high"]) == pytest.approx(
            stats.t.interval(0.95, len(v) - 1, v.mean(), stats.sem(v)), abs=5e-5)
    md = (tmp_path / "figs" / "synth" / "table.md").read_text()
    il = np.array(list(known("il").values())) * 100
    assert f"| il | constant | explanation:cam | 4 | 0.9 | {il.mean():.2f} ± {il.std(ddof=1):.2f} | 4 |" in md
    assert "Reporting rule: 'best_val'" in md and "never used to choose" in md


def test_statistics_match_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.65, 0.01, 8), rng.normal(0.63, 0.01, 8)
    got = paired(dict(enumerate(a)), dict(enumerate(b)))
    assert got["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-6)
    assert got["p_wilcoxon"] == pytest.approx(stats.wilcoxon(a - b).pvalue, rel=1e-6)
    assert got["d_z"] == pytest.approx((a - b).mean() / (a - b).std(ddof=1))
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(stats.t.interval(0.95, 7, (a - b).mean(), stats.sem(a - b)))
    # Holm by its definition: sorted p times (m - rank), made monotone, capped at 1.
    p = [0.01, 0.04, 0.03, 0.2, math.nan]
    assert holm(p)[:4] == pytest.approx([0.04, 0.09, 0.09, 0.2]) and math.isnan(holm(p)[4])
    assert all(math.isnan(v) for v in t_ci([1.0]))
    # A shift that is the same in every seed is float noise apart, not a 1e-59 p-value.
    base = np.round(rng.uniform(0.5, 0.7, 5), 4)
    same = paired(dict(enumerate(np.round(base + 0.0123, 4))), dict(enumerate(base)))
    assert same["diff_std"] == 0 and math.isnan(same["p_value"]) and math.isnan(same["d_z"])


def test_comparisons_and_factorial_against_hand_computation(store):
    runs = store[3]
    vs = dec.against(runs.cells, runs.order, "ce", "report/test_acc").set_index("a")
    ce = known("ce")
    raw = {}
    for arm in MEANS:
        if arm == "ce":
            continue
        x = known(arm)
        seeds = sorted(set(x) & set(ce))
        raw[arm] = stats.ttest_rel([x[s] for s in seeds], [ce[s] for s in seeds]).pvalue
        assert vs.loc[arm, "n_pairs"] == len(seeds)
        assert vs.loc[arm, "p_value"] == pytest.approx(raw[arm], rel=1e-6)
    assert list(vs.loc[list(raw), "p_holm"]) == pytest.approx(holm(list(raw.values())), rel=1e-6)
    eff = dec.factorial(runs.cells, "report/test_acc").set_index("effect")
    tt, tu, ct, cu = (known(a) for a in ("teacher+teacher", "teacher+uniform", "constant+teacher", "constant+uniform"))
    mass = np.mean([((tt[s] - ct[s]) + (tu[s] - cu[s])) / 2 for s in range(5)])
    inter = [(tt[s] - tu[s]) - (ct[s] - cu[s]) for s in range(5)]
    assert eff.loc["mass: teacher − constant", "diff_mean"] == pytest.approx(mass)
    row = eff.loc["(teacher − constant) × (teacher − uniform)"]
    assert row["diff_mean"] == pytest.approx(np.mean(inter))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(stats.t.interval(0.95, 4, np.mean(inter), stats.sem(inter)))


FIGURES = ("decomposition", "interaction", "temperature", "learning_curves", "similarity", "student_similarity",
           "calibration", "agreement")


def test_every_figure_is_written_linked_and_logged(store):
    tmp_path = store[1]
    out = tmp_path / "figs" / "synth"
    text = (out / "report.md").read_text()
    for stem in FIGURES:
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000, stem
        assert f"({stem}.png)" in text and f"({stem}.pdf)" in text
    for stem in ("table", "effects", "pairs"):
        tex = (out / f"{stem}.tex").read_text()
        assert r"\toprule" in tex and r"\bottomrule" in tex and "Reporting rule" in tex
    rho = pd.read_csv(out / "similarity.csv", index_col=0)
    assert list(rho.index) == ["teacher", "oracle", "il"] and np.allclose(np.diag(rho), 1)
    assert "il: FAILED (seeds 4)" in text and "kd[temperature=8.0]: NOT STARTED (seeds 3)" in text
    assert "teacher+teacher beats ce by +" in text and "n = 5)" in text
    logged = {f.path for f in store[4]}
    assert {"figures/report.md", "figures/decomposition.pdf", "figures/table.tex"} <= logged


def test_student_similarity_figure_and_table_match_the_runs(store):
    """Every arm with the student's own matrix gets a panel (its first seed that has one) after the
    teacher's; the table is the mean ± std over seeds of the logged Spearman correlation."""
    from analysis import artifacts

    out, runs = store[1] / "figs" / "synth", store[3]
    panels = artifacts.student_similarity_panels(runs)
    assert panels[0][0].startswith("teacher (T = 1)")
    assert [t.split("\nρ")[0] for t, _ in panels[1:]] == ["constant+uniform (seed 0)", "kd\n[T=2.0] (seed 1)",
                                                          "kd\n[T=8.0] (seed 0)", "il (seed 0)"]
    assert np.allclose(panels[0][1], TEACHER_T1) and np.allclose(panels[2][1], student_similarity(OLD_RUN[0], 1)[0])
    assert f"ρ vs teacher = {student_similarity('il', 0)[1]:.2f}" in panels[-1][0]
    table = pd.read_csv(out / "student_similarity_spearman.csv")
    assert list(table.arm) == [a for a in runs.order if a in STUDENT_ARMS]
    for row in table.itertuples():
        rho = [student_similarity(row.arm, s)[1] for s in known(row.arm) if student_similarity(row.arm, s)]
        assert row.n_teacher == len(rho) and row.rho_teacher_mean == pytest.approx(np.mean(rho), abs=0.005)
        assert row.rho_teacher_std == pytest.approx(np.std(rho, ddof=1), abs=0.005)  # 2 decimals, as shown
    text = (out / "report.md").read_text()
    assert "first seed" in text and "(student_similarity_spearman.csv)" in text
    assert r"\toprule" in (out / "student_similarity_spearman.tex").read_text()


def test_student_similarity_is_skipped_with_a_note_when_no_run_has_it(store, tmp_path, monkeypatch):
    from analysis import artifacts
    from analysis.document import Report

    runs = store[3]
    monkeypatch.setattr(artifacts, "STUDENT", "similarity_nobody_logged")
    bare = dataclasses.replace(runs, cells=runs.cells.drop(columns="report/student_similarity_spearman"))
    rep = Report(tmp_path, "synth", "report/test_acc", "rule")
    artifacts.student_similarity_figure(rep, bare)
    artifacts.student_similarity_table(rep, bare)
    path = rep.finish()
    assert rep.files == (path,)  # no figure, no table: two notes
    notes = [line for line in path.read_text().splitlines() if line]
    assert [n[:30] for n in notes] == ["> Student similarity: no run h", "> Student similarity: no run l"]


def test_drawn_data_matches_the_runs(store):
    runs = store[3]
    metric = "report/test_acc"
    summary = dec.summarize(runs.cells, runs.order, metric)
    vs = dec.against(runs.cells, runs.order, "ce", metric)
    fig = plots.decomposition(summary, runs.cells, metric, vs, ["ce"], "t")
    means = fig.axes[0].containers[0].lines[0].get_ydata()  # the errorbar's data points
    assert list(means) == pytest.approx([100 * np.mean(list(known(a).values())) for a in runs.order])
    ce = known("ce")
    diffs = [100 * np.mean([x - ce[s] for s, x in known(a).items() if s in ce]) for a in runs.order]
    assert [p.get_height() for p in fig.axes[1].patches] == pytest.approx([0.0] + diffs[1:])
    grid, left_out = dec.factorial_cells(runs.cells)
    assert left_out == ["il"]  # constant mass with a third structure, not crossed with teacher mass
    lines = plots.interaction(grid, metric).axes[0].lines
    drawn = {tuple(np.round(np.asarray(line.get_ydata(), float), 9)) for line in lines if len(line.get_ydata()) == 2}
    for mass in ("constant", "teacher"):
        ys = tuple(np.round([100 * np.mean(list(known(f"{mass}+{s}").values())) for s in ("uniform", "teacher")], 9))
        assert ys in drawn
    kd = runs.cells[runs.cells.family == "kd"]
    temp = plots.temperature(kd, metric, {}).axes[0].lines[0]
    assert list(temp.get_xdata()) == [2.0, 8.0]
    assert list(temp.get_ydata()) == pytest.approx([100 * np.mean(list(known(f"kd[temperature={t}]").values()))
                                                    for t in ("2.0", "8.0")])


def test_latex_escapes_and_sentences():
    from analysis import tables

    assert tables.tex("il_cam & 50% ± 1 — Δ < [x]") == r"il\_cam \& 50\% $\pm$ 1 --- $\Delta$ $<$ {[}x{]}"
    d = {"a": "kd", "b": "ce", "n_pairs": 5, "diff_mean": 0.048, "diff_std": 0.015, "ci_low": 0.03, "ci_high": 0.066,
         "p_value": 0.001, "p_holm": 0.004, "p_wilcoxon": 0.0625, "d_z": 3.2}
    assert tables.sentence(d).startswith("kd beats ce by +4.80 ± 1.50 points (95% CI [+3.00, +6.60]; paired t, p = 0.001")
    assert tables.sentence({**d, "diff_mean": -0.048}).startswith("kd trails ce by -4.80 ± 1.50 points")
    assert "in every one of 5 seeds" in tables.sentence({**d, "diff_std": 0.0})
    assert "not significant" in tables.sentence({**d, "p_holm": 0.2})
    assert "no test" in tables.sentence({**d, "n_pairs": 1})


def test_trainer_logs_oracle_similarity_and_reliability_bins():
    """The trainer's side of the figures: the oracle matrix where the data has class groups,
    and reliability bins that add up to the split and reproduce the logged ECE."""
    import torch

    from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
    from kdablate.data import DataBundle
    from kdablate.metrics import ece_from_bins
    from kdablate import measures
    from kdablate.components.context import Observation
    from kdablate.trainer import fit

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 40, generator=g), torch.randint(0, 6, (96,), generator=g)
    data = DataBundle(x[:64], y[:64], x[64:80], y[64:80], x[80:], y[80:], 6, class_groups=torch.tensor([0, 0, 0, 1, 1, 2]))

    measured = measures.for_cell(data, None, 4.0)  # an explanation's observation of a step's rows
    measured.observe(Observation("explanation", torch.softmax(torch.randn(6, 6, generator=g), 1), torch.arange(6), 0.0))
    metrics, artifacts = measured.epoch()
    oracle = artifacts["similarity_oracle"]
    assert oracle[0].tolist() == pytest.approx([0, 0.5, 0.5, 0, 0, 0]) and oracle[5].tolist() == pytest.approx([0.2] * 5 + [0])
    assert -1 <= metrics["train/similarity_oracle_spearman"] <= 1
    result = fit(ModelSpec(name="mlp", params={"hidden": 8}), data, OptimConfig(epochs=2, batch_size=16),
                 KnowledgeConfig(), seed=0)
    for split, n in (("val", 16), ("test", 16)):
        bins = result.calibration[split]
        assert sum(bins["count"]) == n and len(bins["count"]) == 15
        assert ece_from_bins(bins) == pytest.approx(result.metrics[f"report/{split}_ece"])
        assert sum(bins["correct_sum"]) / n == pytest.approx(result.metrics[f"report/{split}_acc"])


def test_factorial_takes_one_arm_per_cell_in_study_order():
    """A second arm on a taken cell (e.g. a schedule variant) must not be averaged into it."""
    rows = [{"arm": arm, "seed": s, "mass": m, "structure": st, "temperature": 4.0, "alpha": 0.9, "v": v}
            for s in range(4)
            for arm, m, st, v in (("c+u", "constant", "uniform", 0.6), ("c+t", "constant", "teacher", 0.6),
                                  ("t+u", "teacher", "uniform", 0.6), ("t+t", "teacher", "teacher", 0.6),
                                  ("t+t_every4", "teacher", "teacher", 0.3))]
    cells = pd.DataFrame(rows)
    grid, left_out = dec.factorial_cells(cells)
    assert set(grid.arm) == {"c+u", "c+t", "t+u", "t+t"} and left_out == ["t+t_every4"]
    eff = dec.factorial(cells, "v").set_index("effect")
    assert list(eff.index[:2]) == ["mass: teacher − constant", "structure: teacher − uniform"]
    assert eff.diff_mean.abs().max() < 1e-12


def test_report_without_baseline_and_on_last_epoch(store, tmp_path):
    """No declared baseline: no Δ column, no bottom panel, and the captions say so; a metric
    that is not a 'report/' one is captioned as a last-step value, not with the reporting rule."""
    path = tmp_path / "synth_nobase.yaml"
    path.write_text(STUDY.replace("description: synthetic", "name: synth\ndescription: synthetic")
                    .replace("  baseline: ce\n", "").replace("reference: [ce, teacher+teacher]", "reference: []"))
    runs = runs_mod.load(load_study(path))
    rep = report.build(runs, tmp_path / "out", "test/acc")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "No `analysis.baseline`" in text and "Bottom: paired difference" not in text
    assert "Δ [95% CI]" not in (tmp_path / "out" / "table.md").read_text()
    assert "last logged step" in (tmp_path / "out" / "table.tex").read_text()
    assert (tmp_path / "out" / "decomposition.pdf") in rep.files


TEXT_OUTPUTS = ("report.md", "table.csv", "table.md", "table.tex", "effects.csv", "effects.md", "effects.tex",
                "pairs.csv", "pairs.md", "pairs.tex", "similarity.csv", "vs_ce.csv", "vs_teacher+teacher.csv",
                "student_similarity_spearman.csv", "student_similarity_spearman.md", "student_similarity_spearman.tex")


def test_kdablate_report_from_another_folder_writes_what_analysis_report_writes(store, tmp_path, monkeypatch,
                                                                                capsys):
    """`kdablate report` (what `make figures` runs) from a folder without studies/ or a store:
    the study given as a path, the store by MLFLOW_TRACKING_URI, the same files as the
    fixture's `python -m analysis.report`, byte for byte."""
    study, store_path = store[0], store[1]
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", str(study.path), "--out", "out", "--no-log"]) == 0
    assert "wrote 33 files to out/synth/" in capsys.readouterr().out
    ours, theirs = tmp_path / "out" / "synth", store_path / "figs" / "synth"
    for name in TEXT_OUTPUTS:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    assert {p.name for p in ours.iterdir()} == {p.name for p in theirs.iterdir()}


def test_kdablate_report_resolves_a_name_against_studies(store, tmp_path, monkeypatch):
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "synth.yaml").write_text(STUDY)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", "synth", "--no-log", "--metric", "report/val_acc"]) == 0
    assert "`report/val_acc`" in (tmp_path / "figures" / "synth" / "table.md").read_text()


@pytest.mark.parametrize("args, says", [
    (["report", "nosuch"], "studies/nosuch.yaml: no such study file; known studies: "),
    (["report", "SYNTH", "--metric", "report/nope"], "no finished runs with metric 'report/nope'"),
    (["report", "SYNTH", "--out", "afile"], "afile/synth: cannot write the report there"),
    (["report", "SYNTH", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_kdablate_report_bad_input_is_one_line_and_exit_2(store, tmp_path, monkeypatch, capsys, args, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    args = [str(store[0].path) if a == "SYNTH" else a for a in args]
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's errors exit from inside the parser
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("kdablate: error: ") and says in err, err


def test_kdablate_report_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--metric" in out and "--out" in out and "--no-log" in out and "OUT/<study>/" in out


def test_every_holm_family_goes_through_the_one_holm(store, monkeypatch):
    """decomposition keeps no Holm or marks of its own: replacing ``stats.holm`` changes every
    family's adjusted p-values (comparisons, declared pairs and factorial effects alike)."""
    runs, m = store[3], "report/test_acc"
    calls = []
    monkeypatch.setattr(astats, "holm", lambda p: calls.append(len(p)) or [0.0123] * len(p))
    vs = dec.against(runs.cells, runs.order, "ce", m)
    pairs = dec.compare(runs.cells, [("teacher+teacher", "teacher+uniform")], m)
    eff = dec.factorial(runs.cells, m)
    assert calls == [len(vs), len(vs), 1, 1, len(eff), len(eff)]
    for frame in (vs, pairs, eff):
        assert set(frame.p_holm) == set(frame.p_wilcoxon_holm) == {0.0123} and set(frame["mark"]) == {"*"}
    assert not hasattr(dec, "holm") and not hasattr(dec, "stars")


def test_holm_family_and_marks():
    rows = pd.DataFrame({"p_value": [0.01, 0.04, 0.03, 0.2, math.nan], "p_wilcoxon": [0.5, 0.1, 0.2, 0.3, 0.4]})
    got = astats.holm_family(rows)
    assert list(got.columns) == ["p_value", "p_wilcoxon", "p_holm", "p_wilcoxon_holm", "mark"]
    assert list(got.p_holm[:4]) == pytest.approx([0.04, 0.09, 0.09, 0.2]) and math.isnan(got.p_holm[4])
    assert list(got.p_wilcoxon_holm) == pytest.approx(holm(list(rows.p_wilcoxon)))
    assert list(got["mark"]) == ["*", "", "", "", ""] and "p_holm" not in rows  # a copy
    assert [astats.stars(p) for p in (0.0009, 0.001, 0.009, 0.049, 0.05, math.nan)] == ["***", "**", "**", "*", "", ""]
    from analysis import tables

    assert tables.MARKS == astats.MARKS == "* p < 0.05, ** p < 0.01, *** p < 0.001 (paired t, Holm-adjusted)"


# --- report.html, CSV precision and the copies logged to MLflow ---------------------------------


def test_report_html_says_what_report_md_says_with_its_figures_inside(store):
    """report.html is report.md's own content as one page: every figure a PNG data URI (no file
    needed beside it), every pipe table an HTML table, every heading and link kept."""
    import base64
    import re
    from html.parser import HTMLParser

    out = store[1] / "figs" / "synth"
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.found: list[tuple[str, dict]] = []
            self.text: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.found.append((tag, dict(attrs)))

        def handle_data(self, data):
            self.text.append(data)

    tags = Tags()
    tags.feed(page)
    text = "".join(tags.text)
    images = [a["src"] for t, a in tags.found if t == "img"]
    figures = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", md, flags=re.M)
    assert len(images) == len(figures) == len(FIGURES) and all(s.startswith("data:image/png;base64,") for s in images)
    for src, name in zip(images, figures):  # the very bytes of the PNG beside it
        assert base64.b64decode(src.split(",", 1)[1]) == (out / name).read_bytes()
    assert sum(t == "table" for t, _ in tags.found) == len(re.findall(r"^\|---", md, flags=re.M)) >= 4
    for heading in re.findall(r"^#{1,3} (.+)$", md, flags=re.M):
        assert heading.replace("`", "") in text
    links = {a["href"] for t, a in tags.found if t == "a"}
    assert {"table.csv", "table.tex", "decomposition.pdf", "similarity.csv"} <= links
    assert all((out / h).is_file() for h in links)  # relative, to the files beside it
    il = np.array(list(known("il").values())) * 100
    assert f"{il.mean():.2f} ± {il.std(ddof=1):.2f}" in text and "Reporting rule:" in text
    assert "<script" not in page  # the local page needs nothing to run


def test_markdown_subset_renders_to_html():
    """What Report writes: escapes, code spans, links, strong and emphasis, and the marks legend
    ('* p < 0.05, ** p < 0.01, ...'), which must stay literal; pipe tables with escaped pipes."""
    from analysis.document import body_html, inline

    assert inline(r"*a \* b* and **c** `x|<y>` [CSV](t.csv)") == (
        '<em>a * b</em> and <strong>c</strong> <code>x|&lt;y&gt;</code> <a href="t.csv">CSV</a>')
    assert inline("* p < 0.05, ** p < 0.01, *** p < 0.001") == "* p &lt; 0.05, ** p &lt; 0.01, *** p &lt; 0.001"
    assert inline("*cap with [similarity.csv](similarity.csv).* [PDF](x.pdf)", lambda h: "u/" + h) == (
        '<em>cap with <a class="artifact" href="u/similarity.csv">similarity.csv</a>.</em> '
        '<a class="artifact" href="u/x.pdf">PDF</a>')
    markdown = ("# T\n\npara one\nline two\n\n- a\n- b\n\n> **Warn** x\n\n| arm | n |\n|---|---|\n"
                "| a\\|b | 3 |\n\n![fig](f.png)\n")
    body = body_html(markdown, str, lambda s: "data:" + s)
    assert body.split("\n") == [
        "<h1>T</h1>", "<p>para one line two</p>", "<ul><li>a</li><li>b</li></ul>",
        "<blockquote><p><strong>Warn</strong> x</p></blockquote>",
        '<table><thead><tr><th class="text">arm</th><th>n</th></tr></thead>'
        '<tbody><tr><td class="text">a|b</td><td>3</td></tr></tbody></table>',
        '<figure><img src="data:f.png" alt="fig"></figure>']


def test_csvs_hold_the_digits_the_tables_print(store):
    """Every CSV the report writes holds each number as the report prints it (no float noise such
    as 0.6174000000000001), and report.md does not change: its cells read the same numbers."""
    from analysis import tables

    out = store[1] / "figs" / "synth"
    table = pd.read_csv(out / "table.csv").set_index("arm")
    md = (out / "table.md").read_text()
    for arm, row in table.iterrows():
        assert f"| {row['mean'] * 100:.2f} ± {row['std'] * 100:.2f} |" in md, arm
        assert f"[{row.ci_low * 100:.2f}, {row.ci_high * 100:.2f}]" in md
        v = np.array(list(known(arm).values()))
        assert row["mean"] == float(f"{v.mean() * 100:.2f}e-2")  # the printed digits, not more
    for path in out.glob("*.csv"):
        frame = pd.read_csv(path, index_col=0 if path.stem == "similarity" else None)
        for name in frame.columns:
            if pd.api.types.is_float_dtype(frame[name]):
                values = frame[name].dropna()
                assert (values.map(tables.column_rounding(name)) == values).all(), (path.name, name)
                assert values.map(lambda x: len(repr(x))).max() <= 9, (path.name, name)  # 0.6174, 3.2e-06
    vs = pd.read_csv(out / "vs_ce.csv")
    assert set(vs.d_z.dropna().map(lambda x: round(x, 2) == x)) == {True}
    assert all(p == float(tables.fmt_p(p)) for p in vs.p_holm.dropna())
    assert tables.as_printed(0.6174000000000001, ".2f", percent=True) == 0.6174
    assert tables.as_printed(-0.00001, ".2f", percent=True) == 0.0 and math.isnan(tables.as_printed(math.nan, ".2f"))


def test_logged_report_links_its_files_where_mlflow_serves_them(store, tmp_path):
    """MLflow resolves an artifact's relative link against the server's root and shows .html from a
    blob: URL: the logged report.md and report.html link each file beside them through
    'get-artifact?path=figures/<file>&run_uuid=<parent>', report.md names report.html for its
    figures (MLflow's Markdown view draws no relative image), and the files on disk keep plain links."""
    import re
    from pathlib import Path
    from urllib.parse import parse_qs, urlparse

    from kdablate import tracking as tr

    parent, logged = store[2], {f.path for f in store[4]}
    client = tr.client()
    md = Path(client.download_artifacts(parent, "figures/report.md", str(tmp_path))).read_text()
    page = Path(client.download_artifacts(parent, "figures/report.html", str(tmp_path))).read_text()
    assert "figures/report.html" in logged and "`report.html`" in md.split("\n## ")[0]
    targets = re.findall(r"\]\(([^)\s]+)\)", md) + re.findall(r'class="artifact" href="([^"]+)"', page)
    assert len(targets) > 20 and not re.search(r"^!\[", md, flags=re.M)
    for target in targets:
        url = urlparse(target.replace("&amp;", "&"))
        query = parse_qs(url.query)
        assert url.path == "get-artifact" and query["run_uuid"] == [parent], target
        assert query["path"][0] in logged, target  # a file that is there, under figures/
    assert f"(get-artifact?path=figures%2Ftable.csv&run_uuid={parent})" in md
    assert page.count("data:image/png;base64,") == len(FIGURES) and 'location.protocol === "blob:"' in page
    local = (store[1] / "figs" / "synth" / "report.md").read_text()
    assert "get-artifact" not in local and "(table.csv)" in local  # the folder on disk links plainly


def test_report_html_is_cleaned_and_rewritten(store, tmp_path):
    """A rerun replaces report.html with the new report's (``clean`` knows .html)."""
    out = tmp_path / "again"
    out.mkdir()
    (out / "report.html").write_text("stale")
    (out / "notes.html").write_text("mine")
    runs = store[3]
    rep = report.build(runs, out, "report/test_acc")
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert (out / "notes.html").read_text() == "mine"  # not one of the report's outputs
    assert rep.files[-2:] == (out / "report.md", out / "report.html")


def test_delta_to_published_and_the_reproduced_sentence(store, tmp_path):
    """A study's published values: a "Δ to published" column with the seeds' CI shifted alike, and
    per arm "reproduced" when the CI holds the value, else by how much it misses."""
    ce = np.array(list(known("ce").values())) * 100
    tt = np.array(list(known("teacher+teacher").values())) * 100
    lo, hi = t_ci(tt)
    path = tmp_path / "synth_published.yaml"
    path.write_text(STUDY.replace("description: synthetic", "name: synth\ndescription: synthetic")
                    + f"published: {{ce: {ce.mean():.4f}, teacher+teacher: {hi + 1.5:.4f}, teacher: 97.5}}\n")
    runs = runs_mod.load(load_study(path))
    report.build(runs, tmp_path / "out", "report/test_acc")
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"ce: {ce.mean():.2f} ± {ce.std(ddof=1):.2f} (n = {len(ce)}) against the published {ce.mean():.2f}: reproduced" in text
    assert f"not reproduced; the 95% CI [{lo:.2f}, {hi:.2f}] misses it by 1.50 points (below it)" in text
    assert "teacher: 98.00 against the published 97.50 (+0.50 points; one model, no CI)" in text
    table = (tmp_path / "out" / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| teacher+teacher |"))
    assert "Δ to published [95% CI]" in table and f"{tt.mean() - hi - 1.5:+.2f} [{lo - hi - 1.5:+.2f}, -1.50]" in row
    assert "| ls |" not in table and "—" in next(line for line in table.splitlines() if line.startswith("| il |"))


def test_published_names_arms_that_exist(tmp_path):
    from tests.test_study import assert_refused

    path = tmp_path / "p.yaml"
    path.write_text(STUDY + "published: {kd_typo: 73.3}\n")
    assert_refused(path, "published.kd_typo", "no arm named 'kd_typo'")
    path.write_text(STUDY + "published: {ce: 0.733}\n")  # a fraction, not percent: allowed, 0..100
    load_study(path)
    path.write_text(STUDY + "published: {ce: 173.3}\n")
    assert_refused(path, "published.ce", "less than or equal to 100")


def test_power_columns_and_equivalence_sentences(store, tmp_path):
    """With analysis.equivalence each comparison gets its TOST p (statsmodels' ttost_paired) and a
    verdict: different, equivalent within the margin, or inconclusive with the seeds it needs."""
    from statsmodels.stats.weightstats import ttost_paired

    path = tmp_path / "synth_equiv.yaml"
    path.write_text(STUDY.replace("description: synthetic", "name: synth\ndescription: synthetic")
                    .replace("  heatmaps: [il]\n", "  heatmaps: [il]\n  target_effect: 2\n  equivalence: {margin: 8}\n"))
    runs = runs_mod.load(load_study(path))
    report.build(runs, tmp_path / "out", "report/test_acc")
    vs = pd.read_csv(tmp_path / "out" / "vs_ce.csv").set_index("a")
    a, b = known("kd[temperature=2.0]"), known("ce")
    seeds = sorted(set(a) & set(b))
    want = ttost_paired(np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds]), -0.08, 0.08)[0]
    from analysis.tables import column_rounding

    assert vs.loc["kd[temperature=2.0]", "p_tost"] == column_rounding("p_tost")(want)  # the CSV keeps printed digits
    text = (tmp_path / "out" / "report.md").read_text()
    assert "MDE₈₀" in (tmp_path / "out" / "table.md").read_text() and "n for 2" in text
    assert "equivalent within ±8 points (TOST p = " in text  # the effects are all far inside ±8
    assert "no effect" not in text.replace("not evidence of no effect", "")


def test_an_extra_metric_no_run_logged_is_named_in_the_report(store, tmp_path):
    path = tmp_path / "synth_extra.yaml"
    path.write_text(STUDY.replace("description: synthetic", "name: synth\ndescription: synthetic")
                    .replace("  heatmaps: [il]\n", "  heatmaps: [il]\n  extra_metrics: [train/nonexistent, report/test_ece]\n"))
    report.build(runs_mod.load(load_study(path)), tmp_path / "out", "report/test_acc")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "analysis.extra_metrics: no finished run logged `train/nonexistent`" in text and "`report/test_ece`" not in text.split("analysis.extra_metrics")[1].split("\n")[0]


def test_the_parent_run_holds_the_answer(store):
    """Per arm, the mean, std and n and the paired difference to the baseline with its 95% CI, in
    percent with two decimals; a description pointing at report.html, which sits at the root."""
    study, _, parent, runs, _ = store
    client = tracking.client()
    run = client.get_run(parent)
    m = run.data.metrics
    ce = np.array(list(known("ce").values())) * 100
    assert m["answer/ce/mean"] == round(ce.mean(), 2) and m["answer/ce/n"] == len(ce)
    assert m["answer/ce/std"] == round(ce.std(ddof=1), 2)
    tt, base = known("teacher+teacher"), known("ce")
    d = np.array([tt[s] - base[s] for s in sorted(set(tt) & set(base))]) * 100
    lo, hi = t_ci(d)
    assert m["answer/teacher_teacher/vs_ce"] == round(d.mean(), 2)
    assert (m["answer/teacher_teacher/vs_ce_ci_low"], m["answer/teacher_teacher/vs_ce_ci_high"]) == (round(lo, 2),
                                                                                                     round(hi, 2))
    assert "answer/kd_temperature_2.0_/mean" in m  # '[' and '=' are not allowed in a metric name
    assert "report.html at this run's artifact root" in run.data.tags["mlflow.note.content"]
    assert run.data.params["data.name"] == "mnist1d" and run.data.params["student.hidden"] == "16"
    assert {"report.html", "report.md"} <= {f.path for f in client.list_artifacts(parent)}


def test_learning_curve_bands_stay_within_0_and_100_and_the_legend_covers_no_panel():
    import matplotlib

    matplotlib.use("Agg")
    def bands(values: tuple[float, ...]) -> list[np.ndarray]:
        rows = [{"arm": arm, "seed": s, "metric": m, "epoch": e, "value": v0}
                for arm in ("ce", "kd") for s, v0 in enumerate(values) for m in ("val/acc", "test/acc")
                for e in (1, 2)]
        fig = plots.learning_curves(pd.DataFrame(rows), ["ce", "kd"])
        assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
        return [np.concatenate([p.vertices[:, 1] for p in band.get_paths()] or [np.empty(0)])
                for ax in fig.axes for band in ax.collections]

    drawn = bands((0.02, 0.9, 0.03))  # the t band of these three reaches far below 0 and above 100
    assert len(drawn) == 4 and all(ys.size and ys.min() == 0 and ys.max() == 100 for ys in drawn)
    assert all(ys.size == 0 for ys in bands((0.02, 0.9)))  # two seeds: no band at all


def test_figures_draw_no_interval_for_arms_of_two_seeds_and_their_captions_say_so(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    cells = pd.DataFrame({"arm": ["ce"] * 3 + ["kd"] * 2, "seed": [0, 1, 2, 0, 1],
                          "report/test_acc": [0.5, 0.52, 0.51, 0.6, 0.62]})
    m, lo, hi = plots._mean_ci([cells.loc[cells.arm == a, "report/test_acc"] for a in ("ce", "kd")])
    assert np.isfinite([lo[0], hi[0]]).all() and np.isnan([lo[1], hi[1]]).all() and m[1] == pytest.approx(61)
    note = report.interval_note(type("R", (), {"cells": cells, "order": ["ce", "kd"]})())
    assert note.startswith("No interval is drawn for kd (n = 2): fewer than 3 seeds")
    rep = document.Report(tmp_path, "s", "report/test_acc", "rule", note)
    rep.figure(plots.metric_points(cells, ["ce", "kd"], "report/test_acc", "t"), "a", "Mean and 95% CI.")
    rep.figure(plots.metric_points(cells, ["ce", "kd"], "report/test_acc", "t"), "b", "Points only.")
    assert "95% CI. No interval is drawn for kd (n = 2)" in rep.markdown and "Points only.*" in rep.markdown


def test_the_interaction_and_temperature_legends_sit_outside_the_data():
    import matplotlib

    matplotlib.use("Agg")
    grid = pd.DataFrame({"mass": ["a", "a", "b", "b"] * 3, "structure": ["u", "t"] * 6,
                         "report/test_acc": np.linspace(0.5, 0.7, 12)})
    cells = pd.DataFrame({"family": ["kd"] * 6, "temperature": [1.0, 1.0, 4.0, 4.0, 8.0, 8.0],
                          "report/test_acc": np.linspace(0.5, 0.7, 6)})
    for fig in (plots.interaction(grid, "report/test_acc"), plots.temperature(cells, "report/test_acc", {"ce": 0.6})):
        fig.canvas.draw()
        ax = fig.axes[0]
        legend, frame = ax.get_legend().get_window_extent(), ax.get_window_extent()
        assert legend.x0 >= frame.x1, (legend, frame)
