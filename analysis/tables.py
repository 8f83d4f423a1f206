"""Tables and sentences for papers: Markdown and LaTeX (booktabs) from the frames of
``analysis.decomposition``, with mean ± std, n, significance marks and the reporting rule
in every caption.

Conventions: accuracies and other fractions print in percent ("points" for differences);
a Δ's 95% CI is the unadjusted t interval of the per-seed differences, while p-values and
marks are Holm-adjusted within their family, so a CI can exclude 0 where the adjusted
test is not significant (the sentence then says so).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd

from analysis.stats import ALPHA, MARKS, fmt_p, pm

# Extra table columns: header, and whether the metric is a fraction to print in percent.
DISPLAY = {"report/test_ece": ("ECE (%)", True), "report/test_agreement": ("agree. (%)", True),
           "time/step_ms": ("ms/step", False), "time/explain_ms": ("explain ms", False),
           "train/similarity_spearman": ("ρ(expl., teacher) per run", False)}
TEXT_COLUMNS = {"arm", "mass", "structure", "feature", "effect"}
Row = dict[str, Any]


def signed(x: float, digits: int = 2) -> str:
    """A fraction as signed points: 0.0483 -> '+4.83'; NaN -> '—'."""
    return "—" if math.isnan(x) else f"{x * 100:+.{digits}f}"


def delta(d: Row, n: int | None = None) -> str:
    """'+4.83 [+3.75, +5.91]***': the paired difference in points, its 95% CI and its mark;
    '(n = 4)' added when fewer seeds pair up than the arm has (``n``)."""
    if d["n_pairs"] == 0:
        return "—"
    ci = "" if math.isnan(d["ci_low"]) else f" [{signed(d['ci_low'])}, {signed(d['ci_high'])}]"
    paired_n = f" (n = {d['n_pairs']})" if n is not None and d["n_pairs"] != n else ""
    return f"{signed(d['diff_mean'])}{ci}{d['mark']}{paired_n}"


def caption(metric: str, rule: str, reference: str | None, family: int) -> str:
    """The per-arm table's caption: metric, units, reporting rule, and how Δ and p are made."""
    text = f"`{metric}`, mean ± std over n seeds. Reporting rule: {rule}. 95% CI: Student t over seeds."
    if reference:
        text += (f" Δ: paired (by seed) difference to {reference} in points, with its unadjusted t 95% CI; "
                 f"p_t paired t-test and p_W Wilcoxon signed-rank, both Holm-adjusted over the {family} "
                 f"comparisons with {reference}; d_z: Cohen's d of the paired differences. {MARKS}.")
    return text


def effects_caption(metric: str, rule: str, what: str, family: int) -> str:
    """Caption of an effects / pairs table."""
    return (f"{what} on `{metric}`: per-seed paired differences in points, mean with its unadjusted t 95% CI. "
            f"Reporting rule: {rule}. p_t paired t-test and p_W Wilcoxon signed-rank, Holm-adjusted over the "
            f"{family} rows of this table; d_z: Cohen's d of the differences. {MARKS}.")


def _extra(value: float, metric: str) -> str:
    if pd.isna(value):
        return "—"
    return f"{value * 100:.2f}" if DISPLAY.get(metric, ("", False))[1] else f"{value:.3g}"


def _tests(c: Row) -> list[str]:
    return [fmt_p(c["p_holm"]), fmt_p(c["p_wilcoxon_holm"]), "—" if math.isnan(c["d_z"]) else f"{c['d_z']:.2f}"]


def seeds(n: float) -> str:
    """A number of seeds: '12', or '—' when there is no spread to plan from."""
    return "—" if math.isnan(n) else f"{n:.0f}"


def power_head(rows: Any, target: float) -> list[str]:
    """The power (and TOST) columns a frame of comparisons has: MDE at 80% power, seeds for ``target``."""
    if rows is None or "mde" not in rows:
        return []
    return ["MDE₈₀", f"n for {target:g}"] + (["p_TOST", "n ≡"] if "p_tost" in rows else [])


