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
