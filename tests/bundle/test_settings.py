"""``--image_size`` is checked where the bundle resolves it, not deep inside a transform."""

from __future__ import annotations

import pytest

from monai_adv.bundle import spatial_size


@pytest.mark.parametrize(
    ("image_size", "dims", "expected"), [(64, 2, [64, 64]), (32, 3, [32] * 3), ([48, 64], 2, [48, 64])]
)
def test_spatial_size_accepts_positive_sizes(image_size, dims, expected):
    assert spatial_size(image_size, dims) == expected


@pytest.mark.parametrize(
    ("image_size", "dims", "message"),
    [
        (0, 2, "positive integers, got 0"),
        (-8, 2, "positive integers"),
        (64.5, 2, "positive integers"),
        (True, 2, "positive integers"),
        ([64, 64], 3, "3 of them"),
        ("64", 2, "one positive integer"),
        (64, 4, "spatial_dims must be 2 or 3"),
    ],
)
def test_spatial_size_refuses_bad_sizes(image_size, dims, message):
    with pytest.raises(ValueError, match=message):
        spatial_size(image_size, dims)


@pytest.mark.slow
def test_bundle_refuses_image_size_zero_at_start(bundle, tmp_path):
    run = bundle.train(tmp_path, {"image_size": 0, "adv#method": "none"}, expect_success=False)
    assert run.returncode != 0
    assert "image_size must hold positive integers, got 0" in run.output
    assert not (tmp_path / "models" / "model.pt").exists()


@pytest.mark.parametrize("value", [None, "null", "none", "None", "NULL", " null "])
def test_intensity_range_null_words_mean_per_image_scaling(value):
    from monai.transforms import ScaleIntensityd

    from monai_adv.bundle import intensity_range, intensity_scaling

    assert intensity_range(value) is None
    assert isinstance(intensity_scaling(value), ScaleIntensityd)


@pytest.mark.parametrize(
    ("value", "expected"),
    [([0, 255], [0.0, 255.0]), ("[0, 4095]", [0.0, 4095.0]), ((-1000, 1000.5), [-1000.0, 1000.5])],
)
def test_intensity_range_pairs(value, expected):
    import torch
    from monai.transforms import ScaleIntensityRanged

    from monai_adv.bundle import intensity_range, intensity_scaling

    assert intensity_range(value) == expected
    scaling = intensity_scaling(value)
    assert isinstance(scaling, ScaleIntensityRanged)
    out = scaling({"image": torch.tensor([[expected[0], expected[1], expected[1] + 10]])})["image"]
    assert out.tolist() == [[0.0, 1.0, 1.0]]


@pytest.mark.parametrize("value", ["nul", [255], [255, 0], [0, float("nan")], "[0, x]", 5])
def test_intensity_range_refuses_other_values_naming_the_key(value):
    from monai_adv.bundle import intensity_range
    from monai_adv.errors import SettingsError

    with pytest.raises(SettingsError, match="intensity_range.*null"):
        intensity_range(value)


GOOD = {"max_epochs": 5, "val_interval": 1, "batch_size": 16, "learning_rate": 1e-3, "adv#method": "fgsm",
        "adv#epsilon": 0.1, "adv#num_steps": 1, "adv#prob": 1.0, "adv#mode": "append", "resume": "false",
        "intensity_range": "null", "image_size": 128, "spatial_dims": 2}  # fmt: skip


def test_check_settings_passes_good_settings_through():
    from monai_adv.bundle import check_settings

    assert check_settings(GOOD) == GOOD
    assert check_settings({**GOOD, "adv#epsilon": [0.0, 0.1], "adv#method": "Both"})["adv#method"] == "Both"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_epochs", "abc", "--max_epochs must be an integer >= 1, got 'abc'"),
        ("max_epochs", 2.5, "--max_epochs must be an integer"),
        ("learning_rate", 0, "--learning_rate must be a number > 0, got 0"),
        ("learning_rate", -0.1, "--learning_rate must be a number > 0"),
        ("learning_rate", float("nan"), "--learning_rate must be a number > 0"),
        ("batch_size", 0, "--batch_size must be an integer >= 1"),
        ("adv#method", "pgd", "one of none, fgsm, invfgsm, both.*--adv#num_steps"),
        ("adv#method", "fgms", "Did you mean 'fgsm'"),
        ("adv#epsilon", -0.1, "--adv#epsilon must be a number >= 0"),
        ("adv#epsilon", [0.2, 0.1], "low <= high"),
        ("adv#num_steps", 0, "--adv#num_steps must be an integer >= 1"),
        ("adv#prob", 1.5, r"--adv#prob must be a number in \[0, 1\]"),
        ("adv#mode", "concat", "--adv#mode must be one of append, replace"),
        ("resume", "maybe", "--resume must be true or false"),
        ("intensity_range", "nul", "--intensity_range must be"),
        ("image_size", 0, "--image_size must hold positive integers"),
    ],
)
def test_check_settings_names_the_bad_key(key, value, message):
    from monai_adv.bundle import check_settings
    from monai_adv.errors import SettingsError

    with pytest.raises(SettingsError, match=message):
        check_settings({**GOOD, key: value})


def test_check_settings_lists_every_bad_key_at_once():
    from monai_adv.bundle import check_settings

    with pytest.raises(ValueError, match=r"2 bad settings: .*--max_epochs.*--learning_rate"):
        check_settings({**GOOD, "learning_rate": 0, "max_epochs": "abc"})


@pytest.mark.slow
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_epochs": "abc"}, "--max_epochs must be an integer >= 1, got 'abc'."),
        ({"learning_rate": 0}, "--learning_rate must be a number > 0, got 0."),
        ({"adv#method": "pgd"}, "--adv#method fgsm --adv#num_steps 10"),
    ],
)
def test_bundle_refuses_bad_settings_before_loading_data(bundle, tmp_path, settings, message):
    run = bundle.train(tmp_path, {"adv#method": "none", **settings}, expect_success=False)
    assert run.returncode != 0
    last = run.output.strip().splitlines()[-1]
    assert last.startswith("monai-adv: error: ") and message in last, run.describe()
    assert "CacheDataset" not in run.output and not (tmp_path / "models").exists()


@pytest.mark.slow
def test_bundle_trains_with_intensity_range_null(bundle, tmp_path):
    run = bundle.train(tmp_path, {"adv#method": "none", "intensity_range": "null", "max_epochs": 1})
    assert (tmp_path / "models" / "model.pt").is_file(), run.describe()
