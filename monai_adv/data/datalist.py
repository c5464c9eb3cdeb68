"""Datalists for the bundle: image/mask folders, Decathlon-style JSON, or the synthetic default."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import load_decathlon_datalist

from monai_adv.data.synthetic import ensure_synthetic_dataset

__all__ = [
    "IMAGE_SUFFIXES",
    "binarize_mask",
    "datalist_from_folders",
    "image_datalist",
    "load_datalist",
    "split_datalist",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz")


def _stem(path: Path) -> str | None:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _files_by_stem(folder: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        stem = _stem(path)
        if stem is None or not path.is_file():
            continue
        if stem in files:
            raise ValueError(f"{folder} has two files for {stem!r}: {Path(files[stem]).name} and {path.name}.")
        files[stem] = str(path)
    return files


def datalist_from_folders(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """Pair ``dataset_dir/images/*`` with ``dataset_dir/masks/*`` by file name (without extension).

    Images and masks may be PNG, JPG, BMP, TIFF or NIfTI, in any mix.

    Returns:
        ``[{"image": path, "label": path, "id": stem}, ...]`` sorted by stem.

    Raises:
        FileNotFoundError: when ``dataset_dir``, ``images/`` or ``masks/`` is missing.
        ValueError: when there are no images, or some images or masks have no partner.
    """
    root = Path(dataset_dir)
    for folder in (root, root / "images", root / "masks"):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} is not a folder: dataset_dir must hold images/ and masks/ with files paired by name."
            )
    images, masks = _files_by_stem(root / "images"), _files_by_stem(root / "masks")
    if not images:
        raise ValueError(f"{root / 'images'} holds no images with suffixes {IMAGE_SUFFIXES}.")
    unpaired_images = sorted(set(images) - set(masks))
    unpaired_masks = sorted(set(masks) - set(images))
    if unpaired_images or unpaired_masks:
        raise ValueError(
            f"in {root}: images without a mask: {unpaired_images[:5]}{'...' if len(unpaired_images) > 5 else ''}; "
            f"masks without an image: {unpaired_masks[:5]}{'...' if len(unpaired_masks) > 5 else ''}."
        )
    return [{"image": images[s], "label": masks[s], "id": s} for s in sorted(images)]


def image_datalist(folder: str | os.PathLike) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for every image file in ``folder`` (sorted), for inference.

    Raises:
        FileNotFoundError: when ``folder`` is not a folder.
        ValueError: when it holds no images.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"input_dir {root} is not a folder.")
    files = _files_by_stem(root)
    if not files:
        raise ValueError(f"{root} holds no images with suffixes {IMAGE_SUFFIXES}.")
    return [{"image": files[s]} for s in sorted(files)]


def split_datalist(
    items: Sequence[dict[str, Any]], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A deterministic shuffled split into training and validation items.

    Raises:
        ValueError: when ``val_fraction`` is not in (0, 1) or there are fewer than 2 items.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
    if len(items) < 2:
        raise ValueError(f"need at least 2 items to split into training and validation, got {len(items)}.")
    order = np.random.default_rng(seed).permutation(len(items))
    num_val = min(len(items) - 1, max(1, int(round(val_fraction * len(items)))))
    validation = [items[i] for i in sorted(order[:num_val])]
    training = [items[i] for i in sorted(order[num_val:])]
    return training, validation


def _split_by_file(items: list[dict[str, str]], split_file: Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    split = json.loads(split_file.read_text())
    by_id = {item["id"]: item for item in items}
    parts = []
    for names in (("train", "training"), ("validation", "val")):
        key = next((k for k in names if k in split), None)
        if key is None:
            raise ValueError(f"{split_file} has no {' or '.join(repr(n) for n in names)} list of ids.")
        unknown = [i for i in split[key] if i not in by_id]
        if unknown:
            raise ValueError(f"{split_file} lists ids with no image/mask pair under {key!r}: {unknown[:5]}.")
        parts.append([by_id[i] for i in split[key]])
    return parts[0], parts[1]


def load_datalist(
    dataset_dir: str | os.PathLike | None = None,
    datalist_file: str | os.PathLike | None = None,
    split_file: str | os.PathLike | None = None,
    synthetic_dir: str | os.PathLike | None = None,
    synthetic_options: dict[str, Any] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_train: int | None = None,
    max_val: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The training and validation items of the bundle, from the first source given.

    1. ``datalist_file``: a Decathlon-style JSON (``{"training": [{"image", "label"}, ...],
       "validation": [...]}``, paths relative to the file); without a ``"validation"`` list the
       training list is split.
    2. ``dataset_dir`` with ``images/`` and ``masks/``; split by ``split_file`` (or
       ``dataset_dir/split.json`` when present: ``{"train": [ids], "validation": [ids]}``), else
       by a seeded shuffle.
    3. Neither: the synthetic dataset in ``synthetic_dir``, generated there on first use with
       ``synthetic_options`` (see :func:`~monai_adv.data.make_synthetic_dataset`).

    Args:
        val_fraction: validation share for the shuffled split.
        seed: seed of the shuffled split.
        max_train, max_val: keep only the first items of each part (quick runs).

    Returns:
        ``{"training": [...], "validation": [...]}``.

    Raises:
        FileNotFoundError: for missing files or folders.
        ValueError: for unpaired files, bad split files, or no source at all.
    """
    if datalist_file is not None:
        path = Path(datalist_file)
        if not path.is_file():
            raise FileNotFoundError(f"datalist_file {path} does not exist.")
        training = load_decathlon_datalist(path, data_list_key="training")
        if "validation" in json.loads(path.read_text()):
            validation = load_decathlon_datalist(path, data_list_key="validation")
        else:
            training, validation = split_datalist(training, val_fraction, seed)
    elif dataset_dir is not None:
        items = datalist_from_folders(dataset_dir)
        split_path = Path(split_file) if split_file is not None else Path(dataset_dir) / "split.json"
        if split_file is not None and not split_path.is_file():
            raise FileNotFoundError(f"split_file {split_path} does not exist.")
        if split_path.is_file():
            training, validation = _split_by_file(items, split_path)
        else:
            training, validation = split_datalist(items, val_fraction, seed)
    elif synthetic_dir is not None:
        items = datalist_from_folders(ensure_synthetic_dataset(synthetic_dir, **(synthetic_options or {})))
        training, validation = split_datalist(items, val_fraction, seed)
    else:
        raise ValueError("no data: give dataset_dir, datalist_file or synthetic_dir.")
    return {"training": training[:max_train], "validation": validation[:max_val]}


def binarize_mask(mask: torch.Tensor) -> torch.Tensor:
    """Binary foreground mask ``(1, *spatial)`` from a loaded mask of any value scale.

    Keeps the first channel (RGB masks saved from image editors) and thresholds at half the
    largest value, which suits {0, 1}, {0, 255} and JPEG-compressed masks alike.
    """
    first = mask[:1]
    peak = first.max()
    return (first > 0.5 * peak).to(torch.float32) if peak > 0 else torch.zeros_like(first, dtype=torch.float32)
