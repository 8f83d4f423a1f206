"""Figures from the runs' JSON artifacts: class-similarity heatmaps and reliability diagrams.

similarity/: K x K matrices, row y averaging the structure over training samples of
class y (``kdablate.measures.ExplanationSimilarity``): the model's own explanations, the
teacher's soft targets and, where the data has a class hierarchy, the oracle. Every arm
also has the reported student's own matrix (``similarity_student``: its non-ground-truth
probabilities at T = 1 on validation, ``kdablate.measures.StudentSimilarity``) and, with a
teacher, the teacher's read the same way (``similarity_teacher_t1``).
calibration/: per-split reliability bins of the reported model
(``kdablate.metrics.reliability``), pooled over seeds by adding them.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis import plots
from analysis.document import Report
from analysis.runs import StudyRuns, json_artifacts
from analysis.stats import pm
from kdablate.metrics import ece_from_bins, offdiagonal, spearman


def similarity_panels(runs: StudyRuns) -> tuple[list[tuple[str, np.ndarray]], pd.DataFrame]:
    """Seed-mean matrices (teacher, oracle, then each heatmap arm's explanation) and the
    Spearman correlations of their off-diagonal entries, pairwise."""
    mats: dict[str, np.ndarray] = {}
    for arm in runs.study.config.analysis.heatmaps:
        # Every arm now logs similarity/ (its student's own matrix): keep the runs that explain.
        found = [files for _, files in json_artifacts(runs, arm, "similarity") if "similarity_explanation" in files]
        if not found:
            continue
        mats[arm] = np.mean([f["similarity_explanation"] for f in found], 0)
        for other in ("teacher", "oracle"):
            got = [f[f"similarity_{other}"] for f in found if f"similarity_{other}" in f]
            if got and other not in mats:
                mats[other] = np.mean(got, 0)
    names = [n for n in ("teacher", "oracle") if n in mats] + [n for n in mats if n not in ("teacher", "oracle")]
    rho = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    for a, b in itertools.combinations(names, 2):
        # The trainer's own function, so a logged ρ and a ρ here mean the same thing (ties averaged).
        rho.loc[a, b] = rho.loc[b, a] = spearman(offdiagonal(torch.as_tensor(mats[a])),
                                                 offdiagonal(torch.as_tensor(mats[b])))
    return [(n, mats[n]) for n in names], rho


def similarity_figure(rep: Report, runs: StudyRuns) -> None:
    """The class-similarity figures: the explanation arms' (``explanation_similarity_figure``),
    then every arm's student's own (``student_similarity_figure``, ``student_similarity_table``)."""
    explanation_similarity_figure(rep, runs)
    student_similarity_figure(rep, runs)
    student_similarity_table(rep, runs)


def explanation_similarity_figure(rep: Report, runs: StudyRuns) -> None:
    """Heatmaps of the seed-mean similarity matrices, or a note saying what is missing."""
    panels, rho = similarity_panels(runs)
    if not panels:
        if runs.study.config.analysis.heatmaps:
            rep.note(f"Similarity: no 'similarity/' artifacts in the runs of {runs.study.config.analysis.heatmaps}.")
        return
    ref = "teacher" if "teacher" in rho else None
    titled = [(name if ref is None or name == ref else f"{name}\nρ vs teacher = {rho.loc[name, ref]:.2f}", m)
              for name, m in panels]
    if "oracle" not in rho:
        rep.note("Similarity: the data has no class hierarchy (class groups), so there is no oracle panel; "
                 "CIFAR-100 has one (its 20 superclasses).")
    rep.csv(rho, "similarity", index=True)  # the index names the rows
    rep.figure(plots.heatmaps(titled), "similarity",
               "Class similarity, seed-mean matrices (row y: where the non-ground-truth mass of class y goes): "
               "teacher soft targets, the oracle hierarchy where the data has one, and each arm's own explanations. "
               "Titles: Spearman correlation of the off-diagonal entries with the teacher's; all pairs in "
               "[similarity.csv](similarity.csv).")


STUDENT, STUDENT_TEACHER = "similarity_student", "similarity_teacher_t1"
# The trainer's 'report/student_similarity_*' metrics: column stem and table header.
STUDENT_METRICS = {"report/student_similarity_spearman": ("teacher", "ρ vs teacher"),
                   "report/student_similarity_oracle_spearman": ("oracle", "ρ vs oracle")}


def first_seed_similarity(runs: StudyRuns, arm: str) -> tuple[int, dict[str, Any]] | None:
    """(seed, {file stem: (K, K) nested lists}) of the lowest seed of ``arm`` whose run logged the
    student's own matrix (runs are read one at a time, so usually one is downloaded); else None."""
    g = runs.cells[runs.cells.arm == arm].sort_values("seed")
    for i in range(len(g)):
        for seed, files in json_artifacts(dataclasses.replace(runs, cells=g.iloc[i:i + 1]), arm, "similarity"):
            if STUDENT in files:
                return int(seed), files
    return None


def student_similarity_panels(runs: StudyRuns) -> list[tuple[str, np.ndarray]]:
    """(title, (K, K) matrix): the teacher's at T = 1 (from the first arm's first run that has it), then
    per arm in study order the first seed's student matrix, titled with its ρ vs that run's teacher."""
    found = {arm: got for arm in runs.order if (got := first_seed_similarity(runs, arm)) is not None}
    teacher: list[tuple[str, np.ndarray]] = []
    panels = []
    for arm, (seed, files) in found.items():
        m = np.asarray(files[STUDENT], dtype=float)
        title = f"{plots.facet_title(arm)} (seed {seed})"
        if STUDENT_TEACHER in files:
            ref = np.asarray(files[STUDENT_TEACHER], dtype=float)
            # The trainer's own function on the run's own matrices: the value logged for this seed.
            rho = spearman(offdiagonal(torch.as_tensor(m)), offdiagonal(torch.as_tensor(ref)))
            title += f"\nρ vs teacher = {rho:.2f}"
            teacher = teacher or [(f"teacher (T = 1)\nfrom {plots.facet_title(arm)}", ref)]
        panels.append((title, m))
    return teacher + panels


def student_similarity_figure(rep: Report, runs: StudyRuns) -> None:
    """Heatmaps of each arm's reported student's own class similarity beside the teacher's, or a note."""
    panels = student_similarity_panels(runs)
    if not panels:
        rep.note("Student similarity: no run has 'similarity/similarity_student.json' (runs made before kdablate "
                 "logged the student's own class similarity).")
        return
    rep.figure(plots.heatmaps(panels, per_row=4), "student_similarity",
               "Class similarity of each arm's reported student (row y: its mean softmax probabilities at T = 1 "
               "over the non-ground-truth classes, renormalised per sample, over the validation samples of class "
               "y), beside the teacher's read the same way (T = 1, same samples). One run per arm: the first seed "
               "whose run has the matrix, named in each title, not a seed mean. Titles: Spearman correlation of "
               "the off-diagonal entries with that run's teacher matrix; mean ± std over seeds in "
               f"[student_similarity_spearman.csv](student_similarity_spearman.csv). Reporting rule: "
               f"{runs.report_rule()}.")


def student_similarity_frame(runs: StudyRuns) -> pd.DataFrame:
    """Per arm (study order) with any 'report/student_similarity_*' value: per reference, the seeds
    n_<ref>, and the mean and sample std over seeds of the Spearman correlation."""
    metrics = {m: ref for m, (ref, _) in STUDENT_METRICS.items() if m in runs.cells}
    rows = []
    for arm in runs.order:
        g = runs.cells.loc[runs.cells.arm == arm]
        row: dict[str, Any] = {"arm": arm}
        for metric, ref in metrics.items():
            v = g[metric].dropna()
            row.update({f"n_{ref}": len(v), f"rho_{ref}_mean": v.mean() if len(v) else np.nan,
                        f"rho_{ref}_std": v.std(ddof=1) if len(v) > 1 else np.nan})
        if any(row.get(f"n_{ref}", 0) for ref in metrics.values()):
            rows.append(row)
    return pd.DataFrame(rows)


def rho_cell(row: dict[str, Any], ref: str) -> str:
    """'0.83 ± 0.04 (n = 5)' for one reference of one row of ``student_similarity_frame``; '—' without seeds."""
    n = int(row[f"n_{ref}"])
    return "—" if not n else f"{pm(row[f'rho_{ref}_mean'], row[f'rho_{ref}_std'], scale=1.0)} (n = {n})"


def student_similarity_table(rep: Report, runs: StudyRuns) -> None:
    """The table of ``student_similarity_frame``, or a note that no run logged the metric."""
    frame = student_similarity_frame(runs)
    if frame.empty:
        rep.note("Student similarity: no run logged 'report/student_similarity_spearman' (cells without a "
                 "teacher and without class groups have no reference to correlate with).")
        return
    refs = [(ref, head) for ref, head in STUDENT_METRICS.values() if f"n_{ref}" in frame]
    rows = [[r["arm"]] + [rho_cell(r, ref) for ref, _ in refs] for r in frame.to_dict("records")]
    rep.table(frame, ["arm"] + [head for _, head in refs], rows, "student_similarity_spearman",
              "Spearman correlation of the off-diagonal entries of the reported student's own class similarity "
              "(mean non-ground-truth probabilities per true class on validation, T = 1) with the teacher's (same "
              "samples, T = 1) and, where the data has class groups, the oracle's: mean ± std over seeds (n). "
              f"Reporting rule: {runs.report_rule()}.")


def pooled_bins(runs: StudyRuns, split: str = "test") -> tuple[dict[str, dict[str, np.ndarray]],
                                                                 dict[str, tuple[float, float]]]:
    """arm -> reliability bins summed over its seeds, and arm -> (mean, std) over seeds of the
    ECE of each seed's own bins (arms without calibration artifacts left out)."""
    pooled, ece = {}, {}
    for arm in runs.order:
        found = [files[split] for _, files in json_artifacts(runs, arm, "calibration") if split in files]
        if found:
            pooled[arm] = {k: np.sum([f[k] for f in found], 0) for k in ("count", "conf_sum", "correct_sum")}
            per_seed = np.array([ece_from_bins(f) for f in found])
            ece[arm] = (float(per_seed.mean()), float(per_seed.std(ddof=1)) if len(found) > 1 else float("nan"))
    return pooled, ece


def calibration_figure(rep: Report, runs: StudyRuns) -> None:
    """Reliability diagrams per arm, or a note that the runs hold no bins."""
    bins, ece = pooled_bins(runs)
    if not bins:
        rep.note("Calibration: these runs have no 'calibration/' reliability bins (runs made before kdablate "
                 "logged them); the ECE column of the table is from the logged `report/test_ece`.")
        return
    rep.figure(plots.reliability(bins, ece), "calibration",
               "Reliability diagrams on test (15 equal-width confidence bins, pooled over seeds; bins with under "
               "0.5% of the samples not drawn): accuracy per bin against the diagonal of perfect calibration; ECE "
               f"in percent, mean ± std over seeds. Reporting rule: {runs.report_rule()}.")
