"""Datalists (folders, split files, Decathlon JSON) and the generated synthetic dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from monai_adv.data import (
    binarize_mask,
    datalist_from_folders,
    ensure_synthetic_dataset,
    image_datalist,
    load_datalist,
    make_synthetic_dataset,
    split_datalist,
    synthetic,
)


def write_png(path: Path, shape=(12, 10), value=128, rgb=False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((*shape, 3) if rgb else shape, value, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_nifti(path: Path, shape=(8, 8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.float32), np.eye(4)), path)
    return path


def make_pairs(root: Path, stems, image_ext=".png", mask_ext=".png") -> Path:
    for stem in stems:
        write_png(root / "images" / f"{stem}{image_ext}", rgb=True)
        write_png(root / "masks" / f"{stem}{mask_ext}", value=255)
    return root


# --------------------------------------------------------------------------------------------------- folders


def test_pairs_by_name_across_suffixes_and_ignores_other_files(tmp_path):
    root = tmp_path / "ds"
    write_png(root / "images" / "b.jpg", rgb=True)
    write_png(root / "masks" / "b.png")
    write_png(root / "images" / "a.png", rgb=True)
    write_png(root / "masks" / "a.PNG")
    write_nifti(root / "images" / "c.nii.gz")
    write_nifti(root / "masks" / "c.nii")
    (root / "images" / "README.txt").write_text("not an image")
    (root / "masks" / "notes.json").write_text("{}")
    (root / "images" / "sub.png").mkdir()  # a folder with an image-like name is no image
    items = datalist_from_folders(root)
    assert [item["id"] for item in items] == ["a", "b", "c"]
    assert items[0] == {"image": str(root / "images" / "a.png"), "label": str(root / "masks" / "a.PNG"), "id": "a"}
    assert items[1]["image"].endswith("b.jpg") and items[1]["label"].endswith("b.png")
    assert items[2]["image"].endswith("c.nii.gz") and items[2]["label"].endswith("c.nii")


def test_unpaired_files_are_named(tmp_path):
    root = make_pairs(tmp_path / "ds", ["a", "b"])
    write_png(root / "images" / "lonely_image.png")
    write_png(root / "masks" / "lonely_mask.png")
    with pytest.raises(ValueError) as info:
        datalist_from_folders(root)
    message = str(info.value)
    assert "images without a mask: ['lonely_image']" in message
    assert "masks without an image: ['lonely_mask']" in message


def test_many_unpaired_files_are_abbreviated(tmp_path):
    root = make_pairs(tmp_path / "ds", ["a"])
    for i in range(8):
        write_png(root / "images" / f"x{i}.png")
    with pytest.raises(ValueError, match=r"\['x0', 'x1', 'x2', 'x3', 'x4'\]\.\.\."):
        datalist_from_folders(root)


def test_two_files_for_one_name_are_refused(tmp_path):
    root = make_pairs(tmp_path / "ds", ["a"])
    write_png(root / "images" / "a.jpg")
    with pytest.raises(ValueError, match="two files for 'a'"):
        datalist_from_folders(root)


@pytest.mark.parametrize("missing", ["root", "images", "masks"])
def test_missing_folders_are_named(tmp_path, missing):
    root = tmp_path / "ds"
    if missing != "root":
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir(parents=True)
        (root / missing).rmdir()
    expected = root if missing == "root" else root / missing
    with pytest.raises(FileNotFoundError, match=str(expected)):
        datalist_from_folders(root)


def test_no_images_is_an_error(tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "images" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        datalist_from_folders(root)


def test_image_datalist(tmp_path):
    write_png(tmp_path / "in" / "z.png")
    write_png(tmp_path / "in" / "a.jpg")
    (tmp_path / "in" / "skip.txt").write_text("x")
    assert image_datalist(tmp_path / "in") == [
        {"image": str(tmp_path / "in" / "a.jpg")},
        {"image": str(tmp_path / "in" / "z.png")},
    ]
    with pytest.raises(FileNotFoundError, match="input_dir"):
        image_datalist(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        image_datalist(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------------ split


def test_split_is_deterministic_disjoint_and_complete():
    items = [{"id": f"{i:02d}"} for i in range(10)]
    train, val = split_datalist(items, val_fraction=0.2, seed=0)
    assert len(val) == 2 and len(train) == 8
    ids = [item["id"] for item in train + val]
    assert sorted(ids) == [item["id"] for item in items]
    assert [i["id"] for i in train] == sorted(i["id"] for i in train)  # order kept within each part
    assert split_datalist(items, 0.2, seed=0) == (train, val)
    others = {tuple(i["id"] for i in split_datalist(items, 0.2, seed=s)[1]) for s in range(1, 6)}
    assert others - {tuple(i["id"] for i in val)}, "another seed should give another split"


def test_split_keeps_both_parts_non_empty():
    items = [{"id": "a"}, {"id": "b"}]
    assert [len(part) for part in split_datalist(items, val_fraction=0.9)] == [1, 1]
    assert [len(part) for part in split_datalist(items, val_fraction=0.01)] == [1, 1]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_refuses_bad_fractions(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        split_datalist([{"id": "a"}, {"id": "b"}], val_fraction=fraction)


def test_split_needs_two_items():
    with pytest.raises(ValueError, match="at least 2"):
        split_datalist([{"id": "a"}])


# -------------------------------------------------------------------------------------------- load_datalist


def test_split_json_in_dataset_dir_is_used_automatically(tmp_path):
    root = make_pairs(tmp_path / "ds", ["a", "b", "c", "d", "e"])
    (root / "split.json").write_text(json.dumps({"train": ["e", "a", "c"], "validation": ["d"], "test": ["b"]}))
    data = load_datalist(dataset_dir=root)
    assert [item["id"] for item in data["training"]] == ["e", "a", "c"]  # in the file's order
    assert [item["id"] for item in data["validation"]] == ["d"]
    assert [item["id"] for item in data["test"]] == ["b"]  # the split's test list comes back too
    limited = load_datalist(dataset_dir=root, max_train=2, max_val=1)
    assert [item["id"] for item in limited["training"]] == ["e", "a"] and [i["id"] for i in limited["validation"]] == [
        "d"
    ]
    assert "test" not in load_datalist(dataset_dir=make_pairs(tmp_path / "no_test", ["a", "b"]))


def test_split_file_accepts_training_and_val_keys(tmp_path):
    root = make_pairs(tmp_path / "ds", ["a", "b", "c"])
    split = tmp_path / "my_split.json"
    split.write_text(json.dumps({"training": ["a", "b"], "val": ["c"]}))
    data = load_datalist(dataset_dir=root, split_file=split)
    assert [i["id"] for i in data["training"]] == ["a", "b"] and [i["id"] for i in data["validation"]] == ["c"]


def test_without_split_file_the_folder_is_split_by_seed(tmp_path):
    root = make_pairs(tmp_path / "ds", [f"s{i}" for i in range(10)])
    data = load_datalist(dataset_dir=root, val_fraction=0.3, seed=4)
    items = datalist_from_folders(root)
    assert (data["training"], data["validation"]) == split_datalist(items, 0.3, 4)
    assert len(data["validation"]) == 3


@pytest.mark.parametrize(
    "split,match",
    [({"train": ["a"], "validation": ["zzz"]}, r"no image/mask pair under 'validation': \['zzz'\]"),
     ({"train": ["a", "nope"], "validation": ["b"]}, r"under 'train': \['nope'\]"),
     ({"validation": ["b"]}, "no 'train' or 'training'"),
     ({"train": ["a"]}, "no 'validation' or 'val'")],
)  # fmt: skip
def test_bad_split_files_are_explained(tmp_path, split, match):
    root = make_pairs(tmp_path / "ds", ["a", "b"])
    (root / "split.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match=match):
        load_datalist(dataset_dir=root)


def test_missing_split_file_is_an_error(tmp_path):
    root = make_pairs(tmp_path / "ds", ["a", "b"])
    with pytest.raises(FileNotFoundError, match="split_file"):
        load_datalist(dataset_dir=root, split_file=tmp_path / "missing.json")


def test_decathlon_datalist_file(tmp_path):
    make_pairs(tmp_path / "ds", ["a", "b", "c"])
    datalist = tmp_path / "ds" / "datalist.json"
    datalist.write_text(json.dumps({
        "training": [{"image": f"images/{s}.png", "label": f"masks/{s}.png"} for s in "ab"],
        "validation": [{"image": "images/c.png", "label": "masks/c.png"}],
    }))  # fmt: skip
    data = load_datalist(datalist_file=datalist, dataset_dir=tmp_path / "ignored")  # the file comes first
    assert [Path(i["image"]) for i in data["training"]] == [tmp_path / "ds" / "images" / f"{s}.png" for s in "ab"]
    assert [Path(i["label"]) for i in data["validation"]] == [tmp_path / "ds" / "masks" / "c.png"]
    assert all(Path(i["image"]).is_file() for i in data["training"] + data["validation"])


def test_decathlon_datalist_without_validation_is_split(tmp_path):
    datalist = tmp_path / "datalist.json"
    make_pairs(tmp_path, [f"i{i}" for i in range(5)])
    training = [{"image": f"images/i{i}.png", "label": f"masks/i{i}.png"} for i in range(5)]
    datalist.write_text(json.dumps({"training": training}))
    data = load_datalist(datalist_file=datalist, val_fraction=0.4)
    assert len(data["training"]) == 3 and len(data["validation"]) == 2
    assert {Path(i["image"]).name for i in data["training"] + data["validation"]} == {f"i{i}.png" for i in range(5)}


def test_missing_datalist_file_and_no_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="datalist_file"):
        load_datalist(datalist_file=tmp_path / "nope.json")
    with pytest.raises(ValueError, match="no data"):
        load_datalist()


def test_synthetic_source_is_generated_on_first_use(tmp_path):
    data = load_datalist(synthetic_dir=tmp_path / "syn", synthetic_options={"num_images": 10, "size": 16}, max_val=1)
    assert len(data["training"]) == 8 and len(data["validation"]) == 1
    assert all(Path(i["image"]).parent == tmp_path / "syn" / "images" for i in data["training"])


# -------------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("peak", [1.0, 255.0])
def test_binarize_mask_scales(peak):
    mask = torch.zeros(1, 4, 4)
    mask[0, 1:3, 1:3] = peak
    mask[0, 0, 0] = 0.3 * peak  # JPEG ringing below half the peak
    out = binarize_mask(mask)
    assert out.dtype == torch.float32 and out.shape == (1, 4, 4)
    assert out.sum() == 4 and out[0, 1:3, 1:3].eq(1).all()


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_binarize_mask_takes_foreground_from_any_channel_and_handles_empty_masks(channel):
    rgb = torch.zeros(3, 4, 4)
    rgb[channel, 0] = 255  # a red, green or blue foreground row
    assert binarize_mask(rgb).shape == (1, 4, 4) and binarize_mask(rgb).sum() == 4
    assert binarize_mask(rgb)[0, 0].eq(1).all()
    assert binarize_mask(torch.zeros(1, 4, 4)).eq(0).all()


# ------------------------------------------------------------------------------------------------ synthetic


def test_make_synthetic_2d_rgb(tmp_path):
    root = make_synthetic_dataset(tmp_path / "syn", num_images=4, size=24, seed=1)
    assert root == tmp_path / "syn"
    items = datalist_from_folders(root)
    assert [i["id"] for i in items] == [f"case_{i:03d}" for i in range(4)]
    manifest = json.loads((root / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("num_images", "size", "spatial_dims", "channels", "seed")} == {
        "num_images": 4, "size": 24, "spatial_dims": 2, "channels": 3, "seed": 1}  # fmt: skip
    for item in items:
        image, mask = np.asarray(Image.open(item["image"])), np.asarray(Image.open(item["label"]))
        assert image.shape == (24, 24, 3) and image.dtype == np.uint8
        assert mask.shape == (24, 24) and set(np.unique(mask)) <= {0, 255}
        assert 0 < (mask == 255).mean() < 1  # some lesion, some background
        # the lesion is brighter than the tissue in the red channel on average
        assert image[..., 0][mask == 255].mean() > image[..., 0][mask == 0].mean()


def test_make_synthetic_is_deterministic(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", num_images=2, size=16, seed=3)
    b = make_synthetic_dataset(tmp_path / "b", num_images=2, size=16, seed=3)
    c = make_synthetic_dataset(tmp_path / "c", num_images=2, size=16, seed=4)
    for name in ("images/case_000.png", "masks/case_001.png"):
        assert np.array_equal(np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name)))
    assert not np.array_equal(np.asarray(Image.open(a / "images/case_000.png")),
                              np.asarray(Image.open(c / "images/case_000.png")))  # fmt: skip


def test_make_synthetic_grey_2d_and_3d(tmp_path):
    grey = make_synthetic_dataset(tmp_path / "grey", num_images=1, size=16, channels=1)
    assert np.asarray(Image.open(grey / "images" / "case_000.png")).shape == (16, 16)
    vol = make_synthetic_dataset(tmp_path / "vol", num_images=2, size=16, spatial_dims=3, channels=1)
    image = nib.load(vol / "images" / "case_000.nii.gz")
    mask = nib.load(vol / "masks" / "case_000.nii.gz")
    assert image.shape == (16, 16, 16) and image.get_data_dtype() == np.float32
    assert mask.shape == (16, 16, 16) and set(np.unique(np.asarray(mask.dataobj))) == {0, 1}
    two = make_synthetic_dataset(tmp_path / "two", num_images=1, size=16, spatial_dims=3, channels=2)
    assert nib.load(two / "images" / "case_000.nii.gz").shape == (16, 16, 16, 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"spatial_dims": 1}, "spatial_dims"), ({"channels": 2}, "1 or 3 channels"), ({"size": 8}, "size >= 16"),
     ({"num_images": 0}, "num_images >= 1")],
)  # fmt: skip
def test_make_synthetic_refuses_bad_settings(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_dataset(tmp_path / "syn", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_make_synthetic_refuses_an_existing_folder(tmp_path):
    (tmp_path / "syn").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        make_synthetic_dataset(tmp_path / "syn", num_images=1, size=16)


def test_generation_is_atomic_when_it_fails_midway(tmp_path, monkeypatch):
    saved = []
    real_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        if len(saved) == 3:
            raise OSError("disk full")
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        make_synthetic_dataset(tmp_path / "syn", num_images=4, size=16)
    assert len(saved) == 3
    assert list(tmp_path.iterdir()) == [], "neither the dataset nor its staging folder may be left behind"
    monkeypatch.undo()
    # a later call starts afresh and completes
    root = ensure_synthetic_dataset(tmp_path / "syn", num_images=4, size=16)
    assert len(datalist_from_folders(root)) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]


def test_generation_interrupted_by_keyboard_interrupt_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_dataset(tmp_path / "syn", num_images=2, size=16)
    assert list(tmp_path.iterdir()) == []


def test_other_process_finishing_first_is_accepted(tmp_path, monkeypatch):
    """Two torchrun ranks generating at once: the loser's rename fails, it reuses the winner's dataset."""
    root = tmp_path / "syn"
    real_replace = os.replace

    def winner_first(src, dst):
        monkeypatch.setattr(os, "replace", real_replace)
        make_synthetic_dataset(root, num_images=3, size=16)  # the other process, with the same settings
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", winner_first)
    with pytest.raises(FileExistsError, match="another process"):
        make_synthetic_dataset(root, num_images=3, size=16)
    assert [p.name for p in tmp_path.iterdir()] == ["syn"], "the loser's staging folder must be removed"

    # ensure_synthetic_dataset takes the other process's dataset when its settings match
    root = tmp_path / "syn2"
    monkeypatch.setattr(os, "replace", winner_first)
    assert ensure_synthetic_dataset(root, num_images=3, size=16) == root
    assert len(datalist_from_folders(root)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn", "syn2"]


def test_ensure_reuses_a_matching_dataset(tmp_path):
    root = ensure_synthetic_dataset(tmp_path / "syn", num_images=3, size=16)
    stamp = (root / "images" / "case_000.png").stat().st_mtime_ns
    assert ensure_synthetic_dataset(tmp_path / "syn", num_images=3, size=16) == root
    assert (root / "images" / "case_000.png").stat().st_mtime_ns == stamp


def test_ensure_refuses_a_different_or_incomplete_dataset(tmp_path):
    ensure_synthetic_dataset(tmp_path / "syn", num_images=3, size=16)
    with pytest.raises(ValueError, match=r"other settings.*'num_images': \(3, 5\)"):
        ensure_synthetic_dataset(tmp_path / "syn", num_images=5, size=16)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "images").mkdir()
    with pytest.raises(ValueError, match="no manifest.json"):
        ensure_synthetic_dataset(tmp_path / "half")
