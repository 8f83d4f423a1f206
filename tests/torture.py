"""Kill -9 torture: start the smoke study, kill it at a random moment (some trials while the
MLflow store is being created), rerun it to the end, and check the store: exactly one FINISHED
run per cell, none RUNNING, no metric step logged twice, and the rerun exits 0.

``make torture`` runs 20 trials (``python -m tests.torture --trials 20``); ``make test`` runs a
short version (tests/test_torture.py).
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start(workdir: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdablate.cli", "run", "smoke", "--no-progress",
                             "--checkpoint-every", "1"], cwd=workdir,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, workdir: Path, during_creation: bool, delay: float) -> str:
    """Kill -9 ``proc`` as the store is being created (the temp file or the store appears), or
    after ``delay`` seconds; returns when it was killed."""
    deadline = time.time() + (60 if during_creation else delay)
    while time.time() < deadline and proc.poll() is None:
        if during_creation and any(p.name.endswith(".creating") or p.name == "mlruns.db" for p in workdir.iterdir()):
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        return "finished before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return "during store creation" if during_creation else f"after {delay:.1f} s"


def check_store(workdir: Path, env: dict[str, str]) -> list[str]:
    """Problems in the store after the rerun: anything but one FINISHED run per cell."""
    code = """
import collections, json
from kdablate import tracking
from kdablate.study import load_study
c = tracking.client(); e = c.get_experiment_by_name('smoke')
runs = tracking.search_cells(c, e.experiment_id)
want = {x.config_hash() for x in load_study('smoke').cells}
fin = collections.Counter(r.data.tags['config_hash'] for r in runs if r.info.status == 'FINISHED')
dups = sum(len(h) - len({m.step for m in h}) for r in runs for h in [c.get_metric_history(r.info.run_id, 'val/acc')])
print(json.dumps({'missing': len(want - set(fin)), 'twice': sum(n > 1 for n in fin.values()),
                  'running': sum(r.info.status == 'RUNNING' for r in runs), 'dup_steps': dups}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True)
    if out.returncode:
        return [f"store check failed: {out.stderr.strip().splitlines()[-1:]}"]
    import json

    found = json.loads(out.stdout.strip().splitlines()[-1])
    return [f"{k}: {v}" for k, v in found.items() if v]


def trial(workdir: Path, during_creation: bool, delay: float) -> tuple[str, list[str]]:
    """One kill and rerun in ``workdir`` (its own store and cache); returns (when, problems)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "studies").exists():
        (workdir / "studies").symlink_to(ROOT / "studies")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlruns.db'}",
           "KDABLATE_CACHE": str(workdir / "cache"), "PYTHONPATH": str(ROOT)}
    when = kill_when(start(workdir, env), workdir, during_creation, delay)
    rerun = subprocess.run([sys.executable, "-m", "kdablate.cli", "run", "smoke", "--no-progress",
                             "--checkpoint-every", "1"], cwd=workdir,
                           env=env, capture_output=True, text=True)
    problems = [] if rerun.returncode == 0 else [f"rerun exit {rerun.returncode}: {rerun.stderr.strip()[-300:]}"]
    return when, problems + check_store(workdir, env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng, clean = random.Random(args.seed), 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.trials):
            # A third of the trials kill while the store is first created; the others at a random
            # moment of the study, in a folder whose teacher cache (and stale checkpoints of earlier
            # trials' stores) are kept, so the study gets going at once.
            fresh = i % 3 == 0
            workdir = Path(tmp) / (f"fresh{i}" if fresh else "warm")
            if not fresh and (workdir / "mlruns.db").exists():
                subprocess.run(["rm", "-rf", str(workdir / "mlruns.db"), str(workdir / "mlartifacts")], check=True)
            when, problems = trial(workdir, fresh, rng.uniform(3.0, 20.0))
            clean += not problems
            print(f"trial {i + 1}/{args.trials}: killed {when}: {'clean' if not problems else '; '.join(problems)}",
                  flush=True)
    print(f"{clean} of {args.trials} trials clean")
    return 0 if clean == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
