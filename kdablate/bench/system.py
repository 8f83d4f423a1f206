"""Study rows and memory: 1 worker against 2 on a small study, and peak RSS, each in a subprocess.

A study runs through the CLI (``python -m kdablate.cli run``) into a temporary
MLflow store and cache, so it never touches the project's ``mlruns.db``. Peak
memory is the largest sum over the subprocess and its descendants (workers) of
RSS and anonymous memory, sampled from /proc every 50 ms, and of PSS as the RSS grows and
every 2 s (its read is costly; ``MemoryWatch``); where /proc is missing, the largest single
process's ``ru_maxrss``.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kdablate.bench.core import Row, Scale

STUDY = """\
description: kdablate bench, {cells} cells.
base:
  data: {{name: mnist1d, num_samples: {samples}}}
  student: {{name: mlp}}
  optim: {{epochs: {epochs}}}
  teacher: null
seeds: {seeds}
arms:
  - {{name: ce, mass: none, alpha: 0.0}}
"""
LS_ARM = "  - {name: ls, mass: {name: constant, eps: 0.1}, structure: uniform, alpha: 1.0}\n"

RESNET_CELL = """\
import torch
from kdablate.bench.core import synthetic
from kdablate.config import KnowledgeConfig, ModelSpec, OptimConfig
from kdablate.trainer import fit
torch.set_num_threads(1)
data = synthetic(10, (3, {size}, {size}), {n}, uint8=True, augment="crop_flip")
fit(ModelSpec(name="resnet20"), data, OptimConfig(epochs=1, batch_size={batch}), KnowledgeConfig(), 0)
"""


def write_study(folder: Path, cells: int, epochs: int, samples: int = 5000) -> Path:
    """A study of ``cells`` cells on the default data, no teacher: CE, and label smoothing
    for an even number of cells, cells / arms seeds each."""
    arms = 2 if cells % 2 == 0 else 1
    text = STUDY.format(cells=cells, samples=samples, epochs=epochs, seeds=list(range(cells // arms)))
    path = folder / f"bench{cells}.yaml"
    path.write_text(text + (LS_ARM if arms == 2 else ""))
    return path


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in children(k)]


def memory_kib(pid: int, pss: bool = True) -> tuple[int, int, int]:
    """(RSS, PSS, anonymous) of a process in KiB, from /proc (zeros where it is gone or missing;
    PSS 0 unless ``pss``).

    RSS counts shared library pages in full in every process; PSS splits them among the
    processes that map them (so PSS adds up across workers); anonymous is the process's own heap.
    RSS and anonymous come from ``status``: the kernel's counters, ~0.1 ms a read, which proc(5)
    calls inexact (per-CPU counts are folded in lazily). PSS comes from
    ``smaps_rollup``, exact but a walk of the page tables: ~12 ms a read of one torch process here.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split()[:2] for line in f if line.startswith(("VmRSS:", "RssAnon:")))
        if pss:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields.update(line.split()[:2] for line in f if line.startswith("Pss:"))
    except (OSError, ValueError):
        return 0, 0, 0
    return int(fields.get("VmRSS:", 0)), int(fields.get("Pss:", 0)), int(fields.get("RssAnon:", 0))


# smaps_rollup costs ~12 ms a read of a torch process: read every 50 ms it took a quarter of a core
# per watched process and slowed a 2-worker study sharing 2 cores with the watcher by a fifth. PSS
# is read when the summed RSS has grown by 5 % since the last read (at most every PSS_MIN_S, so the
# rise to a peak is followed) and every PSS_MAX_S otherwise.
PSS_MIN_S, PSS_MAX_S, PSS_GROWTH = 0.25, 2.0, 1.05


class MemoryWatch:
    """Peaks of the summed (RSS, PSS, anonymous) KiB of a process tree, one ``sample`` at a time."""

    def __init__(self, root: int) -> None:
        self.root, self.peak = root, [0, 0, 0]
        self.pss_at, self.pss_rss = -float("inf"), 0

    def sample(self) -> None:
        pids = [self.root, *children(self.root)]
        usage = [memory_kib(p, pss=False) for p in pids]
        rss, now = sum(u[0] for u in usage), time.monotonic()
        since = now - self.pss_at
        if since >= PSS_MAX_S or (since >= PSS_MIN_S and rss > PSS_GROWTH * self.pss_rss):
            usage = [memory_kib(p) for p in pids]
            self.pss_at, self.pss_rss = now, sum(u[0] for u in usage)
        self.peak = [max(old, sum(u[i] for u in usage)) for i, old in enumerate(self.peak)]


