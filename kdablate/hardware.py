"""What the machine is and can do: the CPU's model and instruction sets, and whether a
low-precision autocast is likely to pay off on it.

bf16 on a CPU is fast only with matrix units for it. Measured on a ResNet-20 training
step (`make bench`, lever rows): x2.0 faster than fp32 on an Intel Xeon with AMX-BF16,
but x0.11 (9x slower) on an AMD EPYC Zen 5 with AVX512-BF16 and no AMX, where
PyTorch's CPU kernels fall back to converting every operand. So a CPU without AMX
gets a warning before bf16 (or fp16) is honoured; the run still does what was asked.
"""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_memory_mib() -> int:
    """Memory the kernel could give new processes now (MemAvailable), in MiB; a large number
    where /proc/meminfo is missing, so that nothing is refused for want of a reading."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 30


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent (pid ``parent``) dies (Linux; elsewhere
    nothing). A local worker must not outlive a ``kill -9`` of its study: left alone it would go on
    training queued cells that nobody collects, beside a rerun of the same study."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def cpu_model() -> str:
    """The CPU's model name (float results differ between CPU models within seed noise)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (Linux; empty elsewhere)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_capability() -> str:
    """The vector ISA PyTorch's CPU kernels dispatch to ('AVX2', 'AVX512', ...)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older builds lack it
        return "unknown"


def amp_warning(device: str, amp: str, flags: frozenset[str] | None = None) -> str | None:
    """A one-line warning when ``--amp`` on this device is likely slower than fp32, else None.

    Only the CPU is judged: bf16 and fp16 autocast pay off there with AMX (the flags
    ``amx_bf16`` / ``amx_fp16``), and were measured up to 9x slower without it."""
    if amp == "none" or not device.startswith("cpu"):
        return None
    flags = cpu_flags() if flags is None else flags
    unit = {"bf16": "amx_bf16", "fp16": "amx_fp16"}.get(amp)
    if unit is None or unit in flags:
        return None
    return (f"warning: --amp {amp} on this CPU ({cpu_model()}, {cpu_capability()}, no {unit.upper()}) is likely "
            f"slower than fp32 (a ResNet-20 step was 9x slower with bf16 on an AMD EPYC without AMX); "
            f"run `make bench` to see the lever rows here, or use --amp none")
