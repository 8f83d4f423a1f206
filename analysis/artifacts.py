"""Figures from the runs' JSON artifacts: class-similarity heatmaps and reliability diagrams.

similarity/: K x K matrices, row y averaging the structure over training samples of
class y (``kdablate.trainer.epoch_summary``): the model's own explanations, the
teacher's soft targets and, where the data has a class hierarchy, the oracle.
calibration/: per-split reliability bins of the reported model
(``kdablate.metrics.reliability``), pooled over seeds by adding them.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import torch

from analysis import plots
from analysis.document import Report
from analysis.runs import StudyRuns, json_artifacts
from kdablate.metrics import ece_from_bins, offdiagonal, spearman


def similarity_panels(runs: StudyRuns) -> tuple[list[tuple[str, np.ndarray]], pd.DataFrame]:
    """Seed-mean matrices (teacher, oracle, then each heatmap arm's explanation) and the
    Spearman correlations of their off-diagonal entries, pairwise."""
    mats: dict[str, np.ndarray] = {}
    for arm in runs.study.config.analysis.heatmaps:
        found = [files for _, files in json_artifacts(runs, arm, "similarity")]
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