def run_measured(cmd: list[str], env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> tuple[float, dict[str, float]]:
    """Run ``cmd`` to completion: wall seconds, and the peaks of the summed RSS, PSS and anonymous
    memory (MiB) of it and its descendants (``MemoryWatch``: RSS every 50 ms, PSS as it grows). The
    command is killed if this is interrupted, so it never runs on in a folder being deleted."""
    # stderr to a file, not a pipe: a long study's warnings would fill a pipe nobody reads until the end.
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        watch = MemoryWatch(proc.pid)
        try:
            while proc.poll() is None:
                watch.sample()
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed: {err.read()[-2000:]}")
    peak = watch.peak
    if peak[0] == 0:  # no /proc: the largest single process
        peak[0] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, dict(zip(("rss", "pss", "anon"), (k / 1024 for k in peak)))


def run_cli(study: Path, store: Path, options: tuple[str, ...] = (),
            code: Path | None = None) -> tuple[float, dict[str, float]]:
    """``kdablate run study`` on the CPU with ``options``, from ``code``'s ``kdablate`` (first on
    ``PYTHONPATH``) where given, else this one, in and into ``store``: a fresh folder for its MLflow
    store and cache; (wall s, peak MiB)."""
    store.mkdir(parents=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlruns.db"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    cmd = [sys.executable, "-m", "kdablate.cli", "run", str(study), "--no-progress", "--device", "cpu",
           "--cache-dir", str(store / "cache"), *options]  # last: an option given twice takes its last value
    return run_measured(cmd, env, cwd=store)


def run_study(study: Path, workers: int, folder: Path, checkpoint: str = "0",
              extra: tuple[str, ...] = ()) -> tuple[float, dict[str, float]]:
    """The study through the CLI with ``workers`` workers (and ``extra`` options) into a fresh
    store ``folder/last``; (wall s, peak MiB)."""
    store = folder.resolve() / "last"
    if store.exists():
        store.rename(folder.resolve() / f"w{workers}-{time.time_ns()}")
    return run_cli(study.resolve(), store, ("--workers", str(workers), "--checkpoint-every", checkpoint, *extra))


def overhead_rows(scale: Scale, cells: int = 4) -> list[Row]:
    """Where a default cell's time goes: ``cells`` CE cells of the default data (MNIST-1D, MLP,
    ``study_epochs`` epochs, batch 128) through the CLI in one process, as a study runs them
    (default checkpointing). Rows: the training steps' share of the cells' wall time (the rest is
    evaluation, diagnostics and MLflow writes, per epoch), and the process's one-time start-up
    (imports, generating the data, the store) against one cell."""
    from kdablate import tracking

    with tempfile.TemporaryDirectory(prefix="kdablate-bench-") as tmp:
        folder = Path(tmp)
        wall, _ = run_study(write_study(folder, cells, scale.study_epochs), 1, folder, checkpoint="60s")
        client = tracking.client(f"sqlite:///{folder.resolve() / 'last'}/mlruns.db")
        runs = tracking.search_cells(client, tracking.experiment_id(client, f"bench{cells}"), "FINISHED")
        steps = 3600 // 128  # the default data's training split in batches of 128
        train_s = sum(m.value for r in runs for m in client.get_metric_history(r.info.run_id, "time/step_ms"))
        train_s *= steps / 1000
        cell_s = sum(r.data.metrics["time/wall_s"] for r in runs)
    share = 100 * train_s / cell_s
    return [Row("study", "training steps' share of a default cell's wall time", share, "%", ">= 50 %", share >= 50,
                f"{cells} cells in one process: {train_s:.1f} s of steps in {cell_s:.1f} s of cells; the rest: "
                "per-epoch evaluation (train, val, test), diagnostics, MLflow writes"),
            Row("study", "one-time start-up of a study process vs one default cell", (wall - cell_s) / (cell_s / cells),
                "x", "reported", None, f"{wall - cell_s:.1f} s outside the cells (imports, MNIST-1D generation, "
                                       f"store) of a {wall:.1f} s process")]


def study_rows(scale: Scale) -> list[Row]:
    """8 cells with 1 and with 2 workers (wall time, peak RSS), and one cell's peak RSS."""
    with tempfile.TemporaryDirectory(prefix="kdablate-bench-") as tmp:
        folder = Path(tmp)
        study = write_study(folder, scale.study_cells, scale.study_epochs)
        one_s, one = run_study(study, 1, folder)
        two_s, two = run_study(study, 2, folder)
        _, cell = run_study(write_study(folder, 1, 2), 1, folder)
    cores = os.cpu_count() or 1
    return [
        Row("study", f"{scale.study_cells} cells, 2 workers vs 1 worker", one_s / two_s, "x", "reported", None,
            f"speedup; {one_s:.1f} s vs {two_s:.1f} s, {cores} cores"),
        Row("memory", "peak RSS, one cell, default data", cell["rss"], "MiB", "< 1024 MiB", cell["rss"] < 1024,
            f"the `kdablate run` process, MLflow included; own heap {cell['anon']:.0f} MiB"),
        Row("memory", f"peak RSS, study of {scale.study_cells} cells, 2 workers", two["rss"], "MiB", "reported", None,
            f"main + 2 workers; PSS {two['pss']:.0f} MiB (shared pages once), 1 worker: RSS {one['rss']:.0f} MiB"),
    ]


def resnet_memory_row(scale: Scale) -> Row:
    """Peak RSS of a ResNet-20 cell (one epoch, crop + flip) at the bench's batch size."""
    code = RESNET_CELL.format(size=scale.image_size, n=4 * scale.batch, batch=scale.batch)
    _, mem = run_measured([sys.executable, "-c", code])
    return Row("memory", f"peak RSS, ResNet-20 cell, batch {scale.batch}, CPU", mem["rss"], "MiB", "< 4096 MiB",
               mem["rss"] < 4096, f"fit(), 1 epoch, uint8 images, crop+flip; own heap {mem['anon']:.0f} MiB")
