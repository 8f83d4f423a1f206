"""Worker sizing and the checks made before any cell trains: the device exists, the workers and
threads fit the cores and memory (``--workers auto``), the cache and store folders can hold the
study, and the study's finished cells share this run's device, precision and code.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import torch

from kdablate import hardware, tracking
from kdablate.checks import data_facts
from kdablate.config import CellConfig
from kdablate.registry import ConfigError
from kdablate.runner.options import RunOptions
from kdablate.study import Study
from kdablate.trainer import Runtime


def check_device(device: str) -> str | None:
    """Why ``device`` cannot run here (None if it can): the CLI says so in one line, exit 2."""
    if device in ("auto", "cpu"):
        return None
    if not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        return f"--device '{device[:40]}' is not one of auto, cpu, cuda, cuda:N"
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"--device {device}: CUDA is not available here (torch {torch.__version__}, {build}); use --device cpu"
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0..."
    return None


# A worker's peak resident memory, rounded up: the one-cell peak RSS row of ``make bench`` read 936 MiB.
WORKER_MIB = 1024


# Training passes (epochs x training samples, summed over cells) below which one worker is used:
# a worker's start-up (~5 s of imports) outweighs what it takes over. The 8-cell bench grid
# (1.2 M) was no faster on 2 workers; the components study (11.5 M) was x1.26 faster.
AUTO_MIN_PASSES = 4_000_000


def resolve_paths(opts: RunOptions) -> RunOptions:
    """Absolute cache folder and store URI: workers may start elsewhere."""
    return dataclasses.replace(opts, cache_dir=Path(opts.cache_dir).resolve(), uri=opts.uri or tracking.tracking_uri())


def resolve(opts: RunOptions, units: int = 1, passes: int = AUTO_MIN_PASSES) -> RunOptions:
    """``resolve_paths``, the workers (``auto_workers`` when 0) for ``units`` units of work, and
    threads so that workers x threads <= cores."""
    cores = hardware.usable_cores()
    workers = opts.workers or (auto_workers(units, opts.runtime(), passes, opts.threads)
                               if opts.executor == "local" else 1)
    # By default each local worker takes its share of the cores: a stack of 10 MLP seeds is
    # x1.3 faster on 2 threads than on 1, and a single small cell is no slower (measured here).
    threads = opts.threads or (1 if opts.executor == "ray" else max(1, cores // workers))
    if opts.executor == "local" and workers * threads > cores and opts.threads:
        threads = max(1, cores // workers)
        print(f"note: {workers} workers x {opts.threads} threads > {cores} cores; using {threads} thread(s) each")
    return dataclasses.replace(resolve_paths(opts), workers=workers, threads=threads)


def training_passes(cells: list[CellConfig]) -> int:
    """Sum over ``cells`` of epochs x training samples (from the study's checks, memoised per dataset)."""
    return sum(c.optim.epochs * data_facts(c).shape.n_train for c in cells)


def auto_workers(units: int, runtime: Runtime, passes: int = AUTO_MIN_PASSES, threads: int = 0) -> int:
    """``--workers auto``: on a CPU, one process per core (per ``threads`` cores when they are given)
    while each gets at least two units of work, the study has ``AUTO_MIN_PASSES`` training passes
    or more, and memory allows; one on a GPU (several GPUs: ask for N workers to place cells
    round-robin). The components study (8 stacks, 2-core EPYC) took 147 s on 2 workers, 185 s on 1."""
    if torch.device(runtime.device).type != "cpu" or passes < AUTO_MIN_PASSES:
        return 1
    memory = hardware.available_memory_mib() // WORKER_MIB
    return max(1, min(hardware.usable_cores() // max(threads, 1), units // 2, memory))


def check_precision(client: tracking.MlflowClient, exp_id: str, study: Study, runtime: Runtime) -> None:
    """Refuse (ConfigError) to add cells to a study whose finished cells ran on another device type
    or precision: one table must not silently mix fp32 and bf16, or CPU and GPU numbers."""
    mine = (runtime.device.split(":")[0], runtime.amp)
    hashes = {c.config_hash() for c in study.cells}
    found: dict[tuple[str, str], int] = {}
    for run in tracking.search_cells(client, exp_id, "FINISHED"):
        tags = run.data.tags
        if tags.get("config_hash") in hashes and tracking.tag(tags, "env.device"):
            other = (tracking.tag(tags, "env.device").split(":")[0].split(" ")[0], tracking.tag(tags, "env.amp", "none"))
            found[other] = found.get(other, 0) + 1
    clash = {k: n for k, n in found.items() if k != mine}
    if clash:
        (device, amp), n = next(iter(clash.items()))
        raise ConfigError(f"study {study.name}: {n} finished cell(s) ran on {device} with --amp {amp}, this run "
                          f"would use {mine[0]} with --amp {mine[1]}; rerun with --device {device} --amp {amp}, "
                          "or use a new store (MLFLOW_TRACKING_URI) to keep the precisions apart")


def check_code(client: tracking.MlflowClient, exp_id: str, study: Study) -> None:
    """Refuse (ConfigError) to add cells to a study whose finished cells another code version made
    (kdablate's source or a plugin's differs, or was not recorded): one table must not silently
    mix two versions of the code. ``--allow-mixed-code`` adds them anyway; the report then warns."""
    mine = tracking.code_state(study.plugins)
    hashes = {c.config_hash() for c in study.cells}
    found: dict[tuple[str, ...], tuple[int, str]] = {}
    for run in tracking.search_cells(client, exp_id, "FINISHED"):
        tags = run.data.tags
        if tags.get("config_hash") in hashes:
            other = tuple(tracking.tag(tags, tracking.ENV + t, "unknown") for t in tracking.CODE_TAGS)
            n, _ = found.get(other, (0, ""))
            found[other] = (n + 1, tracking.tag(tags, "env.git_commit", "unknown")[:12])
    clash = {k: v for k, v in found.items() if k != tuple(mine[t] for t in tracking.CODE_TAGS)}
    if clash:
        (code, plugins), (n, commit) = next(iter(clash.items()))
        raise ConfigError(f"study {study.name}: {n} finished cell(s) were made by other code (source {code}, plugins "
                          f"{plugins}, commit {commit}); this code is source {mine['code_sha256']}, plugins "
                          f"{mine['plugins_sha256']}: rerun them, use a new store (MLFLOW_TRACKING_URI), or add "
                          "cells anyway with --allow-mixed-code (the report warns)")


MIN_FREE_MIB = 200  # below this a cache or store folder is refused before any cell trains


def check_places(opts: RunOptions) -> None:
    """The cache's folders and the store's folder can hold a study's files (``check_folder``)."""
    for sub in ("", "teachers", "checkpoints"):
        check_folder(Path(opts.cache_dir) / sub, "the cache (--cache-dir, KDABLATE_CACHE)")
    db = tracking.sqlite_path(opts.uri)
    if db is not None:
        check_folder(db.parent, "the MLflow store's folder (MLFLOW_TRACKING_URI)")


def check_folder(path: Path, what: str) -> None:
    """ConfigError (the CLI's exit 2) when ``path`` cannot hold a study's files: not a folder,
    not writable, or nearly full, so no cell starts only to fail on its first write."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder; point {what} elsewhere")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write {what} {path}: {e.strerror or e}; make it writable or point it elsewhere") from None
    free = shutil.disk_usage(path).free / 2**20
    if free < MIN_FREE_MIB:
        raise ConfigError(f"{what} {path} has only {free:.0f} MiB free (need {MIN_FREE_MIB}); free space or point it elsewhere")