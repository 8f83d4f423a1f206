"""From a finished (or partial) study in MLflow to a paper's figures, tables and report.

    kdablate report STUDY [--metric report/test_acc] [--out figures] [--no-log]
    python -m analysis.report STUDY [...]      (the same)

Writes to ``figures/<study>/``:
  report.md                  every figure linked, one sentence per comparison, the reporting
                             rule, the cells that are missing, and where the runs were made
                             (machine, build, device, precision), with a warning when they differ;
  report.html                the same, as one self-contained page (figures embedded), which
                             MLflow's artifact viewer shows with its figures;
  table.{md,tex,csv}         per arm: mean ± std, n, 95% CI, paired Δ to the baseline with
                             Holm-corrected paired-t and Wilcoxon p, d_z, marks;
  vs_<ref>.csv               every arm against each reference arm (one Holm family each);
  effects.{md,tex,csv}       the mass x structure main effects and interactions, with CIs;
  pairs.{md,tex,csv}         the study's declared paired comparisons;
  similarity.csv             Spearman ρ between the heatmaps' similarity matrices;
  decomposition, interaction, temperature, learning_curves, similarity, calibration,
  agreement (.png and .pdf)  whichever the study's runs support.
CSVs hold the digits the tables print (``analysis.tables.rounded``). Then logs the folder under
'figures/' of the study's newest parent run, so the MLflow UI shows it; the logged report.md and
report.html link their files through the MLflow server (``Report.mlflow_copies``).
The figures themselves are drawn by ``analysis.plots``; the statistics by ``analysis.decomposition``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd

from analysis import decomposition as dec
from analysis import plots, tables
from analysis.artifacts import calibration_figure, similarity_figure
from analysis.document import Report
from analysis.figures import study_or_exit
from analysis.options import DEFAULT_METRIC, DEFAULT_OUT, add_report_options
from analysis.runs import CODE, PROVENANCE, UNKNOWN, StudyRuns, history, load, parent_run
from analysis.stats import MARKS, MIN_INTERVAL_N, with_power
from kdablate import tracking
from kdablate.config import flatten
from kdablate.factors import held_constant
from kdablate.study import Study

DEFAULT_EXTRA = ["report/test_ece", "report/test_agreement"]


class ReportError(Exception):
    """No report can be made (no finished runs with the metric, an unusable --out); ``str()``
    is the one-line message the CLI prints, with what to do."""


def metric_rule(runs: StudyRuns, metric: str) -> str:
    """How ``metric``'s value was chosen: the cells' reporting rule for 'report/*' metrics."""
    if metric.startswith("report/"):
        return runs.report_rule()
    return "the value at the run's last logged step (no checkpoint selection; not the study's reporting rule)"


def references(runs: StudyRuns) -> list[str]:
    """The baseline and reference arms that have finished runs, baseline first."""
    a = runs.study.config.analysis
    return [r for r in dict.fromkeys([a.baseline, *a.reference]) if r is not None and r in runs.order]


def baseline(runs: StudyRuns) -> str | None:
    """The declared baseline, when it has finished runs."""
    a = runs.study.config.analysis
    return a.baseline if a.baseline in references(runs) else None


def seed_range(runs: StudyRuns) -> str:
    """'10', or '5–10' when arms have different numbers of finished seeds."""
    n = runs.cells.groupby("arm").seed.nunique()
    return str(n.min()) if n.min() == n.max() else f"{n.min()}–{n.max()}"


def header(runs: StudyRuns, rep: Report) -> list[str]:
    """Title, what was measured and how, the teacher, and the cells that are missing."""
    teacher = runs.cells.get("teacher/" + rep.metric.split("/", 1)[-1])
    n_min = int(runs.cells.groupby("arm").seed.nunique().min())
    lines = [f"# Study `{runs.study.name}`", "", runs.study.config.description, "",
             f"- Metric: `{rep.metric}`, in percent; mean ± std over seeds, 95% CIs are Student t over seeds.",
             f"- **Reporting rule:** {rep.rule}.",
             f"- Runs: {len(runs.cells)} finished cells of {len(runs.study.cells)}, {seed_range(runs)} seeds per arm, "
             f"read from `{runs.uri}`; study file `{runs.study.path}`.",
             "- Comparisons are paired by seed (arms that share a seed share the init and data order): paired "
             "t-test and Wilcoxon signed-rank; p-values are Holm-adjusted within each section's family (so one "
             "comparison can appear in two families with two adjusted p-values); 95% CIs are unadjusted. In "
             f"sentences, ± is the standard deviation of the per-seed differences. {MARKS}."]
    if n_min <= 6:  # the exact signed-rank test cannot go below 2 / 2^n, whatever the effect
        lines.append(f"- With {n_min} seed{'s' if n_min > 1 else ''} in the smallest arm, the smallest attainable "
                     f"two-sided Wilcoxon p is {2 / 2 ** n_min:.3g}: read p_W as a robustness check.")
    if teacher is not None and teacher.notna().any():
        lines.append(f"- Teacher: {teacher.mean() * 100:.2f}% ({rep.metric.split('/', 1)[-1]}).")
    lines.append("")
    if not runs.missing.empty:
        counts = runs.missing.groupby(["arm", "status"], sort=False).seed.apply(lambda s: ", ".join(map(str, s)))
        lines += [f"**Partial study: {len(runs.missing)} cells have no finished run**; statistics use the "
                  "seeds that exist:", ""]
        lines += [f"- {arm}: {status} (seeds {seeds})" for (arm, status), seeds in counts.items()] + [""]
    return lines


def provenance_counts(cells: pd.DataFrame) -> dict[str, list[tuple[str, int]]]:
    """Per ``PROVENANCE`` tag: (value, number of cell runs), most common first; 'unknown' where a
    run lacks the tag."""
    out = {}
    for tag in PROVENANCE:
        values = cells.get(f"tag:{tag}", pd.Series(UNKNOWN, index=cells.index)).fillna(UNKNOWN).astype(str)
        out[tag] = sorted(values.value_counts().items(), key=lambda vn: (-vn[1], vn[0]))
    return out


def mixed_provenance(cells: pd.DataFrame) -> list[str]:
    """The provenance tags with more than one value among the cell runs."""
    return [tag for tag, counts in provenance_counts(cells).items() if len(counts) > 1]


def runs_word(n: int) -> str:
    return f"{n} run{'' if n == 1 else 's'}"


def provenance_section(runs: StudyRuns) -> list[str]:
    """'Where these numbers were made': each provenance tag's values with their run counts, and a
    warning when the runs do not share one machine and build, or mix devices or precisions."""
    counts = provenance_counts(runs.cells)
    lines = ["## Where these numbers were made", "",
             f"Provenance tags of the {runs_word(len(runs.cells))} of finished cells ('{UNKNOWN}': runs made "
             "before kdablate logged the tag):", ""]
    lines += [f"- `{tag}`: " + "; ".join(f"{tables.md_escape(v)} ({runs_word(n)})" for v, n in vals)
              for tag, vals in counts.items()]
    lines.append("")
    mixed = [tag for tag, vals in counts.items() if len(vals) > 1]
    code = [tag for tag in CODE if tag in mixed]
    if code:
        lines += [f"> **Warning: these runs were made by {max(len(counts[t]) for t in code)} versions of the code** "
                  f"(they differ in {', '.join(f'`{t}`' for t in code)}; commits above). A difference between arms "
                  "made by different code mixes the arms' effect with the code's; rerun them with one version.", ""]
        mixed = [tag for tag in mixed if tag not in (*CODE, "git_commit", "git_dirty")]
    if mixed:
        lines += [f"> **Warning: these runs were not all made on one machine and library build** (they differ in "
                  f"{', '.join(f'`{t}`' for t in mixed)}). Numbers are bit-identical only on one machine and "
                  "library build; across CPUs they agree only within seed noise, so read differences between "
                  "runs made in different places against the seed spread, not digit by digit.", ""]
    for tag, what in (("device", "device"), ("amp", "precision")):
        if tag in mixed:
            lines += [mixing_warning(runs.cells, tag, counts[tag], what), ""]
    return lines


def mixing_warning(cells: pd.DataFrame, tag: str, counts: list[tuple[str, int]], what: str) -> str:
    """The warning for runs of one table made on several devices or precisions, naming which
    arms ran where: an arm made on one compared with an arm made on another measures both."""
    values = cells[f"tag:{tag}"].fillna(UNKNOWN).astype(str)
    parts = [f"{tables.md_escape(v)} for {tables.md_escape(', '.join(dict.fromkeys(cells.arm[values == v])))} "
             f"({runs_word(n)})" for v, n in counts]
    return (f"> **Warning: this table mixes {what}s** (`{tag}`: {'; '.join(parts)}). A difference between arms "
            f"made on different {what}s mixes the arm's effect with the {what}'s; rerun them on one {what} "
            "for a clean comparison.")


def comparisons(rep: Report, runs: StudyRuns) -> dict[str, pd.DataFrame]:
    """The main table (against the baseline) and one sentence per arm against each reference."""
    a = runs.study.config.analysis
    extra = [m for m in DEFAULT_EXTRA + a.extra_metrics if m in runs.cells]
    summary = dec.summarize(runs.cells, runs.order, rep.metric, tuple(extra))
    vs = {ref: planned(dec.against(runs.cells, runs.order, ref, rep.metric), runs) for ref in references(runs)}
    base = baseline(runs)
    head, rows = tables.main_rows(summary, vs.get(base), extra, runs.study.config.published,
                                  runs.study.config.analysis.target_effect)
    rep.heading("Arms")
    absent = [m for m in a.extra_metrics if m not in runs.cells]
    if absent:
        rep.note(f"analysis.extra_metrics: no finished run logged {', '.join(f'`{m}`' for m in absent)}, so the "
                 "table leaves it out; check the name against a run's metrics (kdablate ui).")
    if base is None:
        rep.note("No `analysis.baseline` with finished runs: the table has no paired differences.")
    rep.table(summary, head, rows, "table", tables.caption(rep.metric, rep.rule, base, len(summary) - 1)
              + tables.power_caption(vs.get(base)))
    for ref, table in vs.items():
        rep.csv(table, f"vs_{safe(ref)}")
        rep.heading(f"Against `{ref}`", level=3)
        rep.bullets([tables.sentence(d) for d in table.to_dict("records")])
    published_section(rep, runs, summary)
    return {"summary": summary, **vs}


PUBLISHED_RULE = ("Published values may follow another reporting rule than this study's (mdistiller and RepDistiller "
                  "print the best test accuracy over all epochs, which selects on the test split); read a small Δ "
                  "with that in mind.")


def published_section(rep: Report, runs: StudyRuns, summary: pd.DataFrame) -> None:
    """Each arm with a declared published value: reproduced when its seeds' 95% CI contains it,
    else by how much it misses; the teacher's measured accuracy against its published one."""
    published = runs.study.config.published
    if not published:
        return
    rep.heading("Against published values", level=3)
    rows = {d["arm"]: d for d in summary.to_dict("records")}
    lines = [tables.published_sentence(rows[arm], value) if arm in rows else f"{arm}: no finished runs yet."
             for arm, value in published.items() if arm != "teacher"]
    teacher = runs.cells.get("teacher/" + rep.metric.split("/", 1)[-1])
    if "teacher" in published and teacher is not None and teacher.notna().any():
        lines.append(f"teacher: {teacher.mean() * 100:.2f} against the published {published['teacher']:.2f} "
                     f"({teacher.mean() * 100 - published['teacher']:+.2f} points; one model, no CI).")
    if rep.metric != "report/test_acc":
        lines.append(f"The published values are test accuracies; this report's metric is `{rep.metric}`.")
    rep.bullets(lines)
    rep.paragraph(PUBLISHED_RULE)