def power_cells(c: Row) -> list[str]:
    cells = ["—" if math.isnan(c["mde"]) else f"{c['mde'] * 100:.2f}", seeds(c["n_target"])]
    return cells + ([fmt_p(c["p_tost"]), seeds(c["n_equivalence"])] if "p_tost" in c else [])


def power_caption(rows: Any) -> str:
    """The captions' sentence on the power (and TOST) columns, '' without them."""
    if rows is None or "mde" not in rows:
        return ""
    text = (" MDE₈₀: the smallest difference (points) these seeds detect with 80% power (two-sided paired t, "
            "alpha 0.05, the observed SD of the differences); n for X: the seeds that detect X points.")
    if "p_tost" in rows:
        text += (f" p_TOST: two one-sided paired t-tests of equivalence within ±{rows['margin'].iat[0] * 100:g} "
                 "points; n ≡: the seeds TOST needs to show it when the true difference is 0.")
    return text


def to_published(d: Row, published: float) -> str:
    """'-0.23 [-0.81, +0.35]': the arm's mean minus a published value (in percent), in points,
    with the seeds' 95% t interval shifted alike; '—' without a published value."""
    if math.isnan(published):
        return "—"
    ci = "" if math.isnan(d["ci_low"]) else f" [{d['ci_low'] * 100 - published:+.2f}, {d['ci_high'] * 100 - published:+.2f}]"
    return f"{d['mean'] * 100 - published:+.2f}{ci}"


def published_sentence(d: Row, published: float) -> str:
    """Whether the arm reproduces a published value: its seeds' 95% CI contains it, or by how much it misses."""
    measured = f"{d['arm']}: {pm(d['mean'], d['std'])} (n = {d['n']}) against the published {published:.2f}"
    if math.isnan(d["ci_low"]):
        return f"{measured}: {d['mean'] * 100 - published:+.2f} points; one seed, no CI, so no verdict."
    lo, hi = d["ci_low"] * 100, d["ci_high"] * 100
    if lo <= published <= hi:
        return f"{measured}: reproduced (the 95% CI [{lo:.2f}, {hi:.2f}] contains it)."
    miss = published - hi if published > hi else published - lo
    return (f"{measured}: not reproduced; the 95% CI [{lo:.2f}, {hi:.2f}] misses it by {abs(miss):.2f} points "
            f"({'below' if published > hi else 'above'} it).")


