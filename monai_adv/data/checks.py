"""Up-front checks of image/mask files from their headers, so bad data fails at start naming the file.

Header reads (PIL ``Image.open``, nibabel ``load``) do not decode pixels, so checking a
thousand pairs takes well under a second; decode errors (a truncated JPEG) are caught when the
file is loaded, by :class:`~monai_adv.data.CheckedLoadImaged`, or up front by :func:`read_fully`.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
from PIL import Image

from monai_adv.errors import DataError, MissingFileError

__all__ = [
    "MAX_CLIPPED_FRACTION",
    "ImageHeader",
    "ValueStats",
    "check_datalist",
    "exif_orientation",
    "has_foreground",
    "read_fully",
    "read_header",
    "read_values",
]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_MAX_LISTED = 10
# an image with more of its values outside intensity_range than this is refused (its scaling would flatten it)
MAX_CLIPPED_FRACTION = 0.1


class ImageHeader(NamedTuple):
    """What a file's header says, in MONAI's axis order (PIL images as width x height, as ``LoadImage``)."""

    path: str
    spatial_shape: tuple[int, ...]
    channels: int
    mode: str  # PIL mode ("RGB", "L", "RGBA", ...) or "nifti"
    dtype: str = ""  # the stored values' numpy dtype ("uint8", "uint16", "float32", ...), "" when unknown

    @property
    def size(self) -> str:
        return "x".join(str(s) for s in self.spatial_shape)

    @property
    def is_8bit(self) -> bool:
        """Whether the stored values are 8-bit integers (0..255 at most)."""
        return self.dtype in ("uint8", "bool")


class ValueStats(NamedTuple):
    """What :func:`read_values` found in a file's decoded values."""

    path: str
    minimum: float  # over the finite values (NaN when there is none)
    maximum: float
    non_finite: int  # how many values are NaN or infinite
    size: int  # how many values in all
    below: int = 0  # how many finite values are below the range :func:`read_values` was given
    above: int = 0  # ... above it

    @property
    def clipped_fraction(self) -> float:
        """The share of values outside the range given to :func:`read_values`."""
        return (self.below + self.above) / max(self.size, 1)


# numpy dtype of the values PIL decodes for each mode (as np.asarray(image) gives them, and MONAI's PILReader)
_PIL_DTYPES = {"1": "bool", "I;16": "uint16", "I;16B": "uint16", "I;16L": "uint16", "I;16N": "uint16",
               "I": "int32", "F": "float32"}  # fmt: skip


