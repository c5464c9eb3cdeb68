"""Data that would train silently wrong, or fail later without naming the file, is refused at start (issue 8)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from monai.data import CacheDataset
from monai.transforms import Compose, Lambdad, LoadImaged
from PIL import Image

from monai_adv.data import (
    CheckedLoadImaged,
    binarize_mask,
    check_datalist,
    image_datalist,
    load_datalist,
    read_header,
)

KVASIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "kvasir_seg"


def write_image(path: Path, pixels: np.ndarray, **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **save_args)
    return path


def rgb(shape=(12, 10), value=120) -> np.ndarray:
    return np.full((*shape, 3), value, dtype=np.uint8)


def grey_mask(shape=(12, 10)) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[2:6, 3:7] = 255
    return mask


def dataset(root: Path, stems=("a", "b", "c", "d")) -> Path:
    """A folder dataset of RGB PNGs with grey {0, 255} masks and a split.json."""
    for stem in stems:
        write_image(root / "images" / f"{stem}.png", rgb())
        write_image(root / "masks" / f"{stem}.png", grey_mask())
    (root / "split.json").write_text(json.dumps({"train": list(stems[:-1]), "validation": [stems[-1]]}))
    return root


def write_split(root: Path, split) -> None:
    (root / "split.json").write_text(split if isinstance(split, str) else json.dumps(split))


# ------------------------------------------------------------------------------------- 5: mask size


def test_mask_of_another_size_is_refused_naming_both_files_and_sizes(tmp_path):
    root = dataset(tmp_path / "ds")
    write_image(root / "masks" / "b.png", grey_mask((6, 10)))  # cropped to half its image's height
    with pytest.raises(ValueError) as info:
        load_datalist(dataset_dir=root)
    message = str(info.value)
    assert f"mask {root / 'masks' / 'b.png'} is 10x6 but its image {root / 'images' / 'b.png'} is 10x12" in message
    assert "1 problem(s)" in message


# ------------------------------------------------------------------------------------ 6: colour masks


@pytest.mark.parametrize("channel", [1, 2])
def test_green_or_blue_colour_masks_give_foreground_through_the_bundle_pipeline(tmp_path, channel):
    root = dataset(tmp_path / "ds")
    for stem in "abcd":
        colour = np.zeros((12, 10, 3), dtype=np.uint8)
        colour[2:6, 3:7, channel] = 255
        write_image(root / "masks" / f"{stem}.png", colour)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # foreground is found: no warning
        data = load_datalist(dataset_dir=root, spatial_dims=2, in_channels=3)
    load = Compose([
        LoadImaged(keys=["image", "label"], image_only=True, ensure_channel_first=True),
        Lambdad("label", binarize_mask),
    ])  # fmt: skip
    label = load(data["training"][0])["label"]
    assert label.shape == (1, 10, 12) and int(label.sum()) == 16


def test_masks_with_alpha_are_refused(tmp_path):
    root = dataset(tmp_path / "ds")
    rgba = np.zeros((12, 10, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    write_image(root / "masks" / "c.png", rgba)
    with pytest.raises(ValueError, match=rf"mask {root / 'masks' / 'c.png'} has an alpha channel \(mode RGBA\)"):
        load_datalist(dataset_dir=root)


def test_training_set_without_any_foreground_warns(tmp_path):
    root = dataset(tmp_path / "ds")
    for stem in "abc":  # the training masks are all empty; the validation one is not
        write_image(root / "masks" / f"{stem}.png", np.zeros((12, 10), dtype=np.uint8))
    with pytest.warns(UserWarning, match=r"none of the 3 training masks .* has any foreground"):
        data = load_datalist(dataset_dir=root)
    assert len(data["training"]) == 3  # a warning, not an error: the data are returned


# ------------------------------------------------------------------------------------ 7: split files


@pytest.mark.parametrize(
    "split,match",
    [({"train": ["a", "b", "c"], "validation": ["c", "d"]}, r"1 id\(s\) under both 'train' and 'validation': \['c'\]"),
     ({"train": ["a", "b"], "validation": ["d"], "test": ["b"]}, r"under both 'train' and 'test': \['b'\]"),
     ({"train": ["a", "b", "a"], "validation": ["d"]}, r"more than once under 'train': \['a'\]"),
     ({"train": "abc", "validation": ["d"]}, "'train' must be a list of id strings"),
     ([["a"], ["b"]], "must hold a JSON object")],
)  # fmt: skip
def test_overlapping_or_duplicated_split_ids_are_refused(tmp_path, split, match):
    root = dataset(tmp_path / "ds")
    write_split(root, split)
    with pytest.raises(ValueError, match=match) as info:
        load_datalist(dataset_dir=root)
    assert str(root / "split.json") in str(info.value)


def test_malformed_split_json_names_the_file_and_position(tmp_path):
    root = dataset(tmp_path / "ds")
    write_split(root, '{"train": ["a", "b"],\n "validation": ["d",]}')
    with pytest.raises(ValueError, match=rf"split file {root / 'split.json'} is not valid JSON: .* line 2, column"):
        load_datalist(dataset_dir=root)


def test_decathlon_datalist_overlap_and_malformed_json_are_refused(tmp_path):
    dataset(tmp_path)
    datalist = tmp_path / "datalist.json"
    pair = {"image": "images/a.png", "label": "masks/a.png"}
    datalist.write_text(json.dumps({"training": [pair, {"image": "images/b.png", "label": "masks/b.png"}],
                                    "validation": [pair]}))  # fmt: skip
    with pytest.raises(ValueError, match=r"datalist.json lists image\(s\) under both 'training' and 'validation'"):
        load_datalist(datalist_file=datalist)
    datalist.write_text('{"training": [}')
    with pytest.raises(ValueError, match=r"datalist_file .*datalist.json is not valid JSON: .* line 1, column 15"):
        load_datalist(datalist_file=datalist)


def test_decathlon_test_list_is_returned(tmp_path):
    dataset(tmp_path)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({
        "training": [{"image": f"images/{s}.png", "label": f"masks/{s}.png"} for s in "ab"],
        "validation": [{"image": "images/c.png", "label": "masks/c.png"}],
        "test": ["images/d.png"],
    }))  # fmt: skip
    data = load_datalist(datalist_file=datalist)
    assert [Path(i["image"]) for i in data["test"]] == [tmp_path / "images" / "d.png"]


# ---------------------------------------------------------------------------- 8: dimensions, channels


def test_spatial_dims_mismatch_is_refused_both_ways(tmp_path):
    root = dataset(tmp_path / "png")
    with pytest.raises(ValueError, match=r"a.png has 2 spatial dimensions \(size 10x12\), but spatial_dims is 3"):
        load_datalist(dataset_dir=root, spatial_dims=3)
    assert len(load_datalist(dataset_dir=root, spatial_dims=2, in_channels=3)["training"]) == 3

    options = {"num_images": 4, "size": 16, "spatial_dims": 3, "channels": 1}
    with pytest.raises(ValueError, match=r"case_000.nii.gz has 3 spatial dimensions \(size 16x16x16\).* is 2"):
        load_datalist(synthetic_dir=tmp_path / "vol", synthetic_options=options, spatial_dims=2)
    data = load_datalist(synthetic_dir=tmp_path / "vol", synthetic_options=options, spatial_dims=3, in_channels=1)
    assert len(data["training"]) == 3 and len(data["validation"]) == 1
    with pytest.raises(ValueError, match=r"case_000.nii.gz has 1 channel\(s\) \(mode nifti\), but in_channels is 2"):
        load_datalist(synthetic_dir=tmp_path / "vol", synthetic_options=options, in_channels=2)


# ------------------------------------------------------------------------------------ 10: empty parts


def test_empty_validation_is_refused_at_start(tmp_path):
    root = dataset(tmp_path / "ds")
    write_split(root, {"train": ["a", "b"], "validation": []})
    with pytest.raises(ValueError, match=r"split.json: the 'validation' list is empty"):
        load_datalist(dataset_dir=root)
    write_split(root, {"train": ["a", "b"], "validation": ["d"]})
    with pytest.raises(ValueError, match="max_val must be None or an integer >= 1, got 0"):
        load_datalist(dataset_dir=root, max_val=0)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "ds/images/a.png", "label": "ds/masks/a.png"}],
                                    "validation": []}))  # fmt: skip
    with pytest.raises(ValueError, match=r"the validation list from .*datalist.json is empty"):
        load_datalist(datalist_file=datalist)


# ------------------------------------------------------------------------- 11: unreadable, odd channels


def truncated_jpeg(path: Path, shape=(120, 100)) -> Path:
    """A JPEG whose header is whole (it opens) but whose pixel data stop halfway (it does not decode)."""
    write_image(path, np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8), format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_jpeg_is_named_by_the_loader(tmp_path):
    root = dataset(tmp_path / "ds")
    (root / "images" / "b.png").unlink()
    bad = truncated_jpeg(root / "images" / "b.jpg")
    write_image(root / "masks" / "b.png", grey_mask((120, 100)))
    data = load_datalist(dataset_dir=root)  # the header is fine: the decode error comes at load time
    item = next(i for i in data["training"] if i["id"] == "b")
    with pytest.raises(OSError, match="image file is truncated"):  # what MONAI's LoadImaged says: no file
        LoadImaged(keys=["image", "label"], image_only=True)(item)
    load = CheckedLoadImaged(keys=["image", "label"], image_only=True, ensure_channel_first=True)
    with pytest.raises(RuntimeError) as info:  # inside a Compose, through a CacheDataset, as the bundle runs it
        CacheDataset(data["training"], transform=Compose([load]), progress=False)
    cause = info.value.__cause__
    while cause is not None and not (isinstance(cause, OSError) and str(bad) in str(cause)):
        cause = cause.__cause__
    assert cause is not None and "cannot load 'image'" in str(cause) and "truncated" in str(cause)
    assert load(data["training"][0])["image"].shape == (3, 10, 12)  # good files load as with LoadImaged


@pytest.mark.parametrize("odd", [np.full((12, 10), 9, dtype=np.uint8), np.zeros((12, 10, 4), dtype=np.uint8)])
def test_grey_or_rgba_image_among_rgb_is_named(tmp_path, odd):
    root = dataset(tmp_path / "ds")
    odd_path = write_image(root / "images" / "c.png", odd)
    mode = read_header(odd_path).mode
    with pytest.raises(ValueError, match=rf"{odd_path} has {odd.shape[-1] if odd.ndim == 3 else 1} channel\(s\) "
                                         rf"\(mode {mode}\), but in_channels is 3"):  # fmt: skip
        load_datalist(dataset_dir=root, in_channels=3)
    with pytest.raises(ValueError, match=rf"{odd_path} has .* channel\(s\) \(mode {mode}\), but most images .* have 3"):
        load_datalist(dataset_dir=root)


def test_unreadable_and_missing_files_are_all_listed(tmp_path):
    root = dataset(tmp_path / "ds")
    (root / "images" / "a.png").write_bytes(b"not a png")
    items = [{"image": str(root / "images" / "a.png"), "label": str(root / "masks" / "a.png")},
             {"image": str(root / "images" / "b.png"), "label": str(tmp_path / "gone.png")}]  # fmt: skip
    with pytest.raises(ValueError) as info:
        check_datalist(items)
    message = str(info.value)
    assert "2 problem(s)" in message and "a.png cannot be read as an image" in message
    assert f"{tmp_path / 'gone.png'} does not exist" in message


def test_inference_datalist_skips_unusable_inputs_and_lists_them(tmp_path):
    folder = tmp_path / "in"
    for stem in "adz":
        write_image(folder / f"{stem}.png", rgb())
    truncated_jpeg(folder / "b.jpg")
    write_image(folder / "c.png", np.zeros((12, 10), dtype=np.uint8))  # grey, for an RGB network
    (folder / "e.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"skipping 3 of 6 images") as record:
        items = image_datalist(folder, spatial_dims=2, in_channels=3)
    assert [Path(i["image"]).name for i in items] == ["a.png", "d.png", "z.png"]
    message = str(record[0].message)
    assert "b.jpg cannot be decoded" in message and "c.png has 1 channel(s) (mode L), in_channels is 3" in message
    assert "e.png cannot be read as an image" in message
    for stem in "adz":
        (folder / f"{stem}.png").unlink()
    with pytest.raises(ValueError, match=r"none of the 3 images in .* can be used"):
        image_datalist(folder, in_channels=3)


@pytest.mark.skipif(not (KVASIR / "split.json").is_file(), reason="Kvasir-SEG not found at ../shared/data")
def test_kvasir_passes_the_checks_with_its_test_split():
    data = load_datalist(dataset_dir=KVASIR, spatial_dims=2, in_channels=3)
    assert [len(data[k]) for k in ("training", "validation", "test")] == [800, 100, 100]
    ids = [item["id"] for part in data.values() for item in part]
    assert len(set(ids)) == 1000


def test_undecodable_mask_met_by_the_foreground_check_is_named(tmp_path):
    root = dataset(tmp_path / "ds")
    mask = root / "masks" / "a.png"
    write_image(mask, np.random.default_rng(1).integers(0, 255, (12, 10), dtype=np.uint8))
    mask.write_bytes(mask.read_bytes()[:-30])  # header intact, pixel data cut
    with pytest.raises(ValueError, match=rf"{mask} cannot be decoded"):
        load_datalist(dataset_dir=root)