def main_rows(summary: pd.DataFrame, vs: pd.DataFrame | None, extra: list[str],
              published: dict[str, float] | None = None, target: float = 1.0) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the per-arm table (strings, format-neutral); the power columns when
    ``vs`` has them, and a "Δ to published" column when the study declares published values."""
    # The feature column only where some arm has feature terms: a logit-only study's table is unchanged.
    features = "feature" in summary and bool((summary.feature != "none").any())
    head = ["arm", "mass", "structure", "T", "α", *(["feature"] if features else []), "mean ± std", "n", "95% CI"]
    planning = power_head(vs, target)
    if vs is not None:
        head += ["Δ [95% CI]", "p_t", "p_W", "d_z", *planning]
    if published:
        head += ["Δ to published [95% CI]"]
    head += [DISPLAY.get(m, (m, False))[0] for m in extra]
    by_arm = {} if vs is None else {r["a"]: r for r in vs.to_dict("records")}
    rows = []
    for d in summary.to_dict("records"):
        ci = "—" if math.isnan(d["ci_low"]) else f"[{d['ci_low'] * 100:.2f}, {d['ci_high'] * 100:.2f}]"
        row = [d["arm"], d["mass"], d["structure"], f"{d['T']:g}", f"{d['alpha']:g}",
               *([d["feature"]] if features else []), pm(d["mean"], d["std"]), str(d["n"]), ci]
        if vs is not None:
            c = by_arm.get(d["arm"])
            row += (["ref.", "", "", ""] + [""] * len(planning) if c is None
                    else [delta(c, d["n"]), *_tests(c), *(power_cells(c) if planning else [])])
        if published:
            row.append(to_published(d, published.get(d["arm"], float("nan"))))
        row += [_extra(d[m], m) for m in extra]
        rows.append(row)
    return head, rows


def effect_rows(effects: pd.DataFrame, target: float = 1.0) -> tuple[list[str], list[list[str]]]:
    """Header and cells of an effects (factorial) or pairs table, with its power columns."""
    planning = power_head(effects, target)
    head = ["effect", "Δ [95% CI]", "n", "p_t", "p_W", "d_z", *planning]
    rows = [[d.get("effect") or f"{d['a']} − {d['b']}", delta(d), str(d["n_pairs"]), *_tests(d),
             *(power_cells(d) if planning else [])] for d in effects.to_dict("records")]
    return head, rows


# How the tables print each CSV column, so a CSV holds the digits a reader sees (not float noise
# like 0.6174000000000001): each value is the number its printed form reads as, made by the
# same format (fractions in percent with 2 decimals, p-values as ``fmt_p``, d_z and Spearman
# correlations with 2 decimals, T and α as ':g'; other numbers 3 significant digits, as
# ``_extra`` prints a metric that is not a fraction).
PERCENT_COLUMNS = {"mean", "std", "ci_low", "ci_high", "diff_mean", "diff_std", "mde"}
P_COLUMNS = {"p_value", "p_wilcoxon", "p_holm", "p_wilcoxon_holm", "p_tost"}


def as_printed(x: float, fmt: str, percent: bool = False) -> float:
    """The number ``x`` reads as when printed with ``fmt`` (in percent: x * 100, then back to a
    fraction by the decimal exponent, so no new float noise); NaN stays NaN, -0 becomes 0."""
    if not math.isfinite(x):
        return x
    return (float(f"{x * 100:{fmt}}e-2") if percent else float(f"{x:{fmt}}")) + 0.0


def column_rounding(name: str) -> Callable[[float], float]:
    """How one value of column ``name`` is rounded: to the digits the report prints it with."""
    if name in PERCENT_COLUMNS or DISPLAY.get(name, ("", False))[1]:
        return lambda x: as_printed(x, ".2f", percent=True)
    if name in P_COLUMNS:
        return lambda p: as_printed(p, ".2g" if p < 0.001 else ".3f")
    if name in ("n_target", "n_equivalence"):
        return lambda n: n  # whole numbers of seeds, or NaN
    if name == "d_z" or name.startswith("rho_"):
        return lambda x: as_printed(x, ".2f")
    return lambda x: as_printed(x, "g" if name in ("T", "alpha", "temperature") else ".3g")


def rounded(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with every float column rounded as ``column_rounding`` says."""
    out = frame.copy()
    for name in out.columns:
        if pd.api.types.is_float_dtype(out[name]):
            out[name] = out[name].map(column_rounding(str(name)))
    return out


def md_escape(s: str) -> str:
    """Markdown-safe text: '|' would split a table cell, '*' open emphasis."""
    return s.replace("|", r"\|").replace("*", r"\*")


