"""Standard training augmentation: the control every adversarial recipe is compared with (and combined with)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.transforms import (
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    ScaleIntensityRanged,
)
from monai.transforms.transform import MapTransform
from monai.utils import look_up_option

from monai_adv.attacks.spec import check_value_range

__all__ = ["AUGMENTATIONS", "training_augmentation"]

AUGMENTATIONS = ("none", "standard")


def training_augmentation(
    name: str,
    keys: Sequence[str] = ("image", "label"),
    spatial_dims: int = 2,
    value_range: Sequence[float] | None = None,
) -> list[MapTransform]:
    """The random transforms of the bundle's ``--augment NAME``, applied to training batches only.

    ``standard`` is what a MONAI user would write first: flips along every axis and quarter turns (2D: in the image
    plane; 3D: in the first two axes), a small affine (rotation up to 15 degrees, scaling by up to 10%, nearest
    interpolation for the label), Gaussian noise (std 0.02 of the [0, 1] intensity range) and a random gamma
    (0.8-1.2) on the image. With ``value_range`` the image is clipped back into it afterwards: the noise leaves
    the intensity range, and an attack that clamps to that range (``clamp="range"``) refuses images outside it.
    Flips and quarter turns assume that the classes do not depend on orientation; where they do (the hippocampus'
    anterior and posterior parts), leave ``standard`` out (the bundle's ``configs/hippocampus.json`` does).

    Args:
        name: ``none`` or ``standard``.
        keys: image and label keys (the first is the image).
        spatial_dims: 2 or 3.
        value_range: ``(low, high)`` of the preprocessed intensities (the bundle's 2D and synthetic images:
            ``(0, 1)``), or ``None`` to leave the noisy intensities as they are (z-scored volumes).

    Returns:
        the transforms (empty for ``none``), each randomizable: a ``CacheDataset`` caches up to the first of them.

    Raises:
        ValueError: for another name, naming the choices, or a ``value_range`` that is not ``(low, high)``.
    """
    name = look_up_option(str(name).strip().lower(), AUGMENTATIONS)
    clip: list[MapTransform] = []
    if value_range is not None:
        low, high = check_value_range(value_range, "training_augmentation: value_range")
        # an identity scaling that clips: MONAI's way of bounding intensities
        clip = [ScaleIntensityRanged(keys=keys[0], a_min=low, a_max=high, b_min=low, b_max=high, clip=True)]
    if name == "none":
        return []
    image, keys = keys[0], list(keys)
    angle = math.radians(15)
    rotate = (angle,) if spatial_dims == 2 else (angle, angle, angle)
    return [
        *[RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)],
        RandRotate90d(keys=keys, prob=0.5, max_k=3, spatial_axes=(0, 1)),
        RandAffined(
            keys=keys,
            prob=0.5,
            rotate_range=rotate,
            scale_range=(0.1,) * spatial_dims,
            mode=["bilinear", "nearest"] if len(keys) > 1 else "bilinear",
            padding_mode="border",
        ),
        RandGaussianNoised(keys=image, prob=0.3, mean=0.0, std=0.02),
        RandAdjustContrastd(keys=image, prob=0.3, gamma=(0.8, 1.2)),
        *clip,
    ]
