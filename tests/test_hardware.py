"""What the machine line and the bfloat16 warning read from ``/proc/cpuinfo``."""

from __future__ import annotations

import pytest

from monai_adv import hardware

XEON = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2\n"


@pytest.mark.parametrize(
    "cpuinfo, flags, text, native",
    [
        (XEON, ("amx_bf16", "amx_tile", "avx512_bf16"), "amx_bf16, amx_tile, avx512_bf16", True),
        (EPYC, (), "none", False),
        (None, None, "unknown", None),
    ],
)
def test_bf16_instructions_come_from_the_cpu_flags(monkeypatch, cpuinfo, flags, text, native):
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: cpuinfo)
    assert hardware.cpu_bf16_instructions() == flags
    assert hardware.cpu_bf16_text() == text
    assert hardware.cpu_has_native_bf16() is native


def test_machine_summary_names_the_model_and_its_bf16_instructions(monkeypatch):
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: EPYC)
    summary = hardware.machine_summary()
    assert summary.startswith("AMD EPYC, ")
    assert "(bf16 instructions: none)" in summary
    assert "torch " in summary and "MONAI " in summary


def test_cpu_model_falls_back_to_platform_without_cpuinfo(monkeypatch):
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: None)
    monkeypatch.setattr(hardware.platform, "processor", lambda: "")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "aarch64")
    assert hardware.cpu_model() == "aarch64"