def planned(rows: pd.DataFrame, runs: StudyRuns) -> pd.DataFrame:
    """Comparisons with their power columns (and TOST, with ``analysis.equivalence``): the
    study's target effect and margin, given in points, in the metric's fraction."""
    a = runs.study.config.analysis
    if rows.empty:
        return rows
    return with_power(rows, a.target_effect / 100, None if a.equivalence is None else a.equivalence.margin / 100)


def safe(name: str) -> str:
    """An arm name usable in a file name."""
    return "".join(c if c.isalnum() or c in "+-_.=" else "_" for c in name)


SYMBOL = {"temperature": "T", "alpha": "α"}


def crossing_text(grid: pd.DataFrame, factors: tuple[str, str], left_out: list[str]) -> str:
    """'Crossing: mass [...] × structure [...] at T = 4, α = 0.9; left out of it: ...'."""
    held = held_constant(factors)
    fixed = ", ".join(f"{SYMBOL.get(f, f)} = {dec.label(grid[f].iat[0])}" for f in held)
    f1, f2 = factors
    return (f"Crossing: {f1} {[dec.label(v) for v in dict.fromkeys(grid[f1])]} × {f2} "
            f"{[dec.label(v) for v in dict.fromkeys(grid[f2])]}" + (f" at {fixed}" if fixed else "")
            + (f"; left out of it: {', '.join(left_out)}" if left_out else ""))


