"""Images that the intensity scaling would flatten, NaN/Inf images, and masks whose classes would merge are named
before training (issue 15, items 1 to 3)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset
from monai.transforms import Compose, Lambdad
from PIL import Image

from monai_adv.bundle import intensity_scaling
from monai_adv.bundle.error_report import project_error
from monai_adv.data import CheckedLoadImaged, MaskToLabels, load_datalist, read_header, read_values
from monai_adv.errors import DataError


def write_png(path: Path, pixels: np.ndarray, **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **save_args)
    return path


def write_nifti(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(values, np.eye(4)), str(path))
    return path


def square_mask(shape=(16, 16), value=255) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[4:10, 4:10] = value
    return mask


def folders(root: Path, images: dict[str, np.ndarray], masks: dict[str, np.ndarray] | None = None) -> Path:
    """``root/images/<stem>`` and ``root/masks/<stem>.png`` (a square mask unless given); NIfTI for float images."""
    for stem, pixels in images.items():
        if pixels.dtype.kind == "f" or pixels.dtype == np.int16:
            write_nifti(root / "images" / f"{stem}.nii.gz", pixels)
        else:
            write_png(root / "images" / f"{stem}.png", pixels)
        mask = (masks or {}).get(stem, square_mask(pixels.shape[:2]))
        write_png(root / "masks" / f"{stem}.png", mask)
    return root


def grey16(value_max: int = 4095, shape=(16, 16)) -> np.ndarray:
    return (np.arange(np.prod(shape)).reshape(shape) * value_max // (np.prod(shape) - 1)).astype(np.uint16)


def test_16bit_png_with_the_8bit_range_is_refused_naming_the_file_and_the_setting(tmp_path):
    root = folders(tmp_path, {"a": grey16(), "b": grey16(), "c": grey16()})
    assert read_header(root / "images" / "a.png").dtype == "uint16"
    with pytest.raises(DataError) as info:
        load_datalist(dataset_dir=root, in_channels=1, spatial_dims=2, intensity_range=[0.0, 255.0])
    message = str(info.value)
    assert f"{root / 'images' / 'a.png'} (mode I;16, uint16, values 0..4095)" in message
    assert "94% of its values outside intensity_range [0, 255]" in message
    assert "--intensity_range null" in message and '--intensity_range "[0, 4095]"' in message


def test_16bit_png_passes_with_null_or_its_own_range_and_is_scaled_as_said(tmp_path):
    root = folders(tmp_path, {"a": grey16(), "b": grey16(), "c": grey16()})
    for setting in (None, [0.0, 4095.0]):
        data = load_datalist(dataset_dir=root, in_channels=1, spatial_dims=2, intensity_range=setting)
        loaded = CheckedLoadImaged(keys="image", image_only=True, ensure_channel_first=True)(data["training"][0])
        scaled = intensity_scaling(setting if setting else "null")(loaded)["image"]
        assert float(scaled.min()) == 0.0 and float(scaled.max()) == 1.0
        assert len(torch.unique(scaled)) > 200  # not flattened to 1.0


def test_hounsfield_nifti_with_the_8bit_range_is_refused(tmp_path):
    hu = np.linspace(-1000, 3000, 256, dtype=np.float32).reshape(16, 16)
    root = folders(tmp_path, {"a": hu, "b": hu, "c": hu})
    with pytest.raises(DataError, match=r"a\.nii\.gz \(NIfTI, float32, values -1000\.\.3000\) has 93% of its values"):
        load_datalist(dataset_dir=root, in_channels=1, spatial_dims=2, intensity_range=[0, 255])
    load_datalist(dataset_dir=root, in_channels=1, spatial_dims=2, intensity_range=[-1000, 3000])  # passes


def test_a_few_clipped_values_warn_and_8bit_images_are_not_decoded(tmp_path):
    hu = np.linspace(-1000, 1100, 256, dtype=np.float32).reshape(16, 16)  # windowing [-1000, 1000] clips 5%
    root = folders(tmp_path, {"a": hu, "b": hu, "c": hu})
    with pytest.warns(UserWarning, match=r"3 image\(s\) .* outside intensity_range \[-1000, 1000\].*at most 5\.1%"):
        load_datalist(dataset_dir=root, in_channels=1, spatial_dims=2, intensity_range=[-1000, 1000])
    rgb = folders(tmp_path / "rgb", {s: np.full((16, 16, 3), 200, np.uint8) for s in "abc"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_datalist(dataset_dir=rgb, in_channels=3, spatial_dims=2, intensity_range=[0, 255])


def test_nan_or_inf_image_is_refused_up_front_and_when_loading(tmp_path):
    good = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    bad = good.copy()
    bad[3, 4], bad[5, 5] = np.nan, np.inf
    root = folders(tmp_path, {"a": good, "b": bad, "c": good})
    stats = read_values(root / "images" / "b.nii.gz")
    assert stats.non_finite == 2 and stats.size == 256 and stats.maximum == pytest.approx(1.0)
    with pytest.raises(DataError, match=r"b\.nii\.gz \(NIfTI, float32\) has 2 NaN or infinite value\(s\) of 256"):
        load_datalist(dataset_dir=root, in_channels=1, spatial_dims=2, intensity_range=[0, 1])
    # per-image scaling does not decode up front: the loader names the file
    data = load_datalist(dataset_dir=root, in_channels=1, spatial_dims=2, val_fraction=0.5, seed=0)
    items = data["training"] + data["validation"]
    loader = Compose([CheckedLoadImaged(keys=["image", "label"], image_only=True, ensure_channel_first=True)])
    with pytest.raises(RuntimeError, match="applying transform") as info:  # MONAI's Compose wraps the error
        CacheDataset(items, loader, progress=False)
    cause = project_error(info.value)
    assert isinstance(cause, DataError)
    assert re.search(r"'image' file .*b\.nii\.gz has 2 NaN or infinite value\(s\) of 256", str(cause))


def load_masks(tmp_path: Path, masks: dict[str, np.ndarray], out_channels: int, jpeg: bool = False):
    """Masks through the bundle's loading and labelling (``CheckedLoadImaged`` then ``MaskToLabels``)."""
    items = []
    for stem, mask in masks.items():
        path = write_png(tmp_path / f"{stem}.{'jpg' if jpeg else 'png'}", mask, **({"quality": 75} if jpeg else {}))
        items.append({"label": str(path)})
    pipeline = Compose([
        CheckedLoadImaged(keys="label", image_only=True, ensure_channel_first=True),
        Lambdad(keys="label", func=MaskToLabels(out_channels=out_channels)),
    ])  # fmt: skip
    return [pipeline(item)["label"] for item in items]


