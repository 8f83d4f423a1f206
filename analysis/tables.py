"""Tables and sentences for papers: Markdown and LaTeX (booktabs) from the frames of
``analysis.decomposition``, with mean ± std, n, significance marks and the reporting rule
in every caption.
"""
from __future__ import annotations

import math

import pandas as pd

from analysis.stats import fmt_p, pm

DISPLAY = {"report/test_ece": "ECE", "report/test_agreement": "agreement", "time/step_ms": "ms/step",
           "time/explain_ms": "explain ms", "train/similarity_spearman": "ρ(expl., teacher)"}
MARKS = "* p < 0.05, ** p < 0.01, *** p < 0.001 (paired t, Holm-corrected)"


def signed(x: float, digits: int = 2) -> str:
    return "—" if math.isnan(x) else f"{x * 100:+.{digits}f}"


def delta(d: dict) -> str:
    """'+4.83 [+3.75, +5.91]***': the paired difference in points, its 95% CI and its mark."""
    if d["n_pairs"] == 0:
        return "—"
    return f"{signed(d['diff_mean'])} [{signed(d['ci_low'])}, {signed(d['ci_high'])}]{d['mark']}"


def caption(metric: str, rule: str, reference: str | None, family: int) -> str:
    text = (f"`{metric}` in percent, mean ± std over seeds (n). Reporting rule: {rule}. "
            "95% CI: Student t over seeds.")
    if reference:
        text += (f" Δ: paired (by seed) difference to {reference} with its t 95% CI; p_t paired t-test and "
                 f"p_W Wilcoxon signed-rank, both Holm-corrected over the {family} comparisons with {reference}; "
                 f"d_z: Cohen's d of the paired differences. {MARKS}.")
    return text


def main_rows(summary: pd.DataFrame, vs: pd.DataFrame | None, extra: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the per-arm table (strings, format-neutral)."""
    head = ["arm", "mass", "structure", "T", "α", "mean ± std", "n", "95% CI"]
    if vs is not None:
        head += ["Δ [95% CI]", "p_t", "p_W", "d_z"]
    head += [DISPLAY.get(m, m) for m in extra]
    by_arm = {} if vs is None else {r["a"]: r for r in vs.to_dict("records")}
    rows = []
    for d in summary.to_dict("records"):
        row = [d["arm"], d["mass"], d["structure"], f"{d['T']:g}", f"{d['alpha']:g}", pm(d["mean"], d["std"]),
               str(d["n"]), f"[{d['ci_low'] * 100:.2f}, {d['ci_high'] * 100:.2f}]"]
        if vs is not None:
            c = by_arm.get(d["arm"])
            row += ["ref.", "", "", ""] if c is None else [
                delta(c), fmt_p(c["p_holm"]), fmt_p(c["p_wilcoxon_holm"]), f"{c['d_z']:.2f}" if not math.isnan(c["d_z"]) else "—"]
        row += ["—" if pd.isna(d[m]) else f"{d[m]:.3g}" for m in extra]
        rows.append(row)
    return head, rows


def effect_rows(effects: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    head = ["effect", "Δ [95% CI]", "n", "p_t", "p_W", "d_z"]
    rows = [[d.get("effect") or f"{d['a']} − {d['b']}", delta(d), str(d["n_pairs"]), fmt_p(d["p_holm"]),
             fmt_p(d["p_wilcoxon_holm"]), "—" if math.isnan(d["d_z"]) else f"{d['d_z']:.2f}"]
            for d in effects.to_dict("records")]
    return head, rows


def markdown(head: list[str], rows: list[list[str]], cap: str) -> str:
    lines = [f"*{cap}*", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "±": r"$\pm$", "Δ": r"$\Delta$", "α": r"$\alpha$", "−": "$-$", "×": r"$\times$", "—": "--", "ρ": r"$\rho$", "–": "--"}


def tex(s: str) -> str:
    out = "".join(LATEX_ESCAPES.get(ch, ch) for ch in s)
    return out.replace("`", "")


def latex(head: list[str], rows: list[list[str]], cap: str, label: str) -> str:
    """A booktabs table (needs \\usepackage{booktabs})."""
    body = [" & ".join(tex(c) for c in r) + r" \\" for r in rows]
    return "\n".join([
        r"\begin{table}[t]", r"\centering", r"\small",
        rf"\caption{{{tex(cap)}}}", rf"\label{{tab:{label}}}",
        r"\begin{tabular}{" + "l" * 3 + "r" * (len(head) - 3) + "}", r"\toprule",
        " & ".join(tex(h) for h in head) + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}",
        r"\end{table}", ""])


def sentence(d: dict, what: str = "") -> str:
    """'kd beats ce by +4.83 ± 1.51 points (95% CI [+3.75, +5.91]; paired t, p = 3.2e-06, Holm ...; n = 10).'"""
    a, b = d.get("a"), d.get("b")
    if d["n_pairs"] < 2:
        return f"{what or a + ' vs ' + b}: fewer than 2 paired seeds (n = {d['n_pairs']}); no test."
    sig = not math.isnan(d["p_holm"]) and d["p_holm"] < 0.05
    size = f"{abs(d['diff_mean']) * 100:.2f} ± {d['diff_std'] * 100:.2f} points"
    if not sig:
        head = (f"{what or a + ' vs ' + b}: {signed(d['diff_mean'])} ± {d['diff_std'] * 100:.2f} points, "
                "not significant")
    elif what:
        head = f"{what} {'adds' if d['diff_mean'] > 0 else 'costs'} {size}"
    else:
        beats = d["diff_mean"] > 0
        head = f"{a} {'beats' if beats else 'trails'} {b} by {'+' if beats else ''}{size}"
    return (f"{head} (95% CI [{signed(d['ci_low'])}, {signed(d['ci_high'])}]; paired t, p = {fmt_p(d['p_value'])}, "
            f"Holm p = {fmt_p(d['p_holm'])}; Wilcoxon p = {fmt_p(d['p_wilcoxon'])}; "
            f"d_z = {d['d_z']:.2f}; n = {d['n_pairs']}).")