def factorial_section(rep: Report, runs: StudyRuns) -> None:
    """Main effects and interactions of the study's two-factor crossing (mass x structure unless
    ``analysis.factorial`` names others), its table and its plot."""
    factors = runs.study.config.analysis.factors()
    effects = planned(dec.factorial(runs.cells, rep.metric, factors), runs) if factors else pd.DataFrame()
    if effects.empty:
        if factors:
            rep.note(f"Factorial: no complete {factors[0]} × {factors[1]} crossing (≥ 2 × 2) among the finished arms.")
        return
    grid, left_out = dec.factorial_cells(runs.cells, factors)
    rep.heading(f"Factorial decomposition: {factors[0]} × {factors[1]}")
    rep.paragraph(crossing_text(grid, factors, left_out)
                  + ". A main effect is a level minus the previous one, averaged over the other factor's levels; "
                  f"an interaction is the difference of those differences (does what the {factors[1]} adds depend on "
                  f"the {factors[0]}?). Main effects and interactions form one Holm family.")
    rep.bullets([tables.sentence(d, d["effect"]) for d in effects.to_dict("records")])
    head, rows = tables.effect_rows(effects, runs.study.config.analysis.target_effect)
    rep.table(effects, head, rows, "effects", tables.effects_caption(rep.metric, rep.rule, "Factorial effects",
                                                                     len(effects)) + tables.power_caption(effects))
    rep.figure(plots.interaction(grid, rep.metric, factors), "interaction",
               f"Interaction plot: mean and 95% CI per {factors[0]} × {factors[1]} cell; parallel lines mean no "
               "interaction.")


def pairs_section(rep: Report, runs: StudyRuns) -> None:
    """The study's declared (a, b) comparisons, one Holm family."""
    declared = runs.study.config.analysis.pairs
    if not declared:
        return
    pairs = planned(dec.compare(runs.cells, [tuple(p) for p in declared], rep.metric), runs)
    rep.heading("Declared comparisons")
    rep.bullets([tables.sentence(d) for d in pairs.to_dict("records")])
    head, rows = tables.effect_rows(pairs, runs.study.config.analysis.target_effect)
    rep.table(pairs, head, rows, "pairs", tables.effects_caption(rep.metric, rep.rule, "Declared comparisons",
                                                                 len(pairs)) + tables.power_caption(pairs))


def figures_section(rep: Report, runs: StudyRuns, stats: dict[str, pd.DataFrame]) -> None:
    """Every figure the runs support; a note for each that they do not."""
    base = baseline(runs)
    rep.heading("Figures")
    marks = f" Bottom: paired difference to {base}, 95% CI, marks {MARKS}." if base else ""
    rep.figure(plots.decomposition(stats["summary"], runs.cells, rep.metric, stats.get(base), references(runs),
                                   f"{runs.study.name}: mean and 95% CI over {seed_range(runs)} seeds"),
               "decomposition", f"Top: per arm, mean {rep.metric} with 95% CI, seeds as dots, reference means "
               f"dashed.{marks} Reporting rule: {rep.rule}.")
    temperature_figure(rep, runs)
    hist = history(runs, ["val/acc", "test/acc"])
    if not hist.empty:
        rep.figure(plots.learning_curves(hist, runs.order), "learning_curves",
                   "Validation and test accuracy against epoch: mean over seeds with a 95% CI band. "
                   f"Reporting rule: {runs.report_rule()}.")
    similarity_figure(rep, runs)
    calibration_figure(rep, runs)
    if "report/test_agreement" not in runs.cells or runs.cells["report/test_agreement"].isna().all():
        rep.note("Agreement: the study has no teacher, so there is no student–teacher agreement to draw.")
        return
    rep.figure(plots.metric_points(runs.cells, runs.order, "report/test_agreement",
                                   "student–teacher top-1 agreement on test", line=1.0), "agreement",
               "Fraction of test samples on which the student predicts the teacher's class: mean and 95% CI, "
               f"seeds as dots. Reporting rule: {runs.report_rule()}.")


def temperature_figure(rep: Report, runs: StudyRuns) -> None:
    """Accuracy against T for arm families swept over the temperature."""
    swept = runs.cells.groupby("family").temperature.nunique()
    if not (swept > 1).any():
        return
    is_swept = runs.cells.family.isin(swept[swept > 1].index)
    flat = {f: g[rep.metric].mean() for f, g in runs.cells[~is_swept].groupby("family", sort=False)}
    rep.figure(plots.temperature(runs.cells[is_swept], rep.metric, flat), "temperature",
               f"{rep.metric} against the soft-target temperature T, mean and 95% CI per arm; arms without a "
               f"temperature sweep as dashed lines (their mean). Reporting rule: {rep.rule}.")


OUTPUTS = ("report", "table", "effects", "pairs", "similarity", "decomposition", "interaction", "temperature",
           "learning_curves", "calibration", "agreement", "student_similarity", "student_similarity_spearman")
ARTIFACT_DIR = "figures"  # where the report's folder goes in the parent run's artifacts


def clean(out: Path) -> None:
    """Remove this script's earlier outputs, so a figure the runs no longer support cannot linger."""
    for p in out.glob("*"):
        if p.is_file() and (p.stem in OUTPUTS or p.stem.startswith("vs_")) and p.suffix in (".md", ".html", ".tex",
                                                                                          ".csv", ".png", ".pdf"):
            p.unlink()


def interval_note(runs: StudyRuns) -> str:
    """What a figure's caption says when some arm has fewer seeds than an interval needs."""
    n = runs.cells.arm.value_counts() if not runs.cells.empty else {}
    few = [f"{arm} (n = {n[arm]})" for arm in runs.order if n[arm] < MIN_INTERVAL_N]
    return (f"No interval is drawn for {', '.join(few)}: fewer than {MIN_INTERVAL_N} seeds make a t interval too "
            "wide to read; run more seeds." if few else "")


def build(runs: StudyRuns, out: Path, metric: str) -> Report:
    """Write every table, figure, report.md and report.html of ``runs`` into ``out``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        clean(out)
    except OSError as e:  # e.g. --out names a file, or a folder this user cannot write
        raise ReportError(f"{out}: cannot write the report there ({e.strerror or e}); "
                          "give --out a writable folder") from None
    rep = Report(out, runs.study.name, metric, metric_rule(runs, metric), interval_note(runs))
    rep.lines(header(runs, rep) + provenance_section(runs))
    stats = comparisons(rep, runs)
    factorial_section(rep, runs)
    pairs_section(rep, runs)
    figures_section(rep, runs, stats)
    rep.finish()
    rep.write_html()
    return rep


def log_to_parent(runs: StudyRuns, rep: Report) -> str | None:
    """Log the report's files under 'figures/' of the newest parent run, with report.md and
    report.html linking the others where MLflow serves them; returns its id (None if none)."""
    run_id = parent_run(runs)
    if run_id is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / ARTIFACT_DIR
        shutil.copytree(rep.out, staged, ignore=lambda _, names: [n for n in names if n not in
                                                                   {p.name for p in rep.files}])
        copies = rep.mlflow_copies(run_id, ARTIFACT_DIR)
        for name, text in copies.items():
            (staged / name).write_text(text)
        client = tracking.client()
        client.log_artifacts(run_id, str(staged), ARTIFACT_DIR)
        for name, text in copies.items():  # the answer where the parent run opens: its artifact root
            client.log_text(run_id, text, name)
    answer_on_parent(client, run_id, runs, rep.metric)
    return run_id


def metric_name(arm: str) -> str:
    """An arm's name as MLflow allows in a metric name (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w.\- /]", "_", arm)


