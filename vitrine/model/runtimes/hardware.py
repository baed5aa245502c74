"""What this CPU can do fast, read from the instruction flags at run time (never assumed)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty elsewhere, which means "assume nothing"."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_bf16() -> bool:
    """bf16 dot products in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def native_int8() -> bool:
    """int8 dot products in hardware (AVX512-VNNI, AVX-VNNI or AMX-INT8), which int8 kernels need to win."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def describe() -> dict[str, bool]:
    return {"bf16": native_bf16(), "int8": native_int8(), "amx": "amx_tile" in cpu_flags()}
