"""``--augment standard``: MONAI's random flips, turns, affine, noise and gamma on the training batches only."""

from __future__ import annotations

import json

import pytest
import torch
from monai.transforms import RandAdjustContrastd, RandAffined, RandFlipd, RandGaussianNoised, RandRotate90d

from monai_adv.data import training_augmentation
from monai_adv.errors import SettingsError


def _parsed(bundle, root, *overlays, **settings):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle.train_json), *(str(bundle.configs / o) for o in overlays)])
    parser.update({"bundle_root": str(root), "image_size": bundle.tiny_image_size, **settings})
    return parser


def test_standard_augmentation_reaches_training_only(bundle, tmp_path):
    parser = _parsed(bundle, tmp_path, augment="standard")
    train = parser.get_parsed_content("train#preprocessing").transforms
    kinds = {type(t) for t in train}
    assert {RandFlipd, RandRotate90d, RandAffined, RandGaussianNoised, RandAdjustContrastd} <= kinds
    validation = parser.get_parsed_content("validate#preprocessing").transforms
    assert not any(type(t).__name__.startswith("Rand") for t in validation)
    plain = _parsed(bundle, tmp_path, augment="none").get_parsed_content("train#preprocessing").transforms
    assert not any(type(t).__name__.startswith("Rand") for t in plain)
    # the shipped default is the publisher's choice (configs/train.json), and it reaches the training batches
    default = json.loads(bundle.train_json.read_text())["augment"]
    shipped = _parsed(bundle, tmp_path).get_parsed_content("train#preprocessing").transforms
    assert any(type(t).__name__.startswith("Rand") for t in shipped) == (default == "standard")
    # run augment writes copies of the training images as they are, whatever --augment says
    augment = _parsed(bundle, tmp_path, "augment.json")
    assert not any(
        type(t).__name__.startswith("Rand") for t in augment.get_parsed_content("train#preprocessing").transforms
    )


def test_hippocampus_overlay_trains_without_flips_unless_asked(bundle, tmp_path):
    """Flips and quarter turns reverse the anterior-posterior axis that tells the hippocampus' classes apart: the 3D
    overlay sets no augmentation over whatever train.json ships, and --augment standard still applies."""
    from monai.bundle import ConfigParser

    def transforms(**settings):
        parser = ConfigParser()
        parser.read_config([str(bundle.train_json), str(bundle.configs / "hippocampus.json")])
        parser.update({"bundle_root": str(tmp_path), **settings})
        return {type(t) for t in parser.get_parsed_content("train#augmentation")}

    assert not {RandFlipd, RandRotate90d} & transforms()
    assert {RandFlipd, RandRotate90d} <= transforms(augment="standard")


def test_standard_augmentation_keeps_labels_integer_and_changes_images():
    image = torch.rand(3, 32, 32)
    label = (torch.rand(1, 32, 32) > 0.5).float()
    from monai.transforms import Compose

    transforms = Compose(training_augmentation("standard", spatial_dims=2))
    transforms.set_random_state(seed=3)
    changed = 0
    for _ in range(8):
        out = transforms({"image": image.clone(), "label": label.clone()})
        assert out["image"].shape == image.shape and out["label"].shape == label.shape
        assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}  # nearest interpolation for the label
        changed += int(not torch.equal(torch.as_tensor(out["image"]), image))
    assert changed >= 6
    volume = training_augmentation("standard", spatial_dims=3)
    assert sum(isinstance(t, RandFlipd) for t in volume) == 3


def test_value_range_clips_the_noisy_images_back_into_the_intensity_range():
    from monai.transforms import Compose

    image = torch.rand(3, 32, 32)
    image[:, :4] = 1.0  # at the edges of the range the noise leaves it
    image[:, -4:] = 0.0
    sample = {"image": image, "label": torch.zeros(1, 32, 32)}
    unclipped, clipped = (
        Compose(training_augmentation("standard")),
        Compose(training_augmentation("standard", value_range=(0.0, 1.0))),
    )
    lows, highs = [], []
    for seed in range(12):  # noise has probability 0.3
        unclipped.set_random_state(seed=seed)
        clipped.set_random_state(seed=seed)
        free, bounded = unclipped(dict(sample))["image"], clipped(dict(sample))["image"]
        lows.append(float(free.min()))
        highs.append(float(free.max()))
        assert 0.0 <= float(bounded.min()) and float(bounded.max()) <= 1.0
        inside = (free >= 0) & (free <= 1)
        assert torch.equal(torch.as_tensor(bounded)[inside], torch.as_tensor(free)[inside])  # clipping only
    assert min(lows) < 0.0 or max(highs) > 1.0  # without it the noise leaves [0, 1]
    with pytest.raises(ValueError, match="value_range"):
        training_augmentation("none", value_range=(1.0, 0.0))


def test_standard_augmentation_trains_with_an_attack_that_clamps_to_the_range(bundle, tmp_path):
    """--augment standard with a recipe whose attack clamps to [0, 1] (clamp=range) on real photographs, whose
    intensities reach both ends of the range (the synthetic images stay inside [0.19, 0.94])."""
    kvasir = bundle.shared_dir / "data" / "kvasir_seg"
    if not (kvasir / "split.json").is_file():
        pytest.skip(f"Kvasir-SEG is not available (missing {kvasir / 'split.json'})")
    settings = {"augment": "standard", "adv#recipe": "nfgsm", "max_epochs": 1, "dataset_dir": kvasir}
    run = bundle.train(tmp_path / "bundle", settings)
    assert (run.root / "models" / "model.pt").is_file(), run.describe()
    assert "outside value_range" not in run.output


def test_unknown_augmentation_is_refused_naming_the_choices(bundle, tmp_path):
    with pytest.raises(ValueError, match="standard"):
        training_augmentation("strong")
    from monai_adv.bundle import check_settings

    with pytest.raises(SettingsError, match="--augment.*'strong'"):
        check_settings({"augment": "strong"})


def test_augment_setting_on_run_augment_fails_clearly(bundle, trained_bundle, tmp_path):
    root = bundle.copy_outputs(trained_bundle.root, tmp_path / "bundle")
    configs = f"['{bundle.train_json}','{bundle.configs / 'augment.json'}']"
    result = bundle.run(
        "run", "augment", "--config_file", configs, "--bundle_root", root, "--augment", "standard",
        *bundle.overrides({k: v for k, v in bundle.tiny.items() if k != "max_epochs"}), expect_success=False,
    )  # fmt: skip
    assert result.returncode != 0
    last = result.output.strip().splitlines()[-1]
    assert "run augment wrote no adversarial copies" in last and "--augment" in last, result.describe()
