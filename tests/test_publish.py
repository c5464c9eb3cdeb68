"""``python -m monai_adv.reproduce.publish``: the bundle's eval_metrics and Performance section come from a summary."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from monai_adv.reproduce.pipeline import ARMS
from monai_adv.reproduce.publish import BEGIN, END, publish

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "adversarial_unet_segmentation"


def summary(offset: float) -> dict:
    """A summary shaped as ``monai_adv.reproduce`` writes it, with distinct numbers per arm."""

    def stats(value):
        return {"mean": round(value, 4), "std": 0.01}

    arms = {}
    for index, arm in enumerate(ARMS):
        base = offset + index / 100
        arms[arm] = {
            "test_mean_iou": stats(base),
            "test_mean_dice": stats(base + 0.1),
            "best_val_mean_iou": stats(base),
            # as the reproduction measures them: single-step attacks at the paper's epsilons, the iterative ones
            # (and their per-image worst case) at the robust budget
            "robustness_mean_iou": {
                **{
                    a: {e: stats(base - 0.2) for e in ("0", "0.0012", "0.0118", "0.1176", "0.2")}
                    for a in ("fgsm", "invfgsm")
                },
                **{
                    a: {e: stats(base - 0.3) for e in ("0", f"{2 / 255:g}", f"{4 / 255:g}")}
                    for a in ("pgd", "ensemble")
                },
            },
        }
    return {"profile": "cpu", "seeds": [0, 1, 2], "command": "python -m monai_adv.reproduce --profile cpu",
            "version": "abc123", "split": "test", "arms": arms}  # fmt: skip


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    (target / "configs").mkdir(parents=True)
    (target / "docs").mkdir()
    shutil.copy(BUNDLE / "configs" / "metadata.json", target / "configs")
    shutil.copy(BUNDLE / "docs" / "README.md", target / "docs")
    return target


def test_publish_writes_the_numbers_and_replaces_its_section(bundle_copy: Path, tmp_path: Path):
    path = tmp_path / "summary.json"
    for offset in (0.5, 0.6):  # the second run replaces the first run's section and metrics
        path.write_text(json.dumps(summary(offset)))
        publish(path, bundle_copy)
    metrics = json.loads((bundle_copy / "configs" / "metadata.json").read_text())["eval_metrics"]
    assert metrics["kvasir_seg_test_mean_iou_unet"] == 0.6
    assert metrics["kvasir_seg_test_mean_dice_invfgsm_offline"] == round(0.6 + 4 / 100 + 0.1, 4)
    assert "abc123" in metrics["source"]
    readme = (bundle_copy / "docs" / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1 and readme.count("## Performance") == 1
    assert "| UNet | 0.600 ± 0.010 | 0.700 ± 0.010 |" in readme
    assert "0.500 ± 0.010" not in readme
    header = next(line for line in readme.splitlines() if line.startswith("| arm |"))
    assert "| PGD IoU, eps 2/255 | PGD IoU, eps 4/255 | ensemble IoU, eps 2/255 | ensemble IoU, eps 4/255 |" in header
    assert "PGD IoU, eps 0.0118" not in header and "–" not in readme.split(BEGIN)[1].split(END)[0]
    assert metrics["kvasir_seg_test_ensemble_iou_2_255_unet"] == 0.3
    assert readme.index(END) < readme.index("## Commands")


def test_publish_refuses_a_broken_marker(bundle_copy: Path, tmp_path: Path):
    readme = bundle_copy / "docs" / "README.md"
    text = readme.read_text().replace(END, "")  # a begin marker (added if absent) with no end marker
    readme.write_text(text if BEGIN in text else text + "\n" + BEGIN + "\n")
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary(0.5)))
    with pytest.raises(ValueError, match="no <!-- results:end -->"):
        publish(path, bundle_copy)


def test_publish_command_line(bundle_copy: Path, tmp_path: Path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary(0.5)))
    command = [
        sys.executable,
        "-m",
        "monai_adv.reproduce.publish",
        "--summary",
        str(path),
        "--bundle",
        str(bundle_copy),
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "## Performance" in (bundle_copy / "docs" / "README.md").read_text()