def test_binary_masks_0_255_and_jpeg_masks_are_binarised_without_a_word(tmp_path):
    big = np.zeros((64, 64), np.uint8)
    big[10:40, 12:50] = 255
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (png,) = load_masks(tmp_path, {"png": square_mask()}, out_channels=2)
        (jpeg,) = load_masks(tmp_path, {"jpeg": big}, out_channels=2, jpeg=True)
    assert sorted(torch.unique(png).tolist()) == [0.0, 1.0] and int(png.sum()) == 36
    assert sorted(torch.unique(jpeg).tolist()) == [0.0, 1.0] and abs(int(jpeg.sum()) - 30 * 38) < 40


@pytest.mark.parametrize("values", [(255, 128), (1, 2)])
def test_a_multi_class_mask_in_a_binary_setting_is_refused_naming_the_file(tmp_path, values):
    mask = square_mask(value=values[0])
    mask[10:14, 10:14] = values[1]
    with pytest.raises(RuntimeError) as info:
        load_masks(tmp_path, {"three": mask}, out_channels=2)
    cause = project_error(info.value)
    assert isinstance(cause, DataError)
    shown = "{" + ", ".join(str(v) for v in sorted({0, *values})) + "}"
    assert re.search(rf"mask .*three\.png has more than two values {re.escape(shown)}.*out_channels is 2", str(cause))
    assert "--out_channels" in str(cause)


def test_class_masks_keep_their_classes_with_several_out_channels(tmp_path):
    mask = square_mask(value=1)
    mask[10:14, 10:14] = 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (labels,) = load_masks(tmp_path, {"classes": mask}, out_channels=3)
    assert labels.shape == (1, 16, 16)
    assert {v: int((labels == v).sum()) for v in (0.0, 1.0, 2.0)} == {0.0: 256 - 36 - 16, 1.0: 36, 2.0: 16}


def test_values_beyond_out_channels_are_refused_naming_the_file_and_values(tmp_path):
    with pytest.raises(RuntimeError) as info:
        load_masks(tmp_path, {"m255": square_mask(value=255)}, out_channels=3)
    cause = project_error(info.value)
    assert isinstance(cause, DataError)
    assert re.search(r"mask .*m255\.png has values \{0, 255\}, but with out_channels 3 .* 0\.\.2", str(cause))
