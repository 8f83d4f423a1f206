"""The study-level target of seed stacking (issue 15), measured as it is stated: the default
components study at this checkout's defaults against the code before stacking, on this machine.

Each side is ``kdablate run components`` in a subprocess of this venv: the reference from a
``git worktree`` of ``BASELINE`` (its own ``kdablate`` first on ``PYTHONPATH``), this code from
this checkout. Each gets a fresh MLflow store and cache of its own, so each pays the same
one-time work (MNIST-1D generation, the store's creation, the teacher). They run one after the
other: this code, the reference, this code again (``baseline_row``). Without git or the commit
(a shallow clone, an installed package) the row says why and reports nothing.
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from kdablate.bench.core import Row, Scale
from kdablate.bench.system import run_cli

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


def baseline_row(scale: Scale, ref: str = BASELINE, study: str = "components") -> Row:
    """The study at ``ref`` against this checkout, both with their own defaults; target >= x``TARGET``.
    This code runs before and after the reference and counts at the mean of the two, so a machine
    that drifts in speed over the minutes (a shared one does, by ~30 %) slows both sides alike.
    A quick scale (1 epoch, 2 seeds, a 1-epoch teacher) checks the plumbing only."""
    overrides = () if scale.study_epochs >= 40 else ("optim.epochs=1", "seeds=[0,1]", "teacher.optim.epochs=1")
    what = f"{study} study, this code's defaults vs {ref} (before stacking)"
    with tempfile.TemporaryDirectory(prefix="kdablate-baseline-") as tmp:
        code, why = checkout(ref, Path(tmp) / "ref")
        if code is None:
            return Row("study", what, float("nan"), "x", "reported", None, why)
        try:
            runs = [(ROOT, "new-before"), (code, "ref-run"), (ROOT, "new-after")]
            before_s, ref_s, after_s = (run_cli(c / "studies" / f"{study}.yaml", Path(tmp) / name, overrides,
                                                code=c)[0] for c, name in runs)
        finally:  # prune: a worktree whose folder is gone (a failed remove) leaves no entry behind
            for git in (["worktree", "remove", "--force", str(code)], ["worktree", "prune"]):
                subprocess.run(["git", "-C", str(ROOT), *git], capture_output=True)
    new_s = (before_s + after_s) / 2
    speedup = ref_s / new_s
    return Row("study", what, speedup, "x", f">= x{TARGET:g}", speedup >= TARGET,
               f"whole `kdablate run {study}`, fresh store and cache each: {ref_s:.1f} s vs {new_s:.1f} s "
               f"(this code before and after it: {before_s:.1f} s, {after_s:.1f} s)")
