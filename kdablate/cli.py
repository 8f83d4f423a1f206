"""Command line: ``kdablate run | dry-run | status | report STUDY``.

Bad input (a study file that does not validate, a store that cannot be used, a study
without runs to report on) is one line on stderr naming the file and field, with exit
code 2; never a traceback. ``report`` is ``analysis.report``: its options come from the
argparse-only ``analysis.options``, and the analysis itself (pandas, matplotlib, the figures)
is imported only when the command runs, so it costs the other commands nothing.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from analysis.options import add_report_options
from kdablate.registry import ConfigError
from kdablate.study import Study, StudyError, load_study


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr and exit 2, like a bad study file."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"kdablate: error: {message}; see 'kdablate --help'", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="kdablate", description="Ablation studies of knowledge distillation.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every pending cell of a study, logging to MLflow")
    run.add_argument("study", help="a study file, or the name of one in studies/")
    run.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1: the models are small)")
    run.add_argument("--workers", type=int, default=1, help="cells run in this many local processes")
    run.add_argument("--executor", choices=("local", "ray"), default="local")
    run.add_argument("--address", help="Ray cluster address for --executor ray (e.g. auto, host:6379)")
    run.add_argument("--checkpoint-every", type=int, default=1, metavar="EPOCHS",
                     help="save each cell's state every so many epochs to resume after a crash (0: never)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    run.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast precision")
    run.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("KDABLATE_CACHE", ".cache/kdablate")))
    dry = sub.add_parser("dry-run", help="list the cells of a study without training")
    dry.add_argument("study")
    status = sub.add_parser("status", help="finished / failed / pending cells of a study")
    status.add_argument("study")
    report = sub.add_parser("report", help="tables, figures and report.md of a study, from MLflow alone",
                            description="Write the tables, figures and report.md of a study's runs (finished or "
                            "partial) into OUT/<study>/ and log them to the study's parent run in MLflow.")
    add_report_options(report)
    return p


def dry_run(study: Study, args: argparse.Namespace) -> int:
    """The cells of ``study``, one line each, with their config hashes."""
    print(f"study {study.name} ({study.path}): {len(study.arms())} arms x {len(study.config.seeds)} seeds "
          f"= {len(study.cells)} cells")
    print(f"{'arm':32} {'seed':>4} {'mass':>10} {'structure':>10} {'T':>5} {'alpha':>5}  hash")
    for c in study.cells:
        k = c.knowledge
        print(f"{c.arm:32} {c.seed:>4} {k.mass.name:>10} {k.structure.name:>10} "
              f"{k.temperature:>5g} {k.alpha:>5g}  {c.config_hash()}")
    return 0


def status(study: Study, args: argparse.Namespace) -> int:
    """Count the cells of ``study`` by the state of their newest run; name the unfinished ones."""
    from kdablate import tracking

    client = tracking.client()
    exp = client.get_experiment_by_name(study.name)
    if exp is not None:
        tracking.reap_stale(client, exp.experiment_id)
    runs = tracking.search_cells(client, exp.experiment_id) if exp else []
    by_hash: dict[str, list] = {}
    for r in runs:
        by_hash.setdefault(r.data.tags.get("config_hash", ""), []).append(r)
    counts: dict[str, int] = {}
    for c in study.cells:
        statuses = {r.info.status for r in by_hash.get(c.config_hash(), [])}
        state = next((s for s in ("FINISHED", "RUNNING", "FAILED", "KILLED") if s in statuses), "PENDING")
        counts[state] = counts.get(state, 0) + 1
        if state in ("FAILED", "KILLED", "RUNNING"):
            run = next(r for r in by_hash[c.config_hash()] if r.info.status == state)
            print(f"{state:8} {c.arm} seed {c.seed}: {run.data.tags.get('failure_reason', '')}")
    names = {"FINISHED": "done", "PENDING": "pending", "RUNNING": "running", "FAILED": "failed", "KILLED": "killed"}
    print(f"study {study.name}: {len(study.cells)} cells: "
          + ", ".join(f"{counts.get(k, 0)} {v}" for k, v in names.items()))
    return 0


def run(study: Study, args: argparse.Namespace) -> int:
    """Train the pending cells; 1 when some failed."""
    from kdablate.runner import RunOptions, check_device, run_study

    problem = check_device(args.device)
    if args.workers < 1 or args.threads < 1:
        problem = "--workers and --threads must be >= 1"
    if problem:
        print(f"kdablate: error: {problem}", file=sys.stderr)
        return 2
    opts = RunOptions(cache_dir=args.cache_dir, threads=args.threads, workers=args.workers,
                      checkpoint_every=args.checkpoint_every, executor=args.executor, address=args.address,
                      progress=not args.no_progress, device=args.device, amp=args.amp)
    failed = run_study(study, opts)  # ConfigError (e.g. resuming under another precision): main says it
    if failed:
        print(f"kdablate: {failed} cell(s) FAILED; see 'kdablate status {args.study}'", file=sys.stderr)
    return 1 if failed else 0


def report(study: Study, args: argparse.Namespace) -> int:
    """``analysis.report`` for ``study``; 2 with one line when there is nothing to report on."""
    # Imported here: the analysis stack (pandas, matplotlib) is for this command only.
    from analysis.report import ReportError, write

    try:
        write(study, args.metric, args.out, log=not args.no_log)
    except ReportError as e:
        print(f"kdablate: error: {e}", file=sys.stderr)
        return 2
    return 0


# Every command takes the loaded study and the parsed arguments, and returns the exit code.
COMMANDS = {"run": run, "dry-run": dry_run, "status": status, "report": report}


def main(argv: list[str] | None = None) -> int:
    # `kdablate dry-run X | head` should end quietly, not with a BrokenPipeError.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](load_study(args.study), args)
    except (StudyError, ConfigError) as e:  # a bad study file, or a store or cache that cannot be used
        print(f"kdablate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
