"""Preprocessing of MRI/CT volumes, following MONAI's 3D conventions (the hippocampus overlay uses it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms import (
    EnsureTyped,
    Lambdad,
    NormalizeIntensity,
    Orientationd,
    RandCropByPosNegLabeld,
    SpatialPadd,
)
from monai.transforms.transform import MapTransform

from monai_adv.data.datalist import MaskToLabels
from monai_adv.data.loading import CheckedLoadImaged

__all__ = ["ZScored", "volume_patches", "volume_preprocessing"]

#: the item key that says a volume is already in normalised units (adversarial copies written by run augment)
NORMALIZED_KEY = "normalized"


class ZScored(MapTransform):
    """Z-score each volume on its own (``NormalizeIntensity(nonzero=True, channel_wise=True)``), except items whose
    ``flag_key`` is true: adversarial copies that ``run augment`` wrote in these units already, which must reload
    as they were written. Every output carries ``flag_key`` (True), so a batch of originals and copies collates.

    Args:
        keys: the image key(s).
        flag_key: the item key of already normalised volumes.
    """

    def __init__(self, keys: str | Sequence[str], flag_key: str = NORMALIZED_KEY) -> None:
        super().__init__(keys)
        self.flag_key = flag_key
        self.normalize = NormalizeIntensity(nonzero=True, channel_wise=True)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        if not bool(d.get(self.flag_key, False)):
            for key in self.key_iterator(d):
                d[key] = self.normalize(d[key])
        d[self.flag_key] = True
        return d


def volume_preprocessing(
    keys: Sequence[str] = ("image", "label"),
    out_channels: int = 2,
    spatial_size: Sequence[int] = (48, 64, 48),
    axcodes: str = "RAS",
) -> list[MapTransform]:
    """Load, reorient, label, z-score and pad volumes: the deterministic part of the 3D pipelines.

    ``CheckedLoadImaged`` (channel first, files named in errors), ``Orientationd`` to ``axcodes``, the label through
    :class:`~monai_adv.data.MaskToLabels` (class indices kept, values beyond ``out_channels - 1`` refused),
    :class:`ZScored` on the image (``NormalizeIntensity(nonzero=True, channel_wise=True)``, each volume on its own:
    scanners' scales differ by orders of magnitude, so a fixed range would be wrong; skipped for adversarial copies
    flagged ``"normalized": true``), ``SpatialPadd`` to at least
    ``spatial_size`` (volumes are never cropped; a larger one stays larger, which sliding-window inference handles),
    float32. Every transform is invertible or key-wise, so ``Invertd`` maps predictions back to the input's grid.

    Args:
        keys: image key first, then the label key (omit it for inference).
        out_channels: the network's classes (background included).
        spatial_size: the padded size (48x64x48 covers every MSD hippocampus case).
        axcodes: orientation of the arrays.

    Returns:
        the transforms.
    """
    keys = list(keys)
    image, labels = keys[0], keys[1:]
    transforms: list[MapTransform] = [
        CheckedLoadImaged(keys=keys, image_only=True, ensure_channel_first=True),
        Orientationd(keys=keys, axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if labels:
        transforms.append(Lambdad(keys=labels, func=MaskToLabels(out_channels=out_channels)))
    transforms += [
        ZScored(keys=image),
        SpatialPadd(keys=keys, spatial_size=list(spatial_size)),
        EnsureTyped(keys=keys, dtype=torch.float32),
    ]
    return transforms


def volume_patches(
    patch_size: Sequence[int] = (32, 32, 32), num_samples: int = 2, keys: Sequence[str] = ("image", "label")
) -> list[MapTransform]:
    """Random training patches, centred on foreground and background alike (``RandCropByPosNegLabeld``, 1:1)."""
    keys = list(keys)
    return [
        RandCropByPosNegLabeld(
            keys=keys,
            label_key=keys[1],
            spatial_size=list(patch_size),
            pos=1,
            neg=1,
            num_samples=int(num_samples),
            image_key=keys[0],
            image_threshold=-1e9,
        )
    ]
