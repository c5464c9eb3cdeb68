"""Datalists whose items would fail later, unreadable formats and broken links are named at start (issue 15, 12)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from monai.transforms import LoadImage
from PIL import Image

from monai_adv.data import load_datalist
from monai_adv.errors import DataError


def write_pairs(root: Path, stems="abcd", suffix=".png", image=None) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for stem in stems:
        Image.fromarray(image if image is not None else np.full((12, 10, 3), 90, np.uint8)).save(
            root / "images" / f"{stem}{suffix}"
        )
        mask = np.zeros((12, 10), np.uint8)
        mask[2:6, 3:7] = 255
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return root


def test_a_datalist_with_mask_instead_of_label_is_refused_naming_the_keys(tmp_path):
    write_pairs(tmp_path)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({
        "training": [{"image": f"images/{s}.png", "mask": f"masks/{s}.png"} for s in "abc"],
        "validation": [{"image": "images/d.png", "label": "masks/d.png"}],
    }))  # fmt: skip
    with pytest.raises(DataError, match=r"3 training/validation item\(s\) of .* have no 'label' key") as info:
        load_datalist(datalist_file=datalist)
    assert "training item 0 (" in str(info.value) and "keys ['image', 'mask']" in str(info.value)


def test_a_test_list_of_images_alone_is_fine(tmp_path):
    write_pairs(tmp_path)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({
        "training": [{"image": f"images/{s}.png", "label": f"masks/{s}.png"} for s in "ab"],
        "validation": [{"image": "images/c.png", "label": "masks/c.png"}], "test": ["images/d.png"],
    }))  # fmt: skip
    assert len(load_datalist(datalist_file=datalist)["test"]) == 1


def test_files_no_installed_reader_can_load_are_refused_at_start(tmp_path):
    root = write_pairs(tmp_path, suffix=".tif", image=np.random.default_rng(0).random((12, 10)).astype(np.float32))
    readable = any(reader.verify_suffix(str(root / "images" / "a.tif")) for reader in LoadImage().readers)
    if readable:
        pytest.skip("a TIFF reader (itk) is installed here: TIFF files load")
    with pytest.raises(
        DataError, match=r"images/[a-d]\.tif: MONAI's image readers installed here cannot load \.tif files"
    ):
        load_datalist(dataset_dir=root, in_channels=1)


def test_a_broken_symbolic_link_is_named_not_dropped(tmp_path):
    root = write_pairs(tmp_path, stems="abc")
    os.symlink(tmp_path / "elsewhere" / "d.png", root / "images" / "d.png")
    os.symlink(tmp_path / "elsewhere" / "d_mask.png", root / "masks" / "d.png")
    with pytest.raises(DataError, match=r"images/d\.png is a broken symbolic link \(to .*elsewhere/d\.png\)"):
        load_datalist(dataset_dir=root)


def test_an_exif_rotated_jpeg_is_refused_even_when_square(tmp_path):
    root = write_pairs(tmp_path, stems="abc", image=np.full((10, 10, 3), 90, np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers turn it by 90 degrees
    Image.fromarray(np.full((10, 10, 3), 90, np.uint8)).save(root / "images" / "d.jpg", exif=exif)
    mask = np.zeros((10, 10), np.uint8)
    mask[0:3, :] = 255
    Image.fromarray(mask).save(root / "masks" / "d.png")
    with pytest.raises(DataError, match=r"images/d\.jpg has EXIF orientation 6 and its mask .*masks/d\.png has 1"):
        load_datalist(dataset_dir=root)


def test_an_all_foreground_mask_warns_once(tmp_path):
    from monai.transforms import Compose, Lambdad

    from monai_adv.data import CheckedLoadImaged, MaskToLabels

    for stem in "ab":
        Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / f"{stem}.png")
    labels = MaskToLabels(out_channels=2)
    pipeline = Compose([CheckedLoadImaged(keys="label", image_only=True, ensure_channel_first=True),
                        Lambdad(keys="label", func=labels)])  # fmt: skip
    items = [{"label": str(tmp_path / f"{stem}.png")} for stem in "ab"]
    with pytest.warns(UserWarning, match=r"mask .*a\.png is foreground in every pixel \(values \{255\}\)") as record:
        [pipeline(item) for item in items]
    assert len([w for w in record if "every pixel" in str(w.message)]) == 1
