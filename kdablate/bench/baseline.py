"""The study-level target of seed stacking (issue 15), measured as it is stated: the default
components study at this checkout's defaults against the code before stacking, on this machine.

Each side is ``kdablate run components`` in a subprocess of this venv: the reference from a
``git worktree`` of ``BASELINE`` (its own ``kdablate`` first on ``PYTHONPATH``), this code from
this checkout. Each gets a fresh MLflow store and cache of its own, so each pays the same
one-time work (MNIST-1D generation, the store's creation, the teacher), and they run one after
the other, the reference first. Without git or the commit (a shallow clone, an installed
package) the row says why and reports nothing.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kdablate.bench.core import Row, Scale
from kdablate.bench.system import run_measured

BASELINE = "f7f36c5"  # the last commit before seeds were stacked: "today" in issue 15
TARGET = 3.0
ROOT = Path(__file__).resolve().parents[2]  # this checkout


def checkout(ref: str, dest: Path) -> tuple[Path | None, str]:
    """A detached worktree of ``ref`` at ``dest``; (None, why) where there is none to make."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(dest), ref],
                             capture_output=True, text=True)
    except OSError as e:  # no git at all
        return None, f"no checkout of {ref}: {e.strerror or e}"
    if out.returncode != 0:
        return None, f"no checkout of {ref}: {(out.stderr.strip().splitlines() or ['git failed'])[-1]}"
    return dest, ""


def study_seconds(code: Path, study: str, folder: Path, overrides: tuple[str, ...]) -> float:
    """Wall seconds of ``kdablate run`` of ``code``'s studies/``study``.yaml into a fresh store in ``folder``."""
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(code), "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlruns.db"}
    cmd = [sys.executable, "-m", "kdablate.cli", "run", str(code / "studies" / f"{study}.yaml"), *overrides,
           "--no-progress", "--device", "cpu", "--cache-dir", str(folder / "cache")]
    return run_measured(cmd, env, cwd=folder)[0]


def baseline_row(scale: Scale, ref: str = BASELINE, study: str = "components") -> Row:
    """The study at ``ref`` against this checkout, both with their own defaults; target >= x``TARGET``.
    A quick scale (1 epoch, 2 seeds, a 1-epoch teacher) checks the plumbing only."""
    overrides = () if scale.study_epochs >= 40 else ("optim.epochs=1", "seeds=[0,1]", "teacher.optim.epochs=1")
    what = f"{study} study, this code's defaults vs {ref} (before stacking)"
    with tempfile.TemporaryDirectory(prefix="kdablate-baseline-") as tmp:
        code, why = checkout(ref, Path(tmp) / "ref")
        if code is None:
            return Row("study", what, float("nan"), "x", "reported", None, why)
        try:
            ref_s = study_seconds(code, study, Path(tmp) / "ref-run", overrides)
            new_s = study_seconds(ROOT, study, Path(tmp) / "new-run", overrides)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(code)], capture_output=True)
    speedup = ref_s / new_s
    return Row("study", what, speedup, "x", f">= x{TARGET:g}", speedup >= TARGET,
               f"whole `kdablate run {study}`, fresh store and cache each: {ref_s:.1f} s vs {new_s:.1f} s")
