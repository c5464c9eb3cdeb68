"""What the CPU this process runs on can do, for warnings and for the machine line of benchmarks and studies.

bfloat16 autocast on a CPU is fast only where the CPU has bfloat16 instructions (AVX-512 BF16 or AMX); elsewhere
oneDNN emulates it, and a 3D training step of the hippocampus profile took 15 s instead of 0.5 s in float32 on an
AVX2-only AMD EPYC. Linux reports the instruction sets in ``/proc/cpuinfo``; on other systems they are unknown.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

__all__ = [
    "BF16_INSTRUCTIONS",
    "cpu_bf16_instructions",
    "cpu_bf16_text",
    "cpu_has_native_bf16",
    "cpu_model",
    "machine_summary",
]

#: the ``/proc/cpuinfo`` flags of the instruction sets that run bfloat16 natively
BF16_INSTRUCTIONS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what :mod:`platform` knows where that file is absent."""
    text = _cpuinfo()
    for line in (text or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_bf16_instructions() -> tuple[str, ...] | None:
    """The CPU's bfloat16 instruction sets among ``avx512_bf16``, ``amx_bf16`` and ``amx_tile``.

    Returns:
        the flags found (sorted; empty when there is none), or None where ``/proc/cpuinfo`` cannot be read.
    """
    text = _cpuinfo()
    if text is None:
        return None
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    return tuple(sorted(flags & (BF16_INSTRUCTIONS | {"amx_tile"})))


def cpu_bf16_text() -> str:
    """:func:`cpu_bf16_instructions` as text: the flags joined by commas, ``none``, or ``unknown``."""
    found = cpu_bf16_instructions()
    return "unknown" if found is None else (", ".join(found) or "none")


def cpu_has_native_bf16() -> bool | None:
    """Whether the CPU runs bfloat16 natively (True/False), or None where that cannot be told."""
    found = cpu_bf16_instructions()
    return None if found is None else bool(BF16_INSTRUCTIONS.intersection(found))


def machine_summary() -> str:
    """One line: CPU model, logical CPUs, bfloat16 instructions, GPU, and the versions of Python, torch and MONAI."""
    import monai
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs (bf16 instructions: {cpu_bf16_text()}), {device}; Python "
            f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"MONAI {monai.__version__}")  # fmt: skip
