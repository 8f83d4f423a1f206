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
