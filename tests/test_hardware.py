"""What the machine can do: the bf16-on-CPU warning (kdablate.hardware)."""
from __future__ import annotations

from kdablate import hardware


def test_bf16_on_a_cpu_without_amx_warns():
    msg = hardware.amp_warning("cpu", "bf16", frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert msg is not None and "no AMX_BF16" in msg and "--amp none" in msg and "\n" not in msg


def test_bf16_with_amx_on_a_gpu_or_in_fp32_does_not_warn():
    assert hardware.amp_warning("cpu", "bf16", frozenset({"amx_bf16", "amx_tile"})) is None
    assert hardware.amp_warning("cuda", "bf16", frozenset()) is None
    assert hardware.amp_warning("cpu", "none", frozenset()) is None
    assert hardware.amp_warning("cpu", "fp16", frozenset({"amx_fp16"})) is None


def test_this_machine_is_described():
    assert hardware.cpu_model() and hardware.cpu_capability()
    assert isinstance(hardware.cpu_flags(), frozenset)


def test_cells_are_placed_round_robin_on_several_gpus():
    from kdablate.runner import placements

    assert placements(5, "cuda", 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert placements(3, "cuda", 1) == ["cuda"] * 3  # one GPU: N workers share it
    assert placements(2, "cuda:1", 4) == ["cuda:1"] * 2  # an explicit index is kept
    assert placements(2, "cpu", 4) == ["cpu"] * 2


def test_ray_tasks_request_a_fraction_of_a_gpu_only_on_cuda(monkeypatch):
    import torch

    from kdablate.runner import RunOptions, ray_resources

    assert ray_resources(RunOptions(device="cpu", threads=2)) == {"num_cpus": 2, "num_gpus": 0.0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ray_resources(RunOptions(device="auto", gpus_per_cell=0.5)) == {"num_cpus": 1, "num_gpus": 0.5}
    # A stack of seeds does its seeds' work: a fraction per seed, at most one GPU.
    assert ray_resources(RunOptions(device="cuda", gpus_per_cell=0.25), cells=3) == {"num_cpus": 1, "num_gpus": 0.75}
    assert ray_resources(RunOptions(device="cuda", gpus_per_cell=0.25), cells=10)["num_gpus"] == 1.0


def test_auto_workers_take_a_core_each_while_each_gets_two_units(monkeypatch):
    from kdablate.runner import RunOptions, auto_workers, resolve
    from kdablate.trainer import Runtime

    monkeypatch.setattr(hardware, "usable_cores", lambda: 4)
    monkeypatch.setattr(hardware, "available_memory_mib", lambda: 64 * 1024)
    cpu = Runtime("cpu")
    assert [auto_workers(u, cpu) for u in (0, 1, 3, 4, 8, 80)] == [1, 1, 1, 2, 4, 4]
    assert auto_workers(80, Runtime("cuda")) == 1  # a GPU's cells already run side by side
    assert auto_workers(80, cpu, passes=1_000_000) == 1  # too little work for a second start-up
    assert auto_workers(80, cpu, threads=2) == 2  # --threads 2 given: a worker per two cores
    monkeypatch.setattr(hardware, "available_memory_mib", lambda: 2500)  # two workers' worth
    assert auto_workers(80, cpu) == 2
    # resolve: auto gives each worker its share of the cores; an explicit count is kept.
    opts = resolve(RunOptions(workers=0, device="cpu"), units=8)
    assert (opts.workers, opts.threads) == (2, 2)
    assert (resolve(RunOptions(workers=3, device="cpu"), units=8).workers) == 3


def test_training_passes_weigh_epochs_by_training_samples():
    from kdablate.config import CellConfig
    from kdablate.runner import training_passes

    a = CellConfig(arm="a", seed=0, data={"name": "mnist1d", "params": {"num_samples": 1000}}, optim={"epochs": 3})
    b = CellConfig(arm="b", seed=0, data={"name": "mnist1d", "params": {"num_samples": 5000}}, optim={"epochs": 2})
    assert training_passes([a, a, b]) == 2 * 3 * 720 + 2 * 3600  # 720 and 3600 training samples


def test_available_memory_is_read():
    assert hardware.available_memory_mib() > 0


def test_a_zombie_process_is_not_alive():
    """A killed study's workers may stay zombies where PID 1 reaps no orphans: not alive, so a
    rerun resumes their cells instead of waiting for them."""
    import os
    import subprocess
    import sys
    import time

    from kdablate.tracking import _pid_alive

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while time.time() < deadline and _pid_alive(proc.pid):  # exited, not waited for: a zombie
        time.sleep(0.05)
    assert not _pid_alive(proc.pid)
    os.kill(proc.pid, 0)  # the pid still exists: only its state says it is dead
    proc.wait()
    assert _pid_alive(os.getpid())
