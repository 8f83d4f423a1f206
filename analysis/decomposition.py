"""The decomposition figure and table of a study, read from MLflow.

    python -m analysis.decomposition STUDY [--metric report/test_acc] [--out figures]

Reads the FINISHED cell runs of the study's experiment, keeps those whose config
hash belongs to the current study file (stale cells of an edited study are left
out), and writes to ``figures/<study>/``:
  decomposition.png / .pdf  per-arm mean with a 95% t-CI over seeds, CE and KD
                            as reference lines, and the mass x structure panel;
  table.csv / table.md      mean ± std, seeds, paired difference to the baseline,
                            and the factorial contrasts (what mass and structure add).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis.stats import paired, pm, t_ci
from kdablate import tracking
from analysis.figures import pyplot, save, study_or_exit
from kdablate.study import Study

MASS, STRUCT = "params.knowledge.mass.name", "params.knowledge.structure.name"


def load_runs(study: Study, metric: str, extra: list[str] = ()) -> pd.DataFrame:
    """One row per finished cell of ``study``: arm, seed, mass, structure, T, alpha, value,
    and a column per ``extra`` metric (its last logged value)."""
    client = tracking.client()
    exp = client.get_experiment_by_name(study.name)
    if exp is None:
        return pd.DataFrame(columns=["arm", "seed", "mass", "structure", "temperature", "alpha", "value"])
    wanted = {c.config_hash(): c for c in study.cells}
    rows = []
    for run in tracking.search_cells(client, exp.experiment_id, "FINISHED"):
        cell = wanted.get(run.data.tags.get("config_hash"))
        if cell is None or metric not in run.data.metrics:
            continue
        mass, structure = component_labels(cell)
        k = cell.knowledge
        rows.append({"arm": cell.arm, "seed": cell.seed, "mass": mass, "structure": structure,
                     "temperature": k.temperature, "alpha": k.alpha, "value": run.data.metrics[metric],
                     "teacher": run.data.metrics.get("teacher/" + metric.split("/", 1)[-1], float("nan")),
                     "end_time": run.info.end_time,
                     **{m: run.data.metrics.get(m, float("nan")) for m in extra}})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # Should two finished runs share a config (a race, a manual rerun), keep the latest.
    return df.sort_values("end_time").drop_duplicates(["arm", "seed"], keep="last").drop(columns="end_time")


def component_labels(cell) -> tuple[str, str]:
    """(mass, structure) as the table shows them: the explanation source is part of the structure,
    and an objective other than the soft target stands in for both."""
    k = cell.knowledge
    if k.objective.name != "soft_target":
        return "—", k.objective.name
    s = k.structure
    detail = s.params.get("source") or (s.params["base"] if s.params.get("base", "teacher") != "teacher" else None)
    return k.mass.name, f"{s.name}:{detail}" if detail else s.name


def summarize(df: pd.DataFrame, order: list[str], baseline: str | None, extra: list[str] = ()) -> pd.DataFrame:
    """Per arm: mean, std, n, 95% CI, the paired difference to ``baseline``, and the
    mean of each ``extra`` metric."""
    base = df[df.arm == baseline].set_index("seed").value.to_dict() if baseline else {}
    rows = []
    for arm in [a for a in order if a in set(df.arm)]:
        g = df[df.arm == arm]
        lo, hi = t_ci(g.value)
        row = {"arm": arm, "mass": g.mass.iat[0], "structure": g.structure.iat[0],
               "T": g.temperature.iat[0], "alpha": g.alpha.iat[0], "mean": g.value.mean(),
               "std": g.value.std(ddof=1) if len(g) > 1 else float("nan"), "n": len(g), "ci_low": lo, "ci_high": hi}
        row.update({m: g[m].mean() for m in extra})
        if baseline and arm != baseline:
            row.update({f"vs_{baseline}_{k}": v for k, v in paired(g.set_index("seed").value.to_dict(), base).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def factorial(df: pd.DataFrame) -> pd.DataFrame:
    """Contrasts of the mass x structure factorial: each level against the previous one,
    paired by seed and averaged over the other factor's levels.

    With structure [uniform, permuted, teacher]: permuted - uniform is what the
    teacher's *values* add, teacher - permuted what its *class similarity* adds.
    Uses the largest set of arms sharing (T, alpha) that crosses >= 2 masses and
    >= 2 structures; empty when the study has no such factorial.
    """
    kd = df[df.alpha > 0]
    if kd.empty:
        return pd.DataFrame()
    groups = kd.groupby(["temperature", "alpha"])
    _, cell = max(groups, key=lambda kv: kv[1].arm.nunique())
    masses, structs = list(dict.fromkeys(cell.mass)), list(dict.fromkeys(cell.structure))
    if len(masses) < 2 or len(structs) < 2:
        return pd.DataFrame()
    table = cell.pivot_table(index="seed", columns=["mass", "structure"], values="value")
    rows = []
    for factor, levels, others in (("mass", masses, structs), ("structure", structs, masses)):
        for lo, hi in zip(levels, levels[1:]):
            pairs = [((hi, o), (lo, o)) if factor == "mass" else ((o, hi), (o, lo)) for o in others]
            cols = [(a, b) for a, b in pairs if a in table and b in table]
            diff = sum(table[a] - table[b] for a, b in cols) / len(cols)
            d = paired(diff.dropna().to_dict(), {s: 0.0 for s in diff.dropna().index})
            rows.append({"factor": factor, "contrast": f"{hi} - {lo}", **d})
    return pd.DataFrame(rows)


def pair_table(df: pd.DataFrame, pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """Paired-by-seed differences a - b for each requested (a, b)."""
    by_arm = {a: g.set_index("seed").value.to_dict() for a, g in df.groupby("arm")}
    return pd.DataFrame([{"contrast": f"{a} - {b}", **paired(by_arm.get(a, {}), by_arm.get(b, {}))} for a, b in pairs])


def contrast_lines(title: str, table: pd.DataFrame) -> list[str]:
    rows = [f"| {d['contrast']} | {pm(d['diff_mean'], d['diff_std'])} | {d['n_pairs']} | {d['p_value']:.3g} |"
            for d in table.to_dict("records")]
    return ["", title, "", "| contrast | Δ mean ± std | n | p |", "|---|---|---|---|", *rows]


def markdown(summary: pd.DataFrame, effects: pd.DataFrame, baseline: str | None, metric: str,
             extra: list[str] = (), pairs: pd.DataFrame | None = None) -> str:
    lines = [f"Metric: `{metric}` (percent), mean ± std over seeds; 95% CI is a t interval.", "",
             "| arm | mass | structure | T | α | mean ± std | n | 95% CI |" + (f" Δ vs {baseline} (paired) | p |" if baseline else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if baseline else "")]
    if extra:
        lines[2] += "".join(f" {m} |" for m in extra)
        lines[3] += "---|" * len(extra)
    for d in summary.to_dict("records"):  # not itertuples: metric names hold '/'
        line = (f"| {d['arm']} | {d['mass']} | {d['structure']} | {d['T']:g} | {d['alpha']:g} "
                f"| {pm(d['mean'], d['std'])} | {d['n']} | [{d['ci_low'] * 100:.2f}, {d['ci_high'] * 100:.2f}] |")
        if baseline and d["arm"] == baseline:
            line += " — | — |"
        elif baseline:
            line += f" {pm(d[f'vs_{baseline}_diff_mean'], d[f'vs_{baseline}_diff_std'])} | {d[f'vs_{baseline}_p_value']:.3g} |"
        line += "".join(" — |" if pd.isna(d[m]) else f" {d[m]:.3g} |" for m in extra)
        lines.append(line)
    if not effects.empty:
        effects = effects.assign(contrast=effects.factor + ": " + effects.contrast)
        lines += contrast_lines("Factorial contrasts (paired by seed, averaged over the other factor):", effects)
    if pairs is not None and not pairs.empty:
        lines += contrast_lines("Paired comparisons (by seed):", pairs)
    return "\n".join(lines) + "\n"


def seed_range(df: pd.DataFrame) -> str:
    """'10', or '5-10' when arms have different numbers of finished seeds."""
    n = df.groupby("arm").seed.nunique()
    return str(n.min()) if n.min() == n.max() else f"{n.min()}-{n.max()}"


def plot(df: pd.DataFrame, study: Study, metric: str, out: Path) -> list[Path]:
    """Two panels: every arm with 95% CIs and reference lines; the mass x structure interaction."""
    import seaborn as sns

    plt = pyplot()
    order = [a for a in study.arms() if a in set(df.arm)]
    data = df.assign(pct=df.value * 100)
    factorial = study.config.analysis.factorial
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2) if factorial else (14, 4.6),
                             gridspec_kw={"width_ratios": [1.4, 1] if factorial else [1, 0.001]})
    ax = axes[0]
    sns.stripplot(data=data, x="arm", y="pct", order=order, color="0.6", size=3, jitter=0.15, ax=ax, zorder=1)
    sns.pointplot(data=data, x="arm", y="pct", order=order, errorbar=lambda v: t_ci(v), linestyle="none",
                  color="C0", capsize=0.25, markers="D", ax=ax, zorder=3)
    refs = [r for r in study.config.analysis.reference if r in set(df.arm)]
    for i, ref in enumerate(refs):
        for a in axes:
            a.axhline(data[data.arm == ref].pct.mean(), ls="--", lw=1, color=f"C{i + 1}", label=f"{ref} (mean)")
    teacher = f", teacher {df.teacher.mean() * 100:.1f}%" if df.teacher.notna().any() else ""
    ax.set(xlabel="", ylabel=f"{metric} (%)",
           title=f"{study.name}: mean and 95% CI over {seed_range(df)} seeds{teacher}")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
    ax.legend(loc="lower right", fontsize=8)
    kd = data[(data.alpha > 0) & (data.mass != "none")]
    if study.config.analysis.factorial and kd.mass.nunique() >= 2 and kd.structure.nunique() >= 2:
        sns.pointplot(data=kd, x="structure", y="pct", hue="mass", order=list(dict.fromkeys(kd.structure)),
                      errorbar=lambda v: t_ci(v), dodge=0.3, capsize=0.15, ax=axes[1])
        axes[1].set(ylabel=f"{metric} (%)", title="non-ground-truth mass x class-similarity structure")
    else:
        axes[1].set_visible(False)
    fig.tight_layout()
    return save(fig, out, "decomposition")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study")
    p.add_argument("--metric", default="report/test_acc")
    p.add_argument("--out", type=Path, default=Path("figures"))
    args = p.parse_args(argv)
    study = study_or_exit(args.study)
    if study is None:
        return 2
    extra = study.config.analysis.extra_metrics
    df = load_runs(study, args.metric, extra)
    if df.empty:
        print(f"analysis: error: no finished runs of study '{study.name}' in {tracking.tracking_uri()}; "
              f"run 'make study STUDY={study.name}' first", file=sys.stderr)
        return 2
    out = args.out / study.name
    out.mkdir(parents=True, exist_ok=True)
    baseline = study.config.analysis.baseline
    summary = summarize(df, study.arms(), baseline, extra)
    effects = factorial(df) if study.config.analysis.factorial else pd.DataFrame()
    summary.to_csv(out / "table.csv", index=False)
    effects.to_csv(out / "effects.csv", index=False)
    pairs = pair_table(df, study.config.analysis.pairs)
    if not pairs.empty:
        pairs.to_csv(out / "pairs.csv", index=False)
    md = markdown(summary, effects, baseline, args.metric, extra, pairs)
    (out / "table.md").write_text(md)
    paths = plot(df, study, args.metric, out)
    print(md)
    print(f"figures: {', '.join(str(q) for q in paths)}")
    print(f"tables:  {out / 'table.csv'}, {out / 'table.md'}, {out / 'effects.csv'}")
    print(f"MLflow:  {tracking.tracking_uri()}  (browse with 'make ui')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
