"""Smoke test of ``python -m monai_adv.benchmark --quick``: every figure is printed, saved and documented.

No timing is asserted (the figures of a tiny model on a shared machine mean nothing); only that each
figure the issue asks for is measured and reported with its ratio, floor, target and status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPECTED = [
    "append, FGSM (fused)",
    "append, FGSM + InvFGSM (fused)",
    "replace, fraction 0.5",
    "attached but disabled",
    "before start_epoch",
    "FGSM(...) speed vs hand-written autograd FGSM",
    "5-epsilon sweep speed vs 5 separate attacks",
    "peak memory, append FGSM vs plain",
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
    for name in EXPECTED:
        (line,) = [line for line in lines if line.startswith(name + " ")]
        assert "floor" in line and "target" in line
        assert any(status in line for status in (" met", " NOT met", " skipped"))

    result = json.loads(json_path.read_text())
    figures = {f["name"]: f for f in result["figures"]}
    assert set(EXPECTED) <= set(figures)
    for name in EXPECTED[:-1]:  # everything but the CUDA-only figure is measured on the CPU
        assert figures[name]["ratio"] > 0 and figures[name]["met"] in (True, False)
    assert figures[EXPECTED[-1]]["met"] is None or result["machine"]["device"].startswith("cuda")
    assert result["machine"]["cpu_count"] and result["machine"]["torch"]

    docs = docs_path.read_text()
    assert "python -m monai_adv.benchmark --write-docs --quick" in docs
    assert all(f"| {name}" in docs for name in EXPECTED)
    assert result["machine"]["platform"] in docs
    assert "Note:" not in docs  # no --note given


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