def answer_metrics(runs: StudyRuns, metric: str) -> dict[str, float]:
    """Per arm, in percent with two decimals: mean, std and n of ``metric``, and the paired difference
    to the baseline with its 95% CI ('answer/<arm>/...'), so the parent run holds the comparison."""
    out: dict[str, float] = {}
    for d in dec.summarize(runs.cells, runs.order, metric).to_dict("records"):
        name = f"answer/{metric_name(d['arm'])}"
        out.update({f"{name}/mean": d["mean"] * 100, f"{name}/std": d["std"] * 100, f"{name}/n": d["n"]})
    base = baseline(runs)
    if base is not None:
        for d in dec.against(runs.cells, runs.order, base, metric).to_dict("records"):
            name = f"answer/{metric_name(d['a'])}/vs_{metric_name(base)}"
            out.update({name: d["diff_mean"] * 100, f"{name}_ci_low": d["ci_low"] * 100,
                        f"{name}_ci_high": d["ci_high"] * 100})
    return {k: round(float(v), 2) for k, v in out.items() if v == v}  # NaN (one seed: no std) left out


def answer_on_parent(client: tracking.MlflowClient, run_id: str, runs: StudyRuns, metric: str) -> None:
    """The parent run as the answer: the per-arm metrics, a description pointing at report.html,
    and the study's resolved base as its params (those it does not hold already)."""
    tracking.log_metrics(client, run_id, answer_metrics(runs, metric), 0)
    text = (runs.study.config.description + "\n\n" if runs.study.config.description else "")
    client.set_tag(run_id, "mlflow.note.content", text + "The comparison: report.html at this run's artifact root "
                   "(report.md beside it, tables and figures under figures/); per arm, the metrics `answer/ARM/mean`, "
                   "`std`, `n` and `vs_BASELINE` with its CI, in percent.")
    held = client.get_run(run_id).data.params
    base = {k: v for k, v in flatten(runs.study.config.base).items() if k not in held}
    tracking.log_params(client, run_id, base)


def write(study: Study, metric: str = DEFAULT_METRIC, out: Path = DEFAULT_OUT, log: bool = True) -> Report:
    """The report of ``study``'s runs in the tracking store, written into ``out/<study>/`` and
    printed, with warnings for a partial or mixed study; logged to the study's parent run
    unless ``log`` is False. ReportError when there is nothing to report on or ``out`` is unusable."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run's file is noise
    added = sorted(set(tracking.sequential_seeds(tracking.client(), study.name)) - set(study.config.seeds))
    if added:  # seeds `run --until-halfwidth` added beyond the file's
        study = study.with_seeds([*study.config.seeds, *added])
        print(f"report: with the {len(added)} seeds --until-halfwidth added ({added[0]}-{added[-1]})")
    runs = load(study)
    if runs.cells.empty or metric not in runs.cells:
        raise ReportError(f"{study.path}: no finished runs with metric '{metric}' in {runs.uri}; run "
                          f"'make study STUDY={study.name}' (or 'kdablate run {study.path}') first")
    rep = build(runs, out / study.name, metric)
    print((rep.out / "report.md").read_text())
    if not runs.missing.empty:
        print(f"warning: partial study, {len(runs.missing)} of {len(study.cells)} cells missing (listed in the report)")
    if mixed := mixed_provenance(runs.cells):
        print(f"warning: the runs differ in {', '.join(mixed)}: not one machine and build (see the report)")
    parent = log_to_parent(runs, rep) if log else None
    print(f"wrote {len(rep.files)} files to {rep.out}/" + (f"; logged to parent run {parent}" if parent else ""))
    if parent is None and log:
        print(f"warning: no parent run of study '{study.name}' in {runs.uri}; the figures were not logged to MLflow")
    return rep


def main(argv: list[str] | None = None) -> int:
    """``python -m analysis.report``; 0 on success, 2 (one line on stderr) for a bad study or no runs."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_report_options(p)
    args = p.parse_args(argv)
    study = study_or_exit(args.study)
    if study is None:
        return 2
    try:
        write(study, args.metric, args.out, log=not args.no_log)
    except ReportError as e:
        print(f"analysis: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
