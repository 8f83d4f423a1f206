"""Study rows and memory: 1 worker against 2 on a small study, and peak RSS, each in a subprocess.

A study runs through the CLI (``python -m kdablate.cli run``) into a temporary
MLflow store and cache, so it never touches the project's ``mlruns.db``. Peak
RSS is the largest sum of VmRSS over the subprocess and its descendants
(workers), sampled from /proc every 50 ms; where /proc is missing, the largest
single process's ``ru_maxrss``.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kdablate.bench_core import Row, Scale

STUDY = """\
description: kdablate bench, {cells} cells.
base:
  data: {{name: mnist1d, num_samples: {samples}}}
  student: {{name: mlp}}
  optim: {{epochs: {epochs}}}
seeds: {seeds}
arms:
  - {{name: ce, mass: none, alpha: 0.0}}
  - {{name: ls, mass: {{name: constant, eps: 0.1}}, structure: uniform, alpha: 1.0}}
"""

RESNET_CELL = """\
import torch
from kdablate.bench_core import synthetic
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.trainer import fit
torch.set_num_threads(1)
data = synthetic(10, (3, {size}, {size}), {n}, uint8=True, augment="crop_flip")
fit(ModelSpec(name="resnet20"), data, OptimConfig(epochs=1, batch_size={batch}), KnowledgeConfig(), 0)
"""


def write_study(folder: Path, cells: int, epochs: int, samples: int = 5000) -> Path:
    """A study of ``cells`` cells (2 arms x cells/2 seeds) on the default data, no teacher."""
    path = folder / f"bench{cells}.yaml"
    path.write_text(STUDY.format(cells=cells, samples=samples, epochs=epochs, seeds=list(range(max(1, cells // 2)))))
    return path


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in children(k)]


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``cmd`` to completion; (wall seconds, peak RSS of it and its descendants in MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(rss_kib(p) for p in [proc.pid, *children(proc.pid)]))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read()[-2000:]}")
    if peak == 0:  # no /proc: the largest single process
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak / 1024


def run_study(study: Path, workers: int, folder: Path) -> tuple[float, float]:
    """The study through the CLI with ``workers`` workers into a fresh store; (wall s, peak MiB)."""
    store = folder / f"w{workers}-{time.time_ns()}"
    store.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlruns.db"}
    cmd = [sys.executable, "-m", "kdablate.cli", "run", str(study), "--workers", str(workers), "--no-progress",
           "--checkpoint-every", "0", "--device", "cpu", "--cache-dir", str(store / "cache")]
    return run_measured(cmd, env)


def study_rows(scale: Scale) -> list[Row]:
    """8 cells with 1 and with 2 workers (wall time, peak RSS), and one cell's peak RSS."""
    with tempfile.TemporaryDirectory(prefix="kdablate-bench-") as tmp:
        folder = Path(tmp)
        study = write_study(folder, scale.study_cells, scale.study_epochs)
        one_s, one_mib = run_study(study, 1, folder)
        two_s, two_mib = run_study(study, 2, folder)
        _, cell_mib = run_study(write_study(folder, 1, 2), 1, folder)
    cores = os.cpu_count() or 1
    return [
        Row("study", f"{scale.study_cells} cells, 2 workers vs 1 worker", one_s / two_s, "x", "reported", None,
            f"speedup; {one_s:.1f} s vs {two_s:.1f} s, {cores} cores"),
        Row("memory", "peak RSS, one cell, default data", cell_mib, "MiB", "< 1024 MiB", cell_mib < 1024,
            "the whole `kdablate run` process (MLflow included)"),
        Row("memory", f"peak RSS, study of {scale.study_cells} cells, 2 workers", two_mib, "MiB", "reported", None,
            f"main process + workers; 1 worker: {one_mib:.0f} MiB"),
    ]


def resnet_memory_row(scale: Scale) -> Row:
    """Peak RSS of a ResNet-20 cell (one epoch, crop + flip) at the bench's batch size."""
    code = RESNET_CELL.format(size=scale.image_size, n=4 * scale.batch, batch=scale.batch)
    _, mib = run_measured([sys.executable, "-c", code])
    return Row("memory", f"peak RSS, ResNet-20 cell, batch {scale.batch}, CPU", mib, "MiB", "< 4096 MiB", mib < 4096,
               "fit(): 1 epoch of uint8 32x32x3 images" if scale.image_size == 32 else "")
