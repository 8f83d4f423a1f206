"""Seeds until the answer is precise enough: ``kdablate run STUDY --until-halfwidth H``.

Runs the study's seeds, then adds seeds in batches (the next unused integers) until every
declared comparison's 95% CI half-width is at most H points, or ``--max-seeds`` is reached.
The comparisons are ``analysis.pairs``, or, without pairs, every arm against ``analysis.baseline``;
each is the paired (by seed) difference of the metric (default ``report/test_acc``).

It stops on precision, never on significance: the stopping rule does not look at the
differences' means, so a p-value computed at the end keeps its meaning (stopping when p
crosses 0.05 would make "significant" far likelier than 5% under no effect).

Every batch is an ordinary ``run_study`` over the study with a ``seeds=[...]`` override, so a
killed run resumes like any study: the same command recomputes the half-widths from the store
and goes on from the seeds that exist. The seeds it ran, and the half-widths it stopped at, are
recorded on each batch's parent run (tags ``kdablate.sequential_*``), where the report finds them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from analysis.stats import t_ci
from kdablate import tracking
from kdablate.registry import ConfigError
from kdablate.runner import RunOptions, run_study
from kdablate.study import Study

@dataclasses.dataclass(frozen=True)
class Until:
    """The stopping rule: every comparison's 95% CI half-width at most ``halfwidth`` points, or
    ``max_seeds`` seeds; ``batch`` seeds are added at a time."""

    halfwidth: float
    max_seeds: int = 40
    batch: int = 5
    metric: str = "report/test_acc"


def comparisons(study: Study) -> list[tuple[str, str]]:
    """The declared comparisons: the pairs, else every arm against the baseline; ConfigError without either."""
    a, arms = study.config.analysis, study.arms()
    found = [tuple(p) for p in a.pairs if set(p) <= set(arms)] or [
        (arm, a.baseline) for arm in arms if a.baseline in arms and arm != a.baseline]
    if not found:
        raise ConfigError(f"{study.path}: --until-halfwidth needs comparisons to make precise: declare "
                          "analysis.pairs or analysis.baseline (and select its arms)")
    return found


def values(study: Study, metric: str, uri: str | None = None) -> dict[str, dict[int, float]]:
    """arm -> seed -> ``metric`` of the study's FINISHED cells in the store."""
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(study.name)
    cells = {c.config_hash(): c for c in study.cells}
    out: dict[str, dict[int, float]] = {}
    for run in tracking.search_cells(client, exp.experiment_id, "FINISHED") if exp else []:
        cell = cells.get(run.data.tags.get("config_hash"))
        metrics = tracking.summary(run)
        if cell is not None and metric in metrics:
            out.setdefault(cell.arm, {})[cell.seed] = metrics[metric]
    return out


def halfwidths(study: Study, metric: str, uri: str | None = None) -> dict[str, float]:
    """'a − b' -> the half-width, in points, of the 95% t interval of the paired differences
    (inf with fewer than 2 paired seeds)."""
    by_arm, out = values(study, metric, uri), {}
    for a, b in comparisons(study):
        x, y = by_arm.get(a, {}), by_arm.get(b, {})
        d = [x[s] - y[s] for s in sorted(set(x) & set(y))]
        lo, hi = t_ci(d)
        out[f"{a} − {b}"] = math.inf if math.isnan(lo) else (hi - lo) / 2 * 100
    return out


def run_until(study: Study, rule: Until, opts: RunOptions = RunOptions()) -> int:
    """Run ``study``, adding ``rule.batch`` seeds at a time until ``rule`` holds; the failed cells.
    It starts from the study's seeds and every seed an earlier run of it added (resuming, never
    dropping a seed)."""
    seeds = sorted(set(study.config.seeds) | set(tracking.sequential_seeds(tracking.client(opts.uri), study.name)))
    while True:
        current = study.with_seeds(seeds)
        failed = run_study(current, opts)
        widths = halfwidths(current, rule.metric, opts.uri)
        worst = max(widths.values())
        done = worst <= rule.halfwidth
        more = [] if done or failed else next_seeds(seeds, rule)
        print(status_line(len(seeds), widths, rule, more, failed), flush=True)
        record(current, seeds, widths, opts.uri)
        if not more:
            return failed
        seeds += more


def next_seeds(seeds: Sequence[int], rule: Until) -> list[int]:
    """The next ``rule.batch`` unused seeds, at most up to ``rule.max_seeds`` seeds in all."""
    room = max(rule.max_seeds - len(seeds), 0)
    start = max(seeds) + 1
    return list(range(start, start + min(rule.batch, room)))


def status_line(n: int, widths: dict[str, float], rule: Until, more: list[int], failed: int) -> str:
    """One line per batch: the seeds, every half-width, and what happens next."""
    shown = ", ".join(f"{k} ±{w:.2f}" for k, w in widths.items())
    if failed:
        nxt = f"{failed} cell(s) FAILED: stopping; see 'kdablate status'"
    elif not more:
        nxt = ("every half-width is at most ±" if max(widths.values()) <= rule.halfwidth
               else f"max-seeds {rule.max_seeds} reached before ±") + f"{rule.halfwidth:g}"
    else:
        nxt = f"adding seeds {more[0]}-{more[-1]}"
    return f"until-halfwidth: {n} seeds, 95% CI half-widths (points) {shown}; {nxt}"


def record(study: Study, seeds: Sequence[int], widths: dict[str, float], uri: str | None) -> None:
    """The seeds run so far and their half-widths, on the study's newest parent run."""
    client = tracking.client(uri)
    parent = tracking.newest_parent(client, study.name)
    if parent is not None:
        tracking.set_tags(client, parent.info.run_id, {
            tracking.SEQUENTIAL_SEEDS: ",".join(map(str, seeds)),
            tracking.SEQUENTIAL_HALFWIDTHS: "; ".join(f"{k} {w:.3f}" for k, w in widths.items())})