def _is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(_NIFTI_SUFFIXES)


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Spatial shape, channel count and mode of an image file, read from its header only.

    NIfTI files follow MONAI's ``NibabelReader``: up to three spatial axes, later axes are channels.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file cannot be opened as an image, naming it.
    """
    if not Path(path).is_file():
        raise MissingFileError(f"{path} does not exist.")
    try:
        if _is_nifti(path):
            image = nib.load(path)
            shape = tuple(int(s) for s in image.shape)
            rank = max(1, min(len(shape), 3))
            channels = int(np.prod(shape[rank:], dtype=int))
            return ImageHeader(str(path), shape[:rank], channels, "nifti", str(image.get_data_dtype()))
        with Image.open(path) as image:
            dtype = _PIL_DTYPES.get(image.mode, "uint8")
            return ImageHeader(str(path), tuple(image.size), len(image.getbands()), image.mode, dtype)
    except Exception as err:
        raise DataError(f"{path} cannot be read as an image: {type(err).__name__}: {err}") from err


def exif_orientation(path: str | os.PathLike) -> int:
    """The EXIF orientation tag of an image file (1, the default, when it has none or is not a PIL image).

    MONAI's PIL reader loads the stored pixels and ignores the tag, which viewers apply (a phone JPEG stored
    sideways with orientation 6 shows upright).
    """
    if _is_nifti(path):
        return 1
    try:
        with Image.open(path) as image:
            return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - unreadable files are reported by read_header
        return 1


def read_fully(path: str | os.PathLike) -> None:
    """Decode every pixel of ``path``: finds truncated or corrupt files that a header read misses.

    Raises:
        ValueError: naming the file and the decoder's error.
    """
    try:
        if _is_nifti(path):
            np.asanyarray(nib.load(path).dataobj)
        else:
            with Image.open(path) as image:
                image.load()
    except Exception as err:
        raise DataError(f"{path} cannot be decoded: {type(err).__name__}: {err}") from err


def _decoded(path: str | os.PathLike) -> np.ndarray:
    if _is_nifti(path):
        return np.asanyarray(nib.load(path).dataobj)
    with Image.open(path) as image:
        return np.asarray(image)


def read_values(path: str | os.PathLike, value_range: Sequence[float] | None = None) -> ValueStats:
    """Decode ``path`` and report its finite minimum and maximum, its NaN/Inf count, and the values outside
    ``value_range``.

    Args:
        path: an image file.
        value_range: ``(low, high)`` to count the values below and above, or None.

    Raises:
        DataError: when the file cannot be decoded, naming it.
    """
    try:
        values = np.asarray(_decoded(path))
    except Exception as err:
        raise DataError(f"{path} cannot be decoded: {type(err).__name__}: {err}") from err
    if values.dtype == bool:
        values = values.astype(np.uint8)
    finite = np.isfinite(values) if np.issubdtype(values.dtype, np.floating) else np.ones(values.shape, dtype=bool)
    non_finite = int(values.size - np.count_nonzero(finite))
    kept = values[finite] if non_finite else values.ravel()
    minimum = float(kept.min()) if kept.size else float("nan")
    maximum = float(kept.max()) if kept.size else float("nan")
    below = above = 0
    if value_range is not None and kept.size:
        low, high = (float(v) for v in value_range)
        below, above = int(np.count_nonzero(kept < low)), int(np.count_nonzero(kept > high))
    return ValueStats(str(path), minimum, maximum, non_finite, int(values.size), below, above)


def has_foreground(path: str | os.PathLike) -> bool:
    """Whether a mask file has any non-zero value in any channel (what :func:`binarize_mask` keeps).

    Raises:
        ValueError: when the file cannot be decoded, naming it.
    """
    try:
        if _is_nifti(path):
            return bool(np.asanyarray(nib.load(path).dataobj).any())
        with Image.open(path) as image:
            return bool(np.asarray(image).any())
    except Exception as err:
        raise DataError(f"{path} cannot be decoded: {type(err).__name__}: {err}") from err


def _range_text(value_range: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in value_range) + "]"


def _check_values(image: ImageHeader, intensity_range: Sequence[float], problems: list[str]) -> ValueStats | None:
    """Decode ``image`` unless its type keeps it inside ``intensity_range``; add a problem for NaN/Inf values or for
    a range that would clip much of it. Returns what was found, or None when the file was not decoded."""
    low, high = (float(v) for v in intensity_range)
    if image.is_8bit and low <= 0.0 and high >= 255.0:
        return None
    try:
        stats = read_values(image.path, (low, high))
    except DataError as err:
        problems.append(str(err))
        return None
    kind = f"mode {image.mode}, {image.dtype}" if image.mode != "nifti" else f"NIfTI, {image.dtype}"
    if stats.non_finite:
        problems.append(
            f"{image.path} ({kind}) has {stats.non_finite} NaN or infinite value(s) of {stats.size}: "
            "they would make the loss and the model NaN. Fix or remove the file."
        )
    elif stats.clipped_fraction > MAX_CLIPPED_FRACTION:
        problems.append(
            f"{image.path} ({kind}, values {stats.minimum:g}..{stats.maximum:g}) has "
            f"{stats.clipped_fraction:.0%} of its values outside intensity_range {_range_text(intensity_range)}, "
            "which the scaling would clip to 0 or 1. Use --intensity_range null (each image scaled by its own min "
            f'and max) or a range that holds the data, e.g. --intensity_range "[{stats.minimum:g}, '
            f'{stats.maximum:g}]".'
        )
    return stats


def _suffix(path: str) -> str:
    name = path.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


def _unreadable_formats(items: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    """One problem per file suffix that no reader of MONAI's ``LoadImage`` (as installed) accepts."""
    from monai.transforms import LoadImage

    readers = LoadImage(image_only=True).readers
    examples: dict[str, str] = {}
    for item in items:
        for key in keys:
            if isinstance(item.get(key), (str, os.PathLike)):
                examples.setdefault(_suffix(str(item[key])), str(item[key]))
    return [
        f"{path}: MONAI's image readers installed here cannot load {suffix} files (its PIL reader takes PNG, JPEG "
        "and BMP; TIFF needs itk: pip install itk). Convert the files to PNG or NIfTI, or install a reader."
        for suffix, path in sorted(examples.items())
        if not any(reader.verify_suffix(path) for reader in readers)
    ]


