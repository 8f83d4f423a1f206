"""From a finished (or partial) study in MLflow to a paper's figures, tables and report.

    python -m analysis.report STUDY [--metric report/test_acc] [--out figures] [--no-log]

Writes to ``figures/<study>/``:
  report.md                  every figure linked, one sentence per comparison, the reporting
                             rule, and the cells that are missing;
  table.{md,tex,csv}         per arm: mean ± std, n, 95% CI, paired Δ to the baseline with
                             Holm-corrected paired-t and Wilcoxon p, d_z, marks;
  vs_<ref>.csv               every arm against each reference arm (one Holm family each);
  effects.{md,tex,csv}       the mass x structure main effects and interactions, with CIs;
  pairs.{md,tex,csv}         the study's declared paired comparisons;
  decomposition, interaction, temperature, learning_curves, similarity, calibration,
  agreement (.png and .pdf)  whichever the study's runs support.
Then logs the folder as artifacts of the study's newest parent run, so the MLflow UI shows it.
The figures themselves are drawn by ``analysis.plots``; the statistics by ``analysis.decomposition``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import pandas as pd

from analysis import decomposition as dec
from analysis import tables
from analysis.artifacts import calibration_figure, similarity_figure
from analysis.figures import save, study_or_exit
from analysis import plots
from analysis.runs import StudyRuns, history, load, parent_run
from kdablate import tracking

DEFAULT_EXTRA = ["report/test_ece", "report/test_agreement"]


@dataclasses.dataclass
class Report:
    """What has been written so far: sections of report.md and the files behind them."""

    out: Path
    sections: list[str] = dataclasses.field(default_factory=list)
    files: list[Path] = dataclasses.field(default_factory=list)

    def figure(self, fig: object, stem: str, caption: str) -> None:
        self.files += save(fig, self.out, stem)
        self.sections += [f"![{stem}]({stem}.png)", "", f"*{caption}* [PDF]({stem}.pdf)", ""]

    def note(self, text: str) -> None:
        """Say in the report why a figure is not there."""
        self.sections += [f"> {text}", ""]

    def table(self, frame: pd.DataFrame, head: list[str], rows: list[list[str]], stem: str, cap: str) -> None:
        frame.to_csv(self.out / f"{stem}.csv", index=False)
        (self.out / f"{stem}.md").write_text(tables.markdown(head, rows, cap))
        (self.out / f"{stem}.tex").write_text(tables.latex(head, rows, cap, stem))
        self.files += [self.out / f"{stem}.{x}" for x in ("csv", "md", "tex")]
        self.sections += [tables.markdown(head, rows, cap), f"Also as [LaTeX]({stem}.tex) and [CSV]({stem}.csv).", ""]


def references(runs: StudyRuns) -> list[str]:
    a = runs.study.config.analysis
    return [r for r in dict.fromkeys([a.baseline, *a.reference]) if r is not None and r in runs.order]


def seed_range(runs: StudyRuns) -> str:
    """'10', or '5–10' when arms have different numbers of finished seeds."""
    n = runs.cells.groupby("arm").seed.nunique()
    return str(n.min()) if n.min() == n.max() else f"{n.min()}–{n.max()}"


def header(runs: StudyRuns, metric: str) -> list[str]:
    teacher = runs.cells.get("teacher/" + metric.split("/", 1)[-1])
    lines = [f"# Study `{runs.study.name}`", "", runs.study.config.description, "",
             f"- Metric: `{metric}`, in percent; mean ± std over seeds, 95% CIs are Student t over seeds.",
             f"- **Reporting rule:** {runs.report_rule()}; test numbers are those of that epoch.",
             f"- Runs: {len(runs.cells)} finished cells of {len(runs.study.cells)}, {seed_range(runs)} seeds per arm, "
             f"read from `{runs.uri}`; study file `{runs.study.path}`.",
             "- Comparisons are paired by seed (arms that share a seed share the init and data order): paired "
             "t-test and Wilcoxon signed-rank, Holm-corrected within each family; d_z is Cohen's d of the "
             f"paired differences. {tables.MARKS}.", ""]
    n_min = int(runs.cells.groupby("arm").seed.nunique().min())
    if n_min <= 6:  # the exact signed-rank test cannot go below 2 / 2^n, whatever the effect
        lines.insert(-1, f"- With n = {n_min} seeds the smallest attainable two-sided Wilcoxon p is "
                     f"{2 / 2 ** n_min:.3g}; read p_W as a robustness check, not a test of power.")
    if teacher is not None and teacher.notna().any():
        lines.insert(-1, f"- Teacher: {teacher.mean() * 100:.2f}% ({metric.split('/', 1)[-1]}).")
    if not runs.missing.empty:
        counts = runs.missing.groupby(["arm", "status"]).seed.apply(lambda s: ", ".join(map(str, s)))
        lines += [f"**Partial study: {len(runs.missing)} cells have no finished run**; statistics use the "
                  "seeds that exist:", ""]
        lines += [f"- {arm}: {status} (seeds {seeds})" for (arm, status), seeds in counts.items()]
        lines.append("")
    return lines


def comparisons(rep: Report, runs: StudyRuns, metric: str) -> dict[str, pd.DataFrame]:
    """The main table (against the baseline) and one sentence per arm against each reference."""
    a = runs.study.config.analysis
    extra = [m for m in DEFAULT_EXTRA + a.extra_metrics if m in runs.cells]
    summary = dec.summarize(runs.cells, runs.order, metric, extra)
    refs = references(runs)
    vs = {ref: dec.against(runs.cells, runs.order, ref, metric) for ref in refs}
    base = a.baseline if a.baseline in vs else None
    head, rows = tables.main_rows(summary, vs.get(base), extra)
    rep.sections += ["## Arms", ""]
    rep.table(summary, head, rows, "table", tables.caption(metric, runs.report_rule(), base, len(summary) - 1))
    for ref, table in vs.items():
        table.to_csv(rep.out / f"vs_{ref}.csv", index=False)
        rep.sections += [f"### Against `{ref}`", ""] + [f"- {tables.sentence(d)}" for d in table.to_dict("records")]
        rep.sections.append("")
    return {"summary": summary, **vs}


def factorial_section(rep: Report, runs: StudyRuns, metric: str) -> pd.DataFrame:
    effects = dec.factorial(runs.cells, metric) if runs.study.config.analysis.factorial else pd.DataFrame()
    if effects.empty:
        return effects
    rep.sections += ["## Factorial decomposition: mass × structure", "",
                     "A main effect is a level minus the previous one, averaged over the other factor's levels; an "
                     "interaction is the difference of those differences (does what the structure adds depend on "
                     "the mass?).", ""]
    rep.sections += [f"- {tables.sentence(d, d['effect'])}" for d in effects.to_dict("records")] + [""]
    head, rows = tables.effect_rows(effects)
    rep.table(effects, head, rows, "effects", tables.caption(metric, runs.report_rule(), None, 0)
              + f" Paired by seed; p Holm-corrected over the {len(effects)} effects. {tables.MARKS}.")
    rep.figure(plots.interaction(dec.factorial_cells(runs.cells), metric), "interaction",
               "Interaction plot: mean and 95% CI per mass × structure cell; parallel lines mean no interaction.")
    return effects


def pairs_section(rep: Report, runs: StudyRuns, metric: str) -> None:
    declared = runs.study.config.analysis.pairs
    if not declared:
        return
    pairs = dec.compare(runs.cells, [tuple(p) for p in declared], metric)
    rep.sections += ["## Declared comparisons", ""] + [f"- {tables.sentence(d)}" for d in pairs.to_dict("records")]
    rep.sections.append("")
    head, rows = tables.effect_rows(pairs)
    rep.table(pairs, head, rows, "pairs", tables.caption(metric, runs.report_rule(), None, 0)
              + f" Paired by seed; p Holm-corrected over the {len(pairs)} comparisons. {tables.MARKS}.")


def figures_section(rep: Report, runs: StudyRuns, metric: str, stats: dict[str, pd.DataFrame]) -> None:
    a = runs.study.config.analysis
    summary, base = stats["summary"], a.baseline if a.baseline in stats else None
    rep.sections += ["## Figures", ""]
    rep.figure(plots.decomposition_bars(summary, runs.cells, metric, stats.get(base), references(runs),
                                        f"{runs.study.name}: mean and 95% CI over {seed_range(runs)} seeds"),
               "decomposition", f"Per arm: mean {metric} with 95% CI, seeds as dots, reference means dashed; marks "
               f"against {base} ({tables.MARKS}). Reporting rule: {runs.report_rule()}.")
    swept = runs.cells.groupby("family").temperature.nunique()
    if (swept > 1).any():
        lines = runs.cells[runs.cells.family.isin(swept[swept > 1].index)]
        flat = {f: g[metric].mean() for f, g in runs.cells[~runs.cells.family.isin(swept[swept > 1].index)]
                .groupby("family", sort=False)}
        rep.figure(plots.temperature(lines, metric, flat), "temperature",
                   f"{metric} against the soft-target temperature T, mean and 95% CI per arm; arms without a "
                   "temperature sweep as dashed lines.")
    hist = history(runs, ["val/acc", "test/acc"])
    if not hist.empty:
        rep.figure(plots.learning_curves(hist, runs.order), "learning_curves",
                   "Validation and test accuracy against epoch: mean over seeds with a 95% CI band. The reported "
                   "epoch is chosen on validation only.")
    similarity_figure(rep, runs)
    calibration_figure(rep, runs)
    if "report/test_agreement" not in runs.cells or runs.cells["report/test_agreement"].isna().all():
        rep.note("Agreement: the study has no teacher, so there is no student–teacher agreement to draw.")
    else:
        rep.figure(plots.metric_points(runs.cells, runs.order, "report/test_agreement",
                                       "student–teacher top-1 agreement on test", line=1.0), "agreement",
                   "Fraction of test samples on which the student predicts the teacher's class: mean and 95% CI, "
                   "seeds as dots.")


OUTPUTS = ("report", "table", "effects", "pairs", "similarity", "decomposition", "interaction", "temperature",
           "learning_curves", "calibration", "agreement")


def clean(out: Path) -> None:
    """Remove this script's earlier outputs, so a figure the runs no longer support cannot linger."""
    for p in out.glob("*"):
        if p.is_file() and (p.stem in OUTPUTS or p.stem.startswith("vs_")) and p.suffix in (".md", ".tex", ".csv",
                                                                                          ".png", ".pdf"):
            p.unlink()


