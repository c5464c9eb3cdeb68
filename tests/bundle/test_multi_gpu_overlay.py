"""multi_gpu_train.json under torchrun: two CPU processes (gloo) train with a DDP-wrapped network."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "adversarial_unet_segmentation" / "configs"


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_process_ddp_training_with_fgsm(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    command = [
        torchrun, "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
        "--config_file", configs, "--bundle_root", str(tmp_path),
        "--features", "[4,4,8,8,16,4]", "--image_size", "32", "--max_train", "8", "--max_val", "4",
        "--max_epochs", "2", "--batch_size", "2", "--adv#recipe", "paper", "--adv#method", "both",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    # Rank 0 alone logs and saves; both ranks train on batches of 2 + 2 (FGSM) + 2 (InvFGSM).
    assert output.count("Epoch[2] Metrics -- adv_epsilon") == 1, output[-4000:]
    assert "adv_samples: 4.0000" in output
    models = sorted(p.name for p in (tmp_path / "models").iterdir())
    expected = ["checkpoint_epoch=2.pt", "model.pt", "training_history.json", "training_run.json"]
    assert models == expected, models  # and no lock left behind
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(key.startswith("module.") for key in state), "saved weights should be unwrapped from DDP"