def _listed(problems: Sequence[str]) -> str:
    shown = "\n  ".join(problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


def check_datalist(
    items: Sequence[dict[str, Any]],
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
    foreground_items: Sequence[dict[str, Any]] | None = None,
    name: str = "datalist",
    intensity_range: Sequence[float] | None = None,
    require_label: bool = False,
) -> None:
    """Check every item's files from their headers (and, for the intensity range, their values) before training.

    Refused, all at once in one message that names each file:

    - a missing or unreadable file;
    - an image whose number of spatial axes is not ``spatial_dims`` (e.g. 2D PNGs with ``spatial_dims=3``),
      or, without ``spatial_dims``, images of different dimensionality;
    - an image whose channel count is not ``in_channels`` (a grey or RGBA image among RGB ones), or,
      without ``in_channels``, images whose channel counts differ;
    - a mask whose spatial size differs from its image's (it would be resized to fit, silently wrong);
    - a mask with an alpha channel (the alpha would count as foreground everywhere);
    - an image whose EXIF orientation differs from its mask's (viewers turn it, MONAI's loader does not);
    - with ``require_label``, an item without ``label_key`` (e.g. ``"mask"`` instead of ``"label"``);
    - a file of a format that none of MONAI's image readers installed here can load (TIFF without ``itk``);
    - with ``intensity_range`` (the fixed ``[low, high]`` scaling to [0, 1], values outside clipped): an image
      with more than :data:`MAX_CLIPPED_FRACTION` of its values outside the range (a 16-bit PNG or a CT in
      Hounsfield units with the 8-bit default ``[0, 255]``), or with NaN or infinite values. Only files that are
      not 8-bit, or ranges narrower than ``[0, 255]``, are decoded for this.

    Colour masks without alpha are accepted: any non-zero channel is foreground.

    Args:
        items: dictionaries with ``image_key`` and, optionally, ``label_key`` file paths.
        spatial_dims: expected spatial dimensionality of the images, or None to only require agreement.
        in_channels: expected channel count of the images, or None to only require agreement.
        foreground_items: when given, warn if none of their masks has any foreground (the training set).
        name: what the items are, for messages.
        intensity_range: ``(low, high)`` of the fixed intensity scaling, or None (per-image scaling: not checked).
        require_label: refuse items without ``label_key`` (training data), naming their other keys.

    Raises:
        DataError: (a ``ValueError``) listing every problem found, with file names, sizes and values.

    Warns:
        UserWarning: when no mask of ``foreground_items`` has any foreground; when some images have a few values
            (up to :data:`MAX_CLIPPED_FRACTION`) outside ``intensity_range``.
    """
    problems: list[str] = []
    images: list[ImageHeader] = []
    partly_clipped: list[ValueStats] = []
    for index, item in enumerate(items):
        if image_key not in item:
            problems.append(f"item {index} of {name} has no {image_key!r} key: {item}")
            continue
        try:
            image = read_header(item[image_key])
        except (FileNotFoundError, ValueError) as err:
            problems.append(str(err))
            continue
        images.append(image)
        if spatial_dims is not None and len(image.spatial_shape) != spatial_dims:
            problems.append(
                f"{image.path} has {len(image.spatial_shape)} spatial dimensions (size {image.size}), "
                f"but spatial_dims is {spatial_dims}."
            )
        if in_channels is not None and image.channels != in_channels:
            problems.append(
                f"{image.path} has {image.channels} channel(s) (mode {image.mode}), but in_channels is {in_channels}."
            )
        if intensity_range is not None:
            stats = _check_values(image, intensity_range, problems)
            if stats is not None and stats.clipped_fraction > 0:
                partly_clipped.append(stats)
        if label_key not in item:
            if require_label:
                others = ", ".join(repr(k) for k in item if k != image_key)
                problems.append(
                    f"item {index} of {name} ({item[image_key]}) has no {label_key!r} key"
                    + (f" (its other keys: {others}): name the mask's key {label_key!r}." if others else ".")
                )
            continue
        try:
            mask = read_header(item[label_key])
        except (FileNotFoundError, ValueError) as err:
            problems.append(str(err))
            continue
        if mask.spatial_shape != image.spatial_shape:
            problems.append(
                f"mask {mask.path} is {mask.size} but its image {image.path} is {image.size}: "
                "masks must have their image's size."
            )
        if "A" in mask.mode or "a" in mask.mode:
            problems.append(f"mask {mask.path} has an alpha channel (mode {mask.mode}): save it as a grey image.")
        turned, mask_turned = exif_orientation(image.path), exif_orientation(mask.path)
        if turned != mask_turned:
            problems.append(
                f"{image.path} has EXIF orientation {turned} and its mask {mask.path} has {mask_turned}: viewers "
                "rotate or mirror the image, MONAI's loader does not, so the pair may not line up. Save both without "
                "an orientation tag (e.g. PIL.ImageOps.exif_transpose, then save)."
            )
    problems.extend(_unreadable_formats(items, (image_key, label_key)))
    for attribute, setting, what in (
        ("spatial_shape", spatial_dims, "spatial dimension(s)"),
        ("channels", in_channels, "channel(s)"),
    ):
        if setting is not None or not images:
            continue

        def value(header: ImageHeader, attribute: str = attribute) -> int:
            return len(header.spatial_shape) if attribute == "spatial_shape" else header.channels

        counts = Counter(value(h) for h in images)
        if len(counts) > 1:
            usual = counts.most_common(1)[0][0]
            problems.extend(
                f"{h.path} has {value(h)} {what} (mode {h.mode}), but most images of {name} "
                f"({counts[usual]} of {len(images)}) have {usual}."
                for h in images
                if value(h) != usual
            )
    if problems:
        raise DataError(f"{len(problems)} problem(s) in the files of {name}:{_listed(problems)}")
    if partly_clipped and intensity_range is not None:
        worst = max(partly_clipped, key=lambda stats: stats.clipped_fraction)
        warnings.warn(
            f"{len(partly_clipped)} image(s) of {name} have values outside intensity_range "
            f"{_range_text(intensity_range)}, clipped by the scaling (at most {worst.clipped_fraction:.1%} of an "
            f"image: {worst.path}, values {worst.minimum:g}..{worst.maximum:g}). If that is not intended, give "
            "--intensity_range null (each image scaled by its own min and max) or a range that holds the data.",
            stacklevel=2,
        )
    if foreground_items:
        masks = [item[label_key] for item in foreground_items if label_key in item]
        # stop at the first mask with foreground: one decode on ordinary data
        if masks and not any(has_foreground(path) for path in masks):
            warnings.warn(
                f"none of the {len(masks)} training masks of {name} has any foreground (e.g. {masks[0]}): "
                "the network can only learn background. Check the masks' values and channels.",
                stacklevel=2,
            )
