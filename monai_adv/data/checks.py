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

__all__ = ["ImageHeader", "check_datalist", "has_foreground", "read_fully", "read_header"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_MAX_LISTED = 10


class ImageHeader(NamedTuple):
    """What a file's header says, in MONAI's axis order (PIL images as width x height, as ``LoadImage``)."""

    path: str
    spatial_shape: tuple[int, ...]
    channels: int
    mode: str  # PIL mode ("RGB", "L", "RGBA", ...) or "nifti"

    @property
    def size(self) -> str:
        return "x".join(str(s) for s in self.spatial_shape)


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
            return ImageHeader(str(path), shape[:rank], int(np.prod(shape[rank:], dtype=int)), "nifti")
        with Image.open(path) as image:
            return ImageHeader(str(path), tuple(image.size), len(image.getbands()), image.mode)
    except Exception as err:
        raise DataError(f"{path} cannot be read as an image: {type(err).__name__}: {err}") from err


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
) -> None:
    """Check every item's files from their headers before anything is loaded.

    Refused, all at once in one message that names each file:

    - a missing or unreadable file;
    - an image whose number of spatial axes is not ``spatial_dims`` (e.g. 2D PNGs with ``spatial_dims=3``),
      or, without ``spatial_dims``, images of different dimensionality;
    - an image whose channel count is not ``in_channels`` (a grey or RGBA image among RGB ones), or,
      without ``in_channels``, images whose channel counts differ;
    - a mask whose spatial size differs from its image's (it would be resized to fit, silently wrong);
    - a mask with an alpha channel (the alpha would count as foreground everywhere).

    Colour masks without alpha are accepted: any non-zero channel is foreground.

    Args:
        items: dictionaries with ``image_key`` and, optionally, ``label_key`` file paths.
        spatial_dims: expected spatial dimensionality of the images, or None to only require agreement.
        in_channels: expected channel count of the images, or None to only require agreement.
        foreground_items: when given, warn if none of their masks has any foreground (the training set).
        name: what the items are, for messages.

    Raises:
        ValueError: listing every problem found, with file names and sizes.

    Warns:
        UserWarning: when no mask of ``foreground_items`` has any foreground.
    """
    problems: list[str] = []
    images: list[ImageHeader] = []
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
        if label_key not in item:
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
    if foreground_items:
        masks = [item[label_key] for item in foreground_items if label_key in item]
        # stop at the first mask with foreground: one decode on ordinary data
        if masks and not any(has_foreground(path) for path in masks):
            warnings.warn(
                f"none of the {len(masks)} training masks of {name} has any foreground (e.g. {masks[0]}): "
                "the network can only learn background. Check the masks' values and channels.",
                stacklevel=2,
            )
