"""Where units of work run: in this process, in local worker processes (spawned, dying with
the study's process), or as Ray tasks on a cluster.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from kdablate import hardware
from kdablate.compose import import_plugins
from kdablate.config import CellConfig
from kdablate.runner.cells import run_unit
from kdablate.runner.options import CellOutcome, RunOptions


def init_worker(threads: int, plugins: tuple[str, ...] = (), plugin_dir: str = "", parent: int = 0) -> None:
    if parent:  # a local worker process: it goes when the study's process goes, however it goes
        hardware.die_with_parent(parent)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    if plugins:  # a spawned worker or a Ray task starts without the study's own components
        import_plugins(list(plugins), Path(plugin_dir or "."))


def run_sequential(units: list[list[CellConfig]], args: tuple, opts: RunOptions):
    for unit in units:
        yield from run_unit(unit, *args, opts)


def run_processes(units: list[list[CellConfig]], args: tuple, opts: RunOptions):
    import concurrent.futures as cf
    import multiprocessing as mp

    # spawn, not fork: forking a process that already runs torch / OpenMP threads is unsafe.
    with cf.ProcessPoolExecutor(opts.workers, mp_context=mp.get_context("spawn"), initializer=init_worker,
                                initargs=(opts.threads, opts.plugins, opts.plugin_dir, os.getpid())) as pool:
        devices = placements(len(units), opts.runtime().device, torch.cuda.device_count())
        futures = [pool.submit(run_unit, unit, *args, dataclasses.replace(opts, device=d))
                   for unit, d in zip(units, devices)]
        try:
            for future in cf.as_completed(futures):
                yield from future.result()
        except KeyboardInterrupt:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def placements(n_cells: int, device: str, n_gpus: int) -> list[str]:
    """Each cell's device: with ``cuda`` (no index) and several GPUs, round-robin over
    cuda:0..n-1 in submission order, so N workers spread over the GPUs; else ``device``."""
    if device != "cuda" or n_gpus <= 1:
        return [device] * n_cells
    return [f"cuda:{i % n_gpus}" for i in range(n_cells)]


def ray_resources(opts: RunOptions, cells: int = 1) -> dict[str, float]:
    """What a Ray task of a unit of ``cells`` cells (one, or a stack's seeds) asks for: its threads,
    and on CUDA a fraction of a GPU per cell, at most one GPU (a small cell uses a sliver of one:
    gpu-check measured under 400 MiB for a resnet8 cell), so Ray packs several cells per GPU; Ray
    then sets CUDA_VISIBLE_DEVICES, and 'cuda' is the GPU it chose."""
    gpus = min(1.0, opts.gpus_per_cell * cells) if opts.runtime().device.startswith("cuda") else 0.0
    return {"num_cpus": opts.threads or 1, "num_gpus": gpus}


def run_ray(units: list[list[CellConfig]], args: tuple, opts: RunOptions):
    import ray

    ray.init(address=opts.address, log_to_driver=False, ignore_reinit_error=True)
    task = ray.remote(ray_unit)
    pending = [task.options(**ray_resources(opts, len(unit))).remote(unit, *args, opts) for unit in units]
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield from ray.get(ready[0])
    finally:
        ray.shutdown()


def ray_unit(cells: list[CellConfig], exp_id: str, parent: str, tags: dict[str, str],
              opts: RunOptions) -> list[CellOutcome]:
    init_worker(opts.threads, opts.plugins, opts.plugin_dir)
    return run_unit(cells, exp_id, parent, tags, opts)