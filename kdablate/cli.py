"""Command line: ``kdablate run | dry-run | status | report | ui STUDY``.

Bad input (a study file that does not validate, a store that cannot be used, a study
without runs to report on) is one line on stderr naming the file and field, with exit
code 2; never a traceback. ``report`` is ``analysis.report``: its options come from the
argparse-only ``analysis.options``, and the analysis itself (pandas, matplotlib, the figures)
is imported only when the command runs, so it costs the other commands nothing.
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

from analysis.options import add_report_options
from kdablate.registry import ConfigError
from kdablate.study import Study, StudyError, load_study


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr and exit 2, like a bad study file."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"kdablate: error: {message}; see 'kdablate --help'", file=sys.stderr)
        sys.exit(2)


ENVIRONMENT = """environment:
  MLFLOW_TRACKING_URI  the MLflow store (default: sqlite:///mlruns.db in the current folder)
  KDABLATE_CACHE       teacher logits and checkpoints (default: .cache/kdablate)
  KDABLATE_MAX_CELLS   the most cells a study may expand to (default 20000)

examples:
  kdablate run components --workers 2              # the default study, resumable
  kdablate run smoke optim.epochs=2 --arm ce --seed 0   # one cell, one setting changed"""

STUDY_HELP = ("a study file, or the name of one in ./studies (e.g. components, smoke); it holds base, "
              "seeds and arms, see the README's 'Studies'")
OVERRIDE_HELP = ("KEY=VALUE overrides of the study file, Hydra-style: optim.epochs=2 (a base field), seeds=[0,1], "
                 "arms.kd.temperature=8 (an arm's field); values are YAML")


def version() -> str:
    import importlib.metadata
    import platform

    import torch

    try:
        mine = importlib.metadata.version("kdablate")
    except importlib.metadata.PackageNotFoundError:
        mine = "unknown (not installed)"
    return f"kdablate {mine} (torch {torch.__version__}, Python {platform.python_version()})"


class VersionAction(argparse.Action):
    """--version, computed only when asked (it imports torch)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        print(version())
        parser.exit()


def add_study(p: argparse.ArgumentParser, subsets: bool = True) -> None:
    """STUDY, its overrides and (for commands over cells) the --arm / --seed subsets."""
    p.add_argument("study", help=STUDY_HELP)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP)
    if subsets:
        p.add_argument("--arm", action="append", default=[], metavar="NAME",
                       help="only the arms matching this name or glob (e.g. 'il_*'); repeatable")
        p.add_argument("--seed", action="append", default=[], type=int, metavar="N",
                       help="only this seed; repeatable")


def checkpoint_every(text: str) -> tuple[int, float]:
    """'5' -> every 5 epochs, '60s' -> every 60 seconds, '0' -> never: (epochs, seconds)."""
    try:
        value = float(text[:-1]) if text.endswith("s") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text[:40]}' is neither N (epochs) nor Ns (seconds), e.g. 1 or 60s") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text[:40]}' is negative; use 0 for never")
    return (0, float(value)) if text.endswith("s") else (int(value), 0.0)


def workers_count(text: str) -> int:
    """--workers: N >= 1, or 'auto' (0)."""
    if text == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text[:40]}' is neither a number of workers nor 'auto'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text[:40]}': use 1 or more workers, or 'auto'")
    return value


def add_run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument("--threads", type=int, default=0,
                     help="torch threads per worker (default 0: each worker's share of the cores; 1 per Ray task)")
    run.add_argument("--workers", type=workers_count, default=0, metavar="N|auto",
                     help="run cells in this many local processes (default auto: on a CPU, one per core "
                          "while each gets two units of work or more; one on a GPU)")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local processes, or Ray tasks on a cluster (--address; pip install -e '.[ray]')")
    run.add_argument("--address", help="Ray cluster address for --executor ray (e.g. auto, host:6379)")
    run.add_argument("--gpus-per-cell", type=float, default=0.25, metavar="F",
                     help="with --executor ray on CUDA: the fraction of a GPU each cell requests (default 0.25)")
    run.add_argument("--checkpoint-every", type=checkpoint_every, default="60s", metavar="N|Ns",
                     help="save each cell's state to resume after a crash: every N epochs, or (default 60s) at "
                          "the end of the first epoch N seconds after the last save; 0: never")
    run.add_argument("--stack", choices=("auto", "on", "off"), default="auto",
                     help="train the seeds of an arm as one stacked model (same numbers up to float rounding): "
                          "auto (default) where measured faster (the MLP on a CPU; the MLP, 1-D CNN and ResNet-8 "
                          "on CUDA), on: any model, off: never")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (one line per finished cell)")
    run.add_argument("--until-halfwidth", type=float, metavar="H",
                     help="add seeds in batches until every declared comparison's 95%% CI half-width is at most H "
                          "points (analysis.pairs, else each arm against analysis.baseline); stops on precision, "
                          "never on significance")
    run.add_argument("--max-seeds", type=int, default=40, metavar="N", help="with --until-halfwidth: at most N seeds")
    run.add_argument("--seed-batch", type=int, default=5, metavar="B", help="with --until-halfwidth: B seeds a batch")
    run.add_argument("--allow-mixed-code", action="store_true",
                     help="add cells to a study whose finished cells another version of the code made (refused "
                          "by default; the report lists the versions and warns)")
    run.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    run.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                     help="autocast precision (bf16 on a CPU without AMX is slower: a warning says so)")
    run.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("KDABLATE_CACHE", ".cache/kdablate")),
                     help="teacher logits and checkpoints (default $KDABLATE_CACHE or .cache/kdablate)")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="kdablate", description="Ablation studies of knowledge distillation: which part of a "
                      "soft target helps. Studies are YAML files of arms x seeds; runs go to MLflow.",
                      epilog=ENVIRONMENT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=VersionAction, help="print the versions of kdablate, torch and Python")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {
        "run": "Train every pending cell of a study (resuming interrupted ones), logging each to MLflow.",
        "dry-run": "List the cells a study expands to, with their config hashes, without training.",
        "status": "Count a study's cells as done, pending, running, failed or killed, with the reasons.",
    }
    for name, text in commands.items():
        cmd = sub.add_parser(name, help=text[0].lower() + text[1:-1], description=text, epilog=ENVIRONMENT,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        add_study(cmd)
        if name == "run":
            add_run_options(cmd)
    report = sub.add_parser("report", help="tables, figures and report.md of a study, from MLflow alone",
                            description="Write the tables, figures and report.md of a study's runs (finished or "
                            "partial) into OUT/<study>/ and log them to the study's parent run in MLflow.")
    add_report_options(report)
    ui = sub.add_parser("ui", help="the MLflow UI on the study's store",
                        description="Start the MLflow UI on the store runs are logged to ($MLFLOW_TRACKING_URI, "
                        "default ./mlruns.db) and print a link to a study's runs table.")
    ui.add_argument("study", nargs="?", help="print the link to this study's runs (a name in ./studies or a path)")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=int(os.environ.get("PORT", 5000)), help="port (default $PORT or 5000)")
    return p


def dry_run(study: Study, args: argparse.Namespace) -> int:
    """The cells of ``study``, one line each, with their config hashes."""
    print(f"study {study.name} ({study.path}): {len(study.arms())} arms x {len({c.seed for c in study.cells})} seeds "
          f"= {len(study.cells)} cells")
    # A feature column only where some arm has feature terms: other studies print as they always have.
    features = any(c.knowledge.feature for c in study.cells)
    print(f"{'arm':32} {'seed':>4} {'mass':>10} {'structure':>10} {'T':>5} {'alpha':>5}"
          + (f" {'feature':>10}" if features else "") + "  hash")
    for c in study.cells:
        k = c.knowledge
        terms = "+".join(t.name for t in k.feature) or "none"
        print(f"{c.arm:32} {c.seed:>4} {k.mass.name:>10} {k.structure.name:>10} {k.temperature:>5g} {k.alpha:>5g}"
              + (f" {terms:>10}" if features else "") + f"  {c.config_hash()}")
    return 0


def status(study: Study, args: argparse.Namespace) -> int:
    """Count the cells of ``study`` by the state of their newest run; name the unfinished ones."""
    from kdablate import tracking

    db = tracking.sqlite_path(tracking.tracking_uri())
    if db is not None and not db.exists():  # say so, and create nothing
        print(f"study {study.name}: no MLflow store at {db} yet, so none of its {len(study.cells)} cells has run; "
              f"'kdablate run {args.study}' starts it")
        return 0
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
            print(f"{state:8} {c.arm} seed {c.seed}: {tracking.tag(run.data.tags, tracking.FAILURE)}")
    names = {"FINISHED": "done", "PENDING": "pending", "RUNNING": "running", "FAILED": "failed", "KILLED": "killed"}
    print(f"study {study.name}: {len(study.cells)} cells: "
          + ", ".join(f"{counts.get(k, 0)} {v}" for k, v in names.items()))
    return 0


def run(study: Study, args: argparse.Namespace) -> int:
    """Train the pending cells (with --until-halfwidth, in batches of seeds); 1 when some failed."""
    from kdablate.runner import RunOptions, check_device, run_study

    problem = check_device(args.device) or until_problem(args)
    if args.threads < 0:
        problem = "--threads must be >= 0 (0: each worker's share of the cores)"
    if problem:
        print(f"kdablate: error: {problem}", file=sys.stderr)
        return 2
    opts = RunOptions(cache_dir=args.cache_dir, threads=args.threads, workers=args.workers,
                      checkpoint_every=args.checkpoint_every[0], checkpoint_every_s=args.checkpoint_every[1],
                      executor=args.executor, address=args.address, gpus_per_cell=args.gpus_per_cell,
                      progress=not args.no_progress, device=args.device, amp=args.amp, stack=args.stack,
                      allow_mixed_code=args.allow_mixed_code)
    if args.until_halfwidth is None:
        failed = run_study(study, opts)  # ConfigError (e.g. resuming under another precision): main says it
    else:
        from kdablate.sequential import Until, run_until

        failed = run_until(study, Until(args.until_halfwidth, args.max_seeds, args.seed_batch), opts)
    if failed:
        print(f"kdablate: {failed} cell(s) FAILED; see 'kdablate status {args.study}'", file=sys.stderr)
    return 1 if failed else 0


def until_problem(args: argparse.Namespace) -> str | None:
    """Why the --until-halfwidth options cannot run, or None."""
    if args.until_halfwidth is None:
        return None
    if not args.until_halfwidth > 0:
        return f"--until-halfwidth must be > 0 points, got {args.until_halfwidth}"
    if args.max_seeds < 2 or args.seed_batch < 1:
        return "--max-seeds must be >= 2 and --seed-batch >= 1"
    if args.seed:
        return "--until-halfwidth chooses the seeds itself; drop --seed (use --arm to select arms)"
    return None


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


RECIPES = ("In the runs table: filter `tags.role != 'arm'` shows the baseline and reference arms; "
           "Group by -> tag `arm` gives each arm's mean; the study's parent run holds the answer "
           "(metrics answer/ARM/..., report.html at its artifact root).")


def ui(args: argparse.Namespace) -> int:
    """The MLflow UI on the tracking store; its link (in Model training mode) printed once the server
    answers, with the two recipes that compare arms; blocks until interrupted."""
    from kdablate import tracking

    uri = tracking.tracking_uri()
    exp = tracking.client(uri).get_experiment_by_name(load_study(args.study).name) if args.study else None
    link = tracking.runs_link(exp.experiment_id, args.host, args.port) if exp else f"http://{args.host}:{args.port}/"
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    server = subprocess.Popen(cmd)
    try:
        if answering(f"http://{args.host}:{args.port}/health", server):
            print(f"MLflow UI on {uri}: {link}\n{RECIPES}", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        return 0


def answering(url: str, server: subprocess.Popen, timeout: float = 300.0) -> bool:
    """Wait until ``url`` answers (True) or the server process ends or ``timeout`` passes (False)."""
    import time
    import urllib.request

    end = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < end:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return True
        except OSError:
            time.sleep(0.5)
    return False


# Every command over a study takes the loaded study and the parsed arguments, and returns the exit code.
COMMANDS = {"run": run, "dry-run": dry_run, "status": status, "report": report}


def study_of(args: argparse.Namespace) -> Study:
    return load_study(args.study, getattr(args, "overrides", ()), getattr(args, "arm", ()), getattr(args, "seed", ()))


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; KEY=VALUE overrides may come before or after the options."""
    p = parser()
    args, rest = p.parse_known_args(argv)
    late = [t for t in rest if "=" in t and not t.startswith("-")]
    if [t for t in rest if t not in late] or (late and not hasattr(args, "overrides")):
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def main(argv: list[str] | None = None) -> int:
    # `kdablate dry-run X | head` should end quietly, not with a BrokenPipeError.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # torch warns about its own internal use of torch.jit when forward mode is first imported: noise
    # on every command whose study uses forward-mode products, nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    args = parse(argv)
    try:
        if args.command == "ui":
            return ui(args)
        return COMMANDS[args.command](study_of(args), args)
    except (StudyError, ConfigError) as e:  # a bad study file, or a store or cache that cannot be used
        print(f"kdablate: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the disk filling up is the machine's, said in one line
        if not disk_full(e):
            raise
        print(f"kdablate: error: the disk is full ({str(e).splitlines()[0][:120]}); free space and rerun: finished "
              "cells are kept and the interrupted ones resume", file=sys.stderr)
        return 2


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or what it wraps: MLflow wraps SQLite's errors) is a full disk."""
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC or "disk is full" in str(e) or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