def markdown(head: list[str], rows: list[list[str]], cap: str) -> str:
    """A Markdown table with its caption above it, in italics."""
    lines = [f"*{md_escape(cap)}*", "", "| " + " | ".join(md_escape(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", r"\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "<": "$<$", ">": "$>$", "≤": r"$\leq$", "≥": r"$\geq$", "µ": r"$\mu$", "[": "{[}", "]": "{]}",
                 "±": r"$\pm$", "Δ": r"$\Delta$", "α": r"$\alpha$", "−": "$-$", "×": r"$\times$", "—": "---",
                 "ρ": r"$\rho$", "–": "--", "`": ""}


def tex(s: str) -> str:
    """Text-mode LaTeX for any cell or caption ('[' braced: after \\\\ it would read as an option)."""
    return "".join(LATEX_ESCAPES.get(ch, ch) for ch in s)


def latex(head: list[str], rows: list[list[str]], cap: str, label: str) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); text columns left, numbers right."""
    spec = "".join("l" if h in TEXT_COLUMNS else "r" for h in head)
    body = [" & ".join(tex(c) for c in r) + r" \\" for r in rows]
    return "\n".join([
        r"\begin{table}[t]", r"\centering", r"\small",
        rf"\caption{{{tex(cap)}}}", rf"\label{{tab:{label}}}",
        rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
        " & ".join(tex(h) for h in head) + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}",
        r"\end{table}", ""])


def sentence(d: Row, what: str = "") -> str:
    """One comparison in words, e.g. 'kd beats ce by +4.83 ± 1.51 points (95% CI [+3.75, +5.91];
    paired t, p = 3.2e-06, Holm p = 1.9e-05; Wilcoxon p = 0.002; d_z = 3.20; n = 10).'
    ± is the standard deviation of the per-seed differences."""
    name = what or f"{d['a']} vs {d['b']}"
    if d["n_pairs"] < 2:
        return f"{name}: fewer than 2 paired seeds (n = {d['n_pairs']}); no test."
    if d["diff_std"] == 0:
        return f"{name}: {signed(d['diff_mean'])} points in every one of {d['n_pairs']} seeds; no spread, tests undefined."
    sig = not math.isnan(d["p_holm"]) and d["p_holm"] < ALPHA
    size = f"{abs(d['diff_mean']) * 100:.2f} ± {d['diff_std'] * 100:.2f} points"
    if not sig:
        head = f"{name}: {signed(d['diff_mean'])} ± {d['diff_std'] * 100:.2f} points, not significant after Holm adjustment"
        return f"{head}: {verdict(d)} ({tests_text(d)})."
    if what:
        head = f"{what} {'adds' if d['diff_mean'] > 0 else 'costs'} {size}"
    else:
        head = f"{d['a']} {'beats' if d['diff_mean'] > 0 else 'trails'} {d['b']} by {signed(d['diff_mean'])[0]}{size}"
    return f"{head} ({tests_text(d)})."


def tests_text(d: Row) -> str:
    """'95% CI [...]; paired t, p = ..., Holm p = ...; Wilcoxon p = ...; d_z = ...; n = ...'."""
    d_z = "—" if math.isnan(d["d_z"]) else f"{d['d_z']:.2f}"
    return (f"95% CI [{signed(d['ci_low'])}, {signed(d['ci_high'])}]; paired t, p = {fmt_p(d['p_value'])}, "
            f"Holm p = {fmt_p(d['p_holm'])}; Wilcoxon p = {fmt_p(d['p_wilcoxon'])}; d_z = {d_z}; n = {d['n_pairs']}")


def verdict(d: Row) -> str:
    """What a non-significant comparison says: equivalent within the margin (TOST), or inconclusive
    with the seeds that would settle it; never "no effect"."""
    if "p_tost" in d and not math.isnan(d["p_tost"]) and d["p_tost"] < ALPHA:
        return f"equivalent within ±{d['margin'] * 100:g} points (TOST p = {fmt_p(d['p_tost'])})"
    if "p_tost" in d:
        return (f"inconclusive, not shown equivalent within ±{d['margin'] * 100:g} points (TOST p = "
                f"{fmt_p(d['p_tost'])}): need about {seeds(d['n_equivalence'])} seeds")
    if "mde" not in d or math.isnan(d["mde"]):
        return "inconclusive (not evidence of no effect)"
    return (f"inconclusive, not evidence of no effect: these {d['n_pairs']} seeds detect {d['mde'] * 100:.2f} points "
            f"with 80% power, and about {seeds(d['n_target'])} would detect {d['target'] * 100:g}")
