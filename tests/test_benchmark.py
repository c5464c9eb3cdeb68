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
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from monai_adv.attacks import run_attack
from monai_adv.evaluation.robustness import DEFAULT_EPSILONS
from monai_adv.transforms import FGSM, InvFGSM

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


# The single-step path FGSM(...) takes (benchmark figure "FGSM(...) speed vs hand-written autograd FGSM") must give
# run_attack's images, losses, errors and warnings: here the transform against run_attack on the same inputs.
_SINGLE_STEP_CASES = [
    {},
    {"clamp": "image"},
    {"clamp": "none", "network_mode": "train"},
    {"value_range": (0.1, 0.9), "network_mode": "unchanged"},
    {"amp": True},
    {"dtype": torch.float64},
    {"dtype": torch.float64, "value_range": (0.1, 0.9)},
    {"epsilon": 0.0},
    {"labels": "long"},
    {"labels": "bool"},
    {"labels": "no channel", "loss": "ce"},
    {"slightly_outside": True},  # within the range check's tolerance: the core clamps before the gradient
]


def _single_step_inputs(case: dict, make_basic_unet, make_square_data):
    dtype = case.get("dtype", torch.float32)
    images, labels = make_square_data(batch=3, size=32, dtype=dtype)
    if "value_range" in case:
        low, high = case["value_range"]
        images = low + (high - low) * images
    if case.get("slightly_outside"):
        images[0, 0, 0, 0], images[1, 0, 3, 3] = 1.00005, -0.00005
    labels = {"long": labels.long(), "bool": labels.bool(), "no channel": labels[:, 0].long()}.get(
        case.get("labels"), labels
    )
    loss = nn.CrossEntropyLoss() if case.get("loss") == "ce" else None
    return make_basic_unet(seed=1).to(dtype), images, labels, loss


@pytest.mark.parametrize(
    "case", _SINGLE_STEP_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"
)
@pytest.mark.parametrize("cls", [FGSM, InvFGSM])
def test_fgsm_single_step_path_gives_run_attacks_result(
    cls, case, make_basic_unet, make_square_data, make_dicece, monkeypatch
):
    net, images, labels, loss = _single_step_inputs(case, make_basic_unet, make_square_data)
    loss = loss or make_dicece()
    options = {k: case[k] for k in ("clamp", "network_mode", "value_range", "amp") if k in case}
    epsilon = case.get("epsilon", 0.03)
    transform = cls(net, loss, epsilon=epsilon, batched=True, **options)
    assert transform._takes_single_step()
    with monkeypatch.context() as patch:  # valid inputs never reach run_attack on this path
        patch.setattr("monai_adv.transforms.array.run_attack", lambda *a, **k: pytest.fail("run_attack was called"))
        out = transform(images, labels)
    expected = run_attack(net, images, labels, transform.spec, loss, epsilon=epsilon)
    assert out.dtype == images.dtype and torch.equal(out, expected.images)
    assert torch.equal(transform.last_stats["loss_before"], expected.loss_before)
    assert torch.equal(transform.last_stats["epsilon"], expected.epsilon.mean())


def _outcome(call):
    """``("ok", result)`` or ``("error", type, message)``, and the warnings as ``(category, message, file)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            outcome = ("ok", call())
        except Exception as err:  # noqa: BLE001 - the point is to compare whatever is raised
            outcome = ("error", type(err), str(err))
    return outcome, [(w.category, str(w.message), Path(w.filename).name) for w in caught]


def _broken_inputs(make_basic_unet, make_square_data, make_tiny_net):
    net = make_basic_unet(seed=1)
    images, labels = make_square_data(batch=2, size=32)
    nan_image, nan_label, inf_image = images.clone(), labels.clone(), images.clone()
    nan_image[0, 0, 1, 1], nan_label[1, 0, 2, 2], inf_image[1, 0, 0, 0] = float("nan"), float("nan"), float("inf")
    nan_net = make_basic_unet(seed=1)
    with torch.no_grad():
        next(nan_net.parameters())[0].fill_(float("nan"))
    frozen = nn.Sequential(make_tiny_net(out_channels=2)).requires_grad_(False)

    class Detached(nn.Module):  # a loss with no graph back to the images
        def forward(self, x):
            return frozen(x).detach()

    one_channel = make_tiny_net(out_channels=1, seed=37)  # cross-entropy over one channel: zero gradient
    zero_labels = torch.zeros(2, 32, 32, dtype=torch.long)
    return {
        "nan image": (net, nan_image, labels, {}),
        "inf image": (net, inf_image, labels, {}),
        "nan label": (net, images, nan_label, {}),
        "labels 0/255": (net, images, labels * 255, {}),
        "outside value_range": (net, images * 2 + 0.5, labels, {}),
        "empty batch": (net, images[:0], labels[:0], {}),
        "label shape": (net, images, labels[:, :, :8], {}),
        "integer images": (net, (images * 255).to(torch.uint8), labels, {}),
        "epsilon over the range": (net, images, labels, {"epsilon": 1.5}),
        "nan weights": (nan_net, images, labels, {}),
        "no graph": (Detached(), images, labels, {}),
        "zero gradient": (one_channel, images, zero_labels, {"loss": nn.CrossEntropyLoss()}),
        "zero gradient, warn": (
            one_channel,
            images,
            zero_labels,
            {"loss": nn.CrossEntropyLoss(), "on_zero_gradient": "warn"},
        ),
    }


@pytest.mark.parametrize(
    "name",
    ["nan image", "inf image", "nan label", "labels 0/255", "outside value_range", "empty batch", "label shape",
     "integer images", "epsilon over the range", "nan weights", "no graph", "zero gradient", "zero gradient, warn"],
)  # fmt: skip
def test_fgsm_single_step_path_raises_and_warns_as_run_attack(
    name, make_basic_unet, make_square_data, make_tiny_net, make_dicece
):
    network, images, labels, options = _broken_inputs(make_basic_unet, make_square_data, make_tiny_net)[name]
    epsilon, loss = options.pop("epsilon", 0.03), options.pop("loss", None) or make_dicece()
    fast = FGSM(network, loss, epsilon=epsilon, batched=True, **options)
    core = FGSM(network, loss, epsilon=epsilon, batched=True, return_loss_after=True, **options)
    assert fast._takes_single_step() and not core._takes_single_step()  # return_loss_after: run_attack's path
    fast_outcome, fast_warnings = _outcome(lambda: fast(images, labels))
    core_outcome, core_warnings = _outcome(lambda: core(images, labels))
    assert fast_outcome[0] == core_outcome[0]
    if fast_outcome[0] == "error":
        assert fast_outcome[1:] == core_outcome[1:]
    else:
        assert torch.equal(fast_outcome[1], core_outcome[1])
    assert fast_warnings == core_warnings
    assert bool(fast_warnings) == (name in ("epsilon over the range", "zero gradient, warn"))
