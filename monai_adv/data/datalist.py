"""Datalists for the bundle: image/mask folders, Decathlon-style JSON, or the synthetic default."""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import load_decathlon_datalist, partition_dataset

from monai_adv.data.checks import check_datalist, read_fully, read_header
from monai_adv.data.synthetic import ensure_synthetic_dataset
from monai_adv.errors import DataError, MissingFileError

__all__ = [
    "IMAGE_SUFFIXES",
    "MaskToLabels",
    "binarize_mask",
    "datalist_from_folders",
    "image_datalist",
    "load_datalist",
    "split_by_file",
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
        if stem is not None and path.is_symlink() and not path.exists():
            raise DataError(f"{path} is a broken symbolic link (to {os.readlink(path)}): fix or remove it.")
        if stem is None or not path.is_file():
            continue
        if stem in files:
            raise DataError(f"{folder} has two files for {stem!r}: {Path(files[stem]).name} and {path.name}.")
        files[stem] = str(path)
    return files


def case_id(path: str) -> str:
    """A file's name without its extension (``hippocampus_001`` from ``hippocampus_001.nii.gz``)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".jpg", ".tif", ".tiff"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def decathlon_items(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The labelled cases of a Medical Segmentation Decathlon folder (``dataset.json`` with a ``training`` list of
    ``image``/``label`` paths relative to it, e.g. ``imagesTr/``, ``labelsTr/``), read with MONAI's
    ``load_decathlon_datalist``.

    Returns:
        ``[{"image": path, "label": path, "id": case}, ...]`` sorted by case (``hippocampus_001``: the file
        name without ``.nii.gz``), ids as ``split.json`` lists them.

    Raises:
        FileNotFoundError: when ``dataset.json`` or a file it lists is missing (naming them).
        ValueError: when it has no ``training`` list, or an item has no ``label``.
    """
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist.")
    content = _read_json(path, "dataset.json")
    if not isinstance(content, dict) or not isinstance(content.get("training"), list) or not content["training"]:
        raise DataError(f"{path} must hold a non-empty 'training' list of image/label pairs (Decathlon layout).")
    items = load_decathlon_datalist(path, data_list_key="training")
    unlabelled = [item.get("image") for item in items if "label" not in item]
    if unlabelled:
        raise DataError(f"{path}: {len(unlabelled)} training item(s) have no 'label': {unlabelled[:3]}.")
    missing = [f for item in items for f in (item["image"], item["label"]) if not Path(f).is_file()]
    if missing:
        raise MissingFileError(f"{path} lists {len(missing)} file(s) that do not exist: {missing[:3]}.")
    out = [{"image": str(item["image"]), "label": str(item["label"]), "id": case_id(item["image"])} for item in items]
    return sorted(out, key=lambda item: item["id"])


def dataset_items(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The items of ``dataset_dir``: ``images/`` + ``masks/`` folders (:func:`datalist_from_folders`), or a
    Decathlon ``dataset.json`` (:func:`decathlon_items`) when there is no ``images/`` folder."""
    root = Path(dataset_dir)
    if not (root / "images").is_dir() and (root / "dataset.json").is_file():
        return decathlon_items(root)
    return datalist_from_folders(root)


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
            raise MissingFileError(
                f"{folder} is not a folder: dataset_dir must hold images/ and masks/ with files paired by name."
            )
    images, masks = _files_by_stem(root / "images"), _files_by_stem(root / "masks")
    if not images:
        raise DataError(f"{root / 'images'} holds no images with suffixes {IMAGE_SUFFIXES}.")
    unpaired_images = sorted(set(images) - set(masks))
    unpaired_masks = sorted(set(masks) - set(images))
    if unpaired_images or unpaired_masks:
        raise DataError(
            f"in {root}: images without a mask: {unpaired_images[:5]}{'...' if len(unpaired_images) > 5 else ''}; "
            f"masks without an image: {unpaired_masks[:5]}{'...' if len(unpaired_masks) > 5 else ''}."
        )
    return [{"image": images[s], "label": masks[s], "id": s} for s in sorted(images)]


def image_datalist(
    folder: str | os.PathLike, spatial_dims: int | None = None, in_channels: int | None = None
) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for every readable image file in ``folder`` (sorted), for inference.

    Every file is decoded once here, so that one unreadable input (a truncated JPEG, a grey image
    for an RGB network) is skipped with a warning that lists it, and inference carries on with the rest.

    Args:
        folder: the folder of input images.
        spatial_dims: when given, skip images with another number of spatial axes.
        in_channels: when given, skip images with another number of channels.

    Raises:
        FileNotFoundError: when ``folder`` is not a folder.
        ValueError: when it holds no images, or none that can be used (listing why).

    Warns:
        UserWarning: listing each skipped file and why.
    """
    root = Path(folder)
    if not root.is_dir():
        raise MissingFileError(f"input_dir {root} is not a folder.")
    files = _files_by_stem(root)
    if not files:
        raise DataError(f"{root} holds no images with suffixes {IMAGE_SUFFIXES}.")
    kept, skipped = [], []
    for stem in sorted(files):
        path = files[stem]
        try:
            header = read_header(path)
            read_fully(path)
        except (FileNotFoundError, ValueError) as err:
            skipped.append(str(err))
            continue
        if spatial_dims is not None and len(header.spatial_shape) != spatial_dims:
            skipped.append(f"{path} has {len(header.spatial_shape)} spatial dimensions, spatial_dims is {spatial_dims}")
        elif in_channels is not None and header.channels != in_channels:
            skipped.append(
                f"{path} has {header.channels} channel(s) (mode {header.mode}), in_channels is {in_channels}"
            )
        else:
            kept.append({"image": path})
    listing = "\n  ".join(skipped)
    if not kept:
        raise DataError(f"none of the {len(files)} images in {root} can be used:\n  {listing}")
    if skipped:
        warnings.warn(f"skipping {len(skipped)} of {len(files)} images in {root}:\n  {listing}", stacklevel=2)
    return kept


def split_datalist(
    items: Sequence[dict[str, Any]], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A deterministic shuffled split into training and validation items.

    :func:`monai.data.partition_dataset` shuffles and cuts; on top of it this keeps both parts
    non-empty and each part in the items' original order.

    Raises:
        ValueError: when ``val_fraction`` is not in (0, 1) or there are fewer than 2 items.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
    if len(items) < 2:
        raise DataError(f"need at least 2 items to split into training and validation, got {len(items)}.")
    num_val = min(len(items) - 1, max(1, round(val_fraction * len(items))))
    train_indices, val_indices = partition_dataset(
        list(range(len(items))), ratios=[len(items) - num_val, num_val], shuffle=True, seed=seed
    )
    return [items[i] for i in sorted(train_indices)], [items[i] for i in sorted(val_indices)]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(
            f"{what} {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}."
        ) from err


def _duplicates(values: Sequence[str]) -> list[str]:
    return sorted(value for value, count in Counter(values).items() if count > 1)


def split_by_file(
    items: list[dict[str, str]], split_file: str | os.PathLike
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]] | None]:
    """The fixed split of ``split_file`` (``{"train": [ids], "validation": [ids], "test": [ids]}``; ``training`` and
    ``val`` are accepted too, ``test`` is optional) applied to ``items`` (each with an ``id``).

    Returns:
        ``(train, validation, test)`` items in the file's order; ``test`` is None when the file has no test list.

    Raises:
        ValueError: (``DataError``) for a list that is missing, empty, not of strings, names an id without an
            item, repeats an id, or shares ids with another list; each names the file and the key.
    """
    split_file = Path(split_file)
    split = _read_json(split_file, "split file")
    if not isinstance(split, dict):
        raise DataError(f"{split_file} must hold a JSON object with 'train' and 'validation' lists of ids.")
    by_id = {item["id"]: item for item in items}
    ids: dict[str, list[str]] = {}
    for names in (("train", "training"), ("validation", "val"), ("test",)):
        key = next((k for k in names if k in split), None)
        if key is None:
            if names[0] == "test":
                continue
            raise DataError(f"{split_file} has no {' or '.join(repr(n) for n in names)} list of ids.")
        listed = split[key]
        if not isinstance(listed, list) or not all(isinstance(i, str) for i in listed):
            raise DataError(f"{split_file}: {key!r} must be a list of id strings, got {str(listed)[:100]}.")
        if not listed and names[0] != "test":
            raise DataError(f"{split_file}: the {key!r} list is empty.")
        unknown = [i for i in listed if i not in by_id]
        if unknown:
            raise DataError(f"{split_file} lists ids with no image/mask pair under {key!r}: {unknown[:5]}.")
        repeated = _duplicates(listed)
        if repeated:
            raise DataError(f"{split_file} lists ids more than once under {key!r}: {repeated[:5]}.")
        ids[key] = listed
    keys = list(ids)
    for i, first in enumerate(keys):
        for second in keys[i + 1 :]:
            shared = sorted(set(ids[first]) & set(ids[second]))
            if shared:
                raise DataError(
                    f"{split_file} lists {len(shared)} id(s) under both {first!r} and {second!r}: {shared[:5]}."
                )
    parts = [[by_id[i] for i in ids[key]] for key in keys]
    return parts[0], parts[1], parts[2] if len(parts) > 2 else None


def _check_disjoint(parts: dict[str, list[dict[str, Any]]], source: Path) -> None:
    """Refuse an image listed twice in one part or in two parts of a Decathlon datalist."""
    names = list(parts)
    for name in names:
        repeated = _duplicates([str(item.get("image")) for item in parts[name]])
        if repeated:
            raise DataError(f"{source} lists images more than once under {name!r}: {repeated[:5]}.")
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = sorted({str(x.get("image")) for x in parts[first]} & {str(x.get("image")) for x in parts[second]})
            if shared:
                raise DataError(f"{source} lists image(s) under both {first!r} and {second!r}: {shared[:5]}.")


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
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    check_files: bool = True,
    intensity_range: Sequence[float] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The training and validation (and test) items of the bundle, from the first source given, checked.

    1. ``datalist_file``: a Decathlon-style JSON (``{"training": [{"image", "label"}, ...],
       "validation": [...], "test": [...]}``, paths relative to the file); without a ``"validation"``
       list the training list is split.
    2. ``dataset_dir`` with ``images/`` and ``masks/``, or a Decathlon ``dataset.json`` (:func:`dataset_items`);
       split by ``split_file`` (or
       ``dataset_dir/split.json`` when present: ``{"train": [ids], "validation": [ids], "test": [ids]}``,
       ``"test"`` optional), else by a seeded shuffle.
    3. Neither: the synthetic dataset in ``synthetic_dir``, generated there on first use with
       ``synthetic_options`` (see :func:`~monai_adv.data.make_synthetic_dataset`).

    Unless ``check_files`` is False, the returned items' files are checked from their headers
    (:func:`~monai_adv.data.check_datalist`: readable, masks the size of their images, one
    dimensionality and channel count, matching ``spatial_dims``/``in_channels`` when given), and a
    warning is given when no training mask has any foreground.

    Args:
        val_fraction: validation share for the shuffled split.
        seed: seed of the shuffled split.
        max_train, max_val: keep only the first items of each part (quick runs); at least 1.
        spatial_dims: the network's spatial dimensions, checked against the images when given.
        in_channels: the network's input channels, checked against the images when given.
        check_files: check the files up front (a few hundred header reads per second of cost).
        intensity_range: ``(low, high)`` of the bundle's fixed intensity scaling, or None for per-image scaling;
            when given, images that it would clip (a 16-bit PNG with ``[0, 255]``) or that hold NaN/Inf values
            are refused (see :func:`~monai_adv.data.check_datalist`).

    Returns:
        ``{"training": [...], "validation": [...]}``, plus ``"test": [...]`` when the split file or
        datalist file has a test list.

    Raises:
        FileNotFoundError: for missing files or folders.
        ValueError: for unpaired or bad files, malformed or overlapping split files, an empty
            training or validation list, or no source at all; each naming the file or id.
    """
    for name, value in (("max_train", max_train), ("max_val", max_val)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f"{name} must be None or an integer >= 1, got {value!r}.")
    test: list[dict[str, Any]] | None = None
    if datalist_file is not None:
        path = Path(datalist_file)
        if not path.is_file():
            raise MissingFileError(f"datalist_file {path} does not exist.")
        content = _read_json(path, "datalist_file")
        if not isinstance(content, dict) or "training" not in content:
            raise DataError(f"datalist_file {path} must hold a JSON object with a 'training' list.")
        training = load_decathlon_datalist(path, data_list_key="training")
        if "validation" in content:
            validation = load_decathlon_datalist(path, data_list_key="validation")
        else:
            training, validation = split_datalist(training, val_fraction, seed)
        if "test" in content:
            test = load_decathlon_datalist(path, data_list_key="test")
        source = path
        _check_disjoint({"training": training, "validation": validation, **({"test": test} if test else {})}, path)
    elif dataset_dir is not None:
        items = dataset_items(dataset_dir)
        split_path = Path(split_file) if split_file is not None else Path(dataset_dir) / "split.json"
        if split_file is not None and not split_path.is_file():
            raise MissingFileError(f"split_file {split_path} does not exist.")
        if split_path.is_file():
            training, validation, test = split_by_file(items, split_path)
            source = split_path
        else:
            training, validation = split_datalist(items, val_fraction, seed)
            source = Path(dataset_dir)
    elif synthetic_dir is not None:
        source = ensure_synthetic_dataset(synthetic_dir, **(synthetic_options or {}))
        training, validation = split_datalist(datalist_from_folders(source), val_fraction, seed)
    else:
        raise DataError("no data: give dataset_dir, datalist_file or synthetic_dir.")
    for name, part in (("training", training), ("validation", validation)):
        if not part:  # an empty validation list would train to the end without ever saving model.pt
            raise DataError(f"the {name} list from {source} is empty.")
    data = {"training": training[:max_train], "validation": validation[:max_val]}
    if test is not None:
        data["test"] = test
    if check_files:
        unlabelled = [
            f"{part} item {index} ({item.get('image')}): keys {sorted(item)}"
            for part in ("training", "validation")
            for index, item in enumerate(data[part])
            if "label" not in item
        ]
        if unlabelled:
            raise DataError(
                f"{len(unlabelled)} training/validation item(s) of {source} have no 'label' key (name each mask "
                f"'label', e.g. not 'mask'):\n  " + "\n  ".join(unlabelled[:10])
            )
        check_datalist(
            [item for part in data.values() for item in part],
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            foreground_items=data["training"],
            name=str(source),
            intensity_range=intensity_range,
        )
    return data


def binarize_mask(mask: torch.Tensor) -> torch.Tensor:
    """Binary foreground mask ``(1, *spatial)`` from a loaded mask of any value scale and channel count.

    A pixel is foreground when any channel is above half the mask's largest value, which suits
    {0, 1}, {0, 255} and JPEG-compressed masks, grey or coloured (a green or blue foreground counts
    as much as a red one). Masks with an alpha channel are refused by
    :func:`~monai_adv.data.check_datalist` before loading.
    """
    strongest = mask.amax(dim=0, keepdim=True)
    peak = strongest.max()
    return (strongest > 0.5 * peak).to(torch.float32) if peak > 0 else torch.zeros_like(strongest, dtype=torch.float32)


def _values_text(values: torch.Tensor, limit: int = 8) -> str:
    shown = [f"{float(v):g}" for v in values[:limit]]
    more = f", ... ({len(values)} values, up to {float(values[-1]):g})" if len(values) > limit else ""
    return "{" + ", ".join(shown) + more + "}"


class MaskToLabels:
    """The label map the bundle trains on, from a loaded mask ``(C, *spatial)``, for ``out_channels`` outputs.

    - Binary setting (``out_channels`` 1 or 2): :func:`binarize_mask` (foreground where any channel is above half
      the mask's largest value; {0, 1}, {0, 255} and JPEG masks). A mask with values other than its background and
      foreground, beyond compression noise near either end (more than 1% of its pixels between 10% and 90% of its
      largest value, e.g. {0, 128, 255} or {0, 1, 2}), holds several classes and is refused, naming the file and
      its values: binarising it would merge them. A mask that is foreground in every pixel warns (once).
    - Several classes (``out_channels`` > 2): the mask must hold class indices ``0 .. out_channels - 1`` in one
      channel (or identical channels); it is returned as they are, never thresholded.

    Args:
        out_channels: the network's output channels (the bundle's ``out_channels``).

    Raises:
        DataError: (a ``ValueError``) naming the file and its values: in a binary setting, for a mask of several
            classes; with ``out_channels`` > 2, for a mask whose values are not class indices below
            ``out_channels`` or whose channels differ.
    """

    def __init__(self, out_channels: int = 2) -> None:
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be an integer >= 1, got {out_channels!r}.")
        self.out_channels = out_channels
        self.warned_full = False

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        meta = getattr(mask, "meta", None) or {}
        name = meta.get("filename_or_obj", "a mask")
        if self.out_channels <= 2:
            self._refuse_several_classes(mask, name)
            labels = binarize_mask(mask)
            if not self.warned_full and labels.numel() > 0 and bool(labels.all()):
                self.warned_full = True
                warnings.warn(
                    f"mask {name} is foreground in every pixel (values {_values_text(torch.unique(mask))}): check that "
                    "masks are not inverted or saved with an opaque alpha or background. (Reported once.)",
                    stacklevel=2,
                )
            return labels
        if mask.shape[0] > 1 and not bool((mask == mask[:1]).all()):
            raise DataError(
                f"mask {name} has {mask.shape[0]} different channels, but out_channels is {self.out_channels}: "
                "save class indices (0, 1, 2, ...) as a one-channel image."
            )
        labels = mask[:1]
        values = torch.unique(labels.as_tensor() if hasattr(labels, "as_tensor") else labels)
        if (
            bool((values != values.round()).any())
            or bool((values < 0).any())
            or float(values.max()) >= self.out_channels
        ):
            raise DataError(
                f"mask {name} has values {_values_text(values)}, but with out_channels {self.out_channels} a mask "
                f"must hold class indices 0..{self.out_channels - 1}. Relabel it (a {{0, 255}} mask is binary: "
                "--out_channels 2)."
            )
        return labels.to(torch.float32)

    def _refuse_several_classes(self, mask: torch.Tensor, name: str) -> None:
        strongest = mask.amax(dim=0)
        peak = float(strongest.max())
        if peak <= 0:
            return
        values = torch.unique(strongest.as_tensor() if hasattr(strongest, "as_tensor") else strongest)
        if len(values) <= 2:
            return
        between = ((strongest > 0.1 * peak) & (strongest < 0.9 * peak)).float().mean()
        if float(between) <= 0.01:
            return  # compression noise near background and foreground (JPEG masks)
        raise DataError(
            f"mask {name} has more than two values {_values_text(values)} ({float(between):.0%} of its pixels between "
            f"background and foreground): it holds several classes, but out_channels is {self.out_channels} (binary), "
            "and binarising it would merge them. For several classes give --out_channels with one more than the "
            "largest class index (class indices 0, 1, 2, ... in one channel); for a binary task save background and "
            "foreground only."
        )
