"""Through the bundle CLI: 16-bit images, NaN images, NaN losses and multi-valued masks are named, never trained
on silently (issue 15, items 1 to 3)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

PREFIX = "monai-adv: error: "


def polyp_folders(root, count=6, size=32, image=None, mask_values=(0, 255)):
    """``root/images/*.png`` and ``root/masks/*.png``: ``image(index)`` pixels, masks with a square per value."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index in range(count):
        pixels = image(index) if image else np.full((size, size, 3), 40 + 20 * index, np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{index}.png")
        mask = np.zeros((size, size), np.uint8)
        for n, value in enumerate(mask_values[1:]):
            mask[4 + 12 * n : 12 + 12 * n, 6:20] = value
        Image.fromarray(mask).save(root / "masks" / f"{index}.png")
    return root


def last_line(run) -> str:
    return run.output.strip().splitlines()[-1]


@pytest.mark.slow
def test_16bit_images_with_the_default_range_are_refused_at_start(bundle, tmp_path):
    def grey16(index):
        return (np.arange(32 * 32).reshape(32, 32) * (4 + index)).astype(np.uint16)

    data = polyp_folders(tmp_path / "data", image=grey16)
    run = bundle.train(tmp_path / "root", {"dataset_dir": data, "in_channels": 1, "adv#method": "none"},
                       expect_success=False)  # fmt: skip
    assert last_line(run).startswith(PREFIX), run.describe()
    assert "(mode I;16, uint16, values 0.." in last_line(run) and "--intensity_range null" in last_line(run)
    assert not (tmp_path / "root" / "models" / "model.pt").exists()
    ok = bundle.train(tmp_path / "root2", {"dataset_dir": data, "in_channels": 1, "adv#method": "none",
                                           "intensity_range": "null", "max_epochs": 1})  # fmt: skip
    assert (tmp_path / "root2" / "models" / "model.pt").is_file(), ok.describe()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "fgsm"])
def test_a_nan_loss_stops_training_before_a_nan_model_is_saved(bundle, tmp_path, method):
    run = bundle.train(tmp_path, {"adv#method": method, "learning_rate": 1e30}, expect_success=False)
    assert run.returncode != 0
    line = last_line(run)
    assert line.startswith(PREFIX), run.describe()
    assert "training loss is nan" in line if method == "none" else "NaN or Inf" in line
    models = tmp_path / "models"
    assert not (models / "model.pt").exists() and not list(models.glob("checkpoint_epoch=*.pt"))


@pytest.mark.slow
def test_class_masks_train_with_three_out_channels_and_are_refused_beyond_or_in_a_binary_setting(bundle, tmp_path):
    data = polyp_folders(tmp_path / "data", mask_values=(0, 1, 2))
    settings = {"dataset_dir": data, "out_channels": 3, "adv#method": "fgsm", "max_epochs": 1}
    run = bundle.train(tmp_path / "root", settings)
    assert (tmp_path / "root" / "models" / "model.pt").is_file(), run.describe()
    assert "has more than two values" not in run.output
    bad = polyp_folders(tmp_path / "bad", mask_values=(0, 128, 255))
    refused = bundle.train(tmp_path / "root2", {**settings, "dataset_dir": bad}, expect_success=False)
    assert last_line(refused).startswith(PREFIX + "mask "), refused.describe()
    assert "has values {0, 128, 255}, but with out_channels 3 a mask must hold class indices 0..2" in last_line(refused)
    # the reverse: a multi-class mask in a binary setting is refused (binarising would merge its classes)
    binary = bundle.train(
        tmp_path / "root3", {**settings, "dataset_dir": data, "out_channels": 2}, expect_success=False
    )
    assert last_line(binary).startswith(PREFIX + "mask "), binary.describe()
    assert "has more than two values {0, 1, 2}" in last_line(binary) and "out_channels is 2" in last_line(binary)