def build(runs: StudyRuns, out: Path, metric: str) -> Report:
    out.mkdir(parents=True, exist_ok=True)
    clean(out)
    rep = Report(out, header(runs, metric))
    stats = comparisons(rep, runs, metric)
    factorial_section(rep, runs, metric)
    pairs_section(rep, runs, metric)
    figures_section(rep, runs, metric, stats)
    (out / "report.md").write_text("\n".join(rep.sections) + "\n")
    rep.files.append(out / "report.md")
    return rep


def log_to_parent(runs: StudyRuns, out: Path) -> str | None:
    """Log the folder under 'figures/' of the newest parent run; returns its id (None if none)."""
    run_id = parent_run(runs)
    if run_id is not None:
        tracking.client().log_artifacts(run_id, str(out), "figures")
    return run_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study")
    p.add_argument("--metric", default="report/test_acc")
    p.add_argument("--out", type=Path, default=Path("figures"))
    p.add_argument("--no-log", action="store_true", help="do not log the figures to the study's parent run")
    args = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run's file is noise
    study = study_or_exit(args.study)
    if study is None:
        return 2
    runs = load(study)
    if runs.cells.empty or args.metric not in runs.cells:
        print(f"analysis: error: {study.path}: no finished runs with metric '{args.metric}' in "
              f"{runs.uri}; run 'make study STUDY={study.name}' first", file=sys.stderr)
        return 2
    rep = build(runs, args.out / study.name, args.metric)
    print((rep.out / "report.md").read_text())
    if not runs.missing.empty:
        print(f"warning: partial study, {len(runs.missing)} of {len(study.cells)} cells missing (listed in the report)")
    parent = None if args.no_log else log_to_parent(runs, rep.out)
    print(f"wrote {len(rep.files)} files to {rep.out}/" + (f"; logged to parent run {parent}" if parent else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
