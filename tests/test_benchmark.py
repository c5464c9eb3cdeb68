"""Smoke test of ``python -m monai_adv.benchmark --quick``: every figure is printed, saved and documented.

No timing is asserted (the figures of a tiny model on a shared machine mean nothing); only that each
figure the issue asks for is measured and reported with its ratio, floor, target and status.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_adv.evaluation.robustness import DEFAULT_EPSILONS

REPO = Path(__file__).resolve().parents[1]
# measured on any device
EXPECTED = [
    "append, FGSM (fused)",
    "append, FGSM + InvFGSM (fused)",
    "replace, fraction 0.5",
    "attached but disabled",
    "before start_epoch",
    "FGSM(...) speed vs hand-written autograd FGSM",
    "5-epsilon sweep speed vs 5 separate attacks",
    "peak memory, append FGSM vs plain",
    "plain, our step vs SupervisedTrainer's",
    "append, FGSM (fused), vs our plain step",
    "append, FGSM + InvFGSM (fused), vs our plain step",
    "replace, fraction 0.5, vs our plain step",
    "attached but disabled, vs our plain step",
    "free mode (one pass per step), vs our plain step",
    "robustness budget: default evaluation in gradient passes",
    "robustness budget: est. minutes, 100 Kvasir-SEG images 64x64",
    "robustness budget: FGSM/InvFGSM rows per gradient pass",
    "3D: append, FGSM (fused)",
    "3D: append, FGSM (fused), vs our plain step",
    "3D: peak memory, append FGSM vs plain",
]
# measured on a CPU only (skipped with --device cuda)
CPU_ONLY = [
    "bf16 autocast, plain step (our step) vs fp32 (CPU)",
    "bf16 autocast, append FGSM (fused) vs fp32 (CPU)",
    "bf16 + channels-last, plain step (our step) vs fp32 (CPU)",
    "bf16 + channels-last, append FGSM (fused) vs fp32 (CPU)",
    "bf16 autocast, FGSM(...) generation vs fp32 (CPU)",
    "bf16 autocast, robustness sweep vs fp32 (CPU)",
]
# measured on a GPU only (skipped, with a ratio of None, on a CPU)
CUDA_ONLY = [
    "peak allocator memory, append FGSM vs plain (CUDA)",
    "3D: peak allocator memory, append FGSM vs plain (CUDA)",
    "AMP bf16 augmented step speed vs fp32 (CUDA)",
]


def test_quick_benchmark_prints_saves_and_documents_every_figure(tmp_path: Path):
    json_path, docs_path = tmp_path / "bench.json", tmp_path / "performance.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "monai_adv.benchmark", "--quick", "--rounds", "1", "--device", "cpu"]
    command += ["--json", str(json_path), "--write-docs", str(docs_path)]
    done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for name in EXPECTED + CPU_ONLY + CUDA_ONLY:
        (line,) = [line for line in lines if line.startswith(name + " ")]
        assert "floor" in line and "target" in line
        assert any(status in line for status in (" met", " NOT met", " skipped"))

    result = json.loads(json_path.read_text())
    figures = {f["name"]: f for f in result["figures"]}
    assert set(EXPECTED + CPU_ONLY + CUDA_ONLY) <= set(figures)
    for name in EXPECTED + CPU_ONLY:  # measured here: a finite positive value, judged against its target
        assert math.isfinite(figures[name]["ratio"]) and figures[name]["ratio"] > 0, name
        assert figures[name]["met"] in (True, False), name
    for name in CUDA_ONLY:
        assert figures[name]["ratio"] is None and figures[name]["met"] is None, name
    assert result["machine"]["device"] == "cpu"
    # the shared sweep: FGSM and InvFGSM at every positive default epsilon from one gradient pass per batch
    rows = 2 * sum(e > 0 for e in DEFAULT_EPSILONS)
    assert figures["robustness budget: FGSM/InvFGSM rows per gradient pass"]["ratio"] == rows
    assert (
        "not the reproduction's network"
        in figures["robustness budget: est. minutes, 100 Kvasir-SEG images 64x64"]["note"]
    )
    assert result["machine"]["cpu_count"] and result["machine"]["torch"]

    docs = docs_path.read_text()
    assert "python -m monai_adv.benchmark --write-docs --quick --device cpu --rounds 1" in docs
    assert "`python -m monai_adv.benchmark --device cuda --write-docs docs/performance_cuda.md`" in docs  # GPU how-to
    assert all(f"| {name}" in docs for name in EXPECTED + CPU_ONLY + CUDA_ONLY)
    assert result["machine"]["platform"] in docs
    assert "Note:" not in docs  # no --note given


@pytest.mark.parametrize("device", ["cuda", "mps", "bogus"])
def test_a_device_the_benchmark_cannot_use_is_a_usage_error(device: str):
    """``--device cuda`` without a GPU (or a device the figures do not support) fails at once, naming the device."""
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "monai_adv.benchmark", "--quick", "--device", device]
    done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and f"--device {device}:" in done.stderr, done.stderr
    assert not done.stdout  # no figure was measured


def test_soak_samples_memory_through_a_real_augmented_training(tmp_path: Path):
    """``--soak N`` trains N fused-append iterations and reports resident memory samples and the growth figure."""
    json_path = tmp_path / "soak.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "monai_adv.benchmark", "--soak", "30", "--quick", "--device", "cpu"]
    command += ["--json", str(json_path)]
    done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("soak: resident memory after 30 ")]
    assert "target <= 1.05" in line
    soak = json.loads(json_path.read_text())
    assert [s[0] for s in soak["samples"]] == [10, 20, 30]  # stopped after exactly 30 iterations
    assert all(s[1] > 0 for s in soak["samples"])
    assert soak["figure"]["ratio"] > 0 and soak["figure"]["met"] in (True, False)
