"""The bundle's built-in default dataset: generated polyp-like images written as real files.

It lets ``python -m monai.bundle run training`` work on a fresh machine with no data and no
download, through the same loading path (``LoadImaged`` on PNG or NIfTI files) as real data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from monai_adv.errors import DataError

__all__ = ["ensure_synthetic_dataset", "make_synthetic_dataset"]

_MANIFEST = "manifest.json"


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: coarse random values upsampled (nearest) and box-blurred."""
    coarse = rng.random(tuple(max(2, s // scale) for s in shape))
    for axis, size in enumerate(shape):
        coarse = np.repeat(coarse, int(np.ceil(size / coarse.shape[axis])), axis=axis)
    field = coarse[tuple(slice(0, s) for s in shape)]
    kernel = max(1, scale // 2)
    for axis in range(len(shape)):
        field = sum(np.roll(field, shift, axis=axis) for shift in range(-kernel, kernel + 1)) / (2 * kernel + 1)
    field -= field.min()
    return field / max(float(field.max()), 1e-8)


def _sample(rng: np.random.Generator, shape: tuple[int, ...], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """One image ``(channels, *shape)`` in [0, 1] and its binary mask ``shape``: 1 to 3 blobs on textured tissue."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    mask = np.zeros(shape, dtype=bool)
    shading = np.zeros(shape)
    for _ in range(int(rng.integers(1, 4))):
        centre = np.array([rng.uniform(0.2, 0.8) * s for s in shape]).reshape(-1, *([1] * len(shape)))
        radii = np.array([rng.uniform(0.07, 0.18) * s for s in shape]).reshape(-1, *([1] * len(shape)))
        distance = np.sqrt((((grid - centre) / radii) ** 2).sum(axis=0))
        mask |= distance <= 1.0
        shading = np.maximum(shading, np.clip(1.0 - distance, 0.0, 1.0))
    tissue = _smooth_noise(rng, shape, max(4, shape[0] // 8))
    base = np.array([0.75, 0.35, 0.3]) if channels == 3 else np.array([0.4])
    lesion = np.array([0.95, 0.7, 0.55]) if channels == 3 else np.array([0.75])
    image = np.empty((channels, *shape))
    for c in range(channels):
        background = base[c % len(base)] * (0.7 + 0.3 * tissue)
        foreground = lesion[c % len(lesion)] * (0.8 + 0.2 * shading)
        image[c] = np.where(mask, foreground, background)
    image += rng.normal(0.0, 0.04, size=image.shape)
    return np.clip(image, 0.0, 1.0), mask


def make_synthetic_dataset(
    root: str | os.PathLike,
    num_images: int = 80,
    size: int = 128,
    spatial_dims: int = 2,
    channels: int = 3,
    seed: int = 0,
) -> Path:
    """Write a synthetic segmentation dataset to ``root/images`` and ``root/masks``.

    2D: RGB (or grey) 8-bit PNG images and {0, 255} PNG masks. 3D: float32 NIfTI images and
    uint8 {0, 1} NIfTI masks. Files are paired by name (``case_000.png`` in both folders). The
    dataset is written to a temporary sibling folder and renamed into place, so ``root`` is
    either complete (with a ``manifest.json``) or absent.

    Args:
        root: the folder to create; must not exist.
        num_images: number of image/mask pairs.
        size: edge length of each image.
        spatial_dims: 2 (PNG) or 3 (NIfTI).
        channels: image channels: 3 (RGB) or 1 for 2D; any for 3D.
        seed: random seed; the same arguments give the same files.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: when ``root`` already exists.
        ValueError: for unsupported sizes, dimensions or channel counts.
    """
    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} already exists; remove it or choose another folder.")
    if spatial_dims not in (2, 3):
        raise DataError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    if spatial_dims == 2 and channels not in (1, 3):
        raise DataError(f"2D PNG images have 1 or 3 channels, got {channels!r}.")
    if num_images < 1 or size < 16 or channels < 1:
        raise DataError(f"need num_images >= 1, size >= 16, channels >= 1; got {num_images}, {size}, {channels}.")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        (staging / "images").mkdir()
        (staging / "masks").mkdir()
        rng = np.random.default_rng(seed)
        shape = (size,) * spatial_dims
        for index in range(num_images):
            image, mask = _sample(rng, shape, channels)
            name = f"case_{index:03d}"
            if spatial_dims == 2:
                pixels = np.round(image * 255).astype(np.uint8)
                pixels = pixels[0] if channels == 1 else np.moveaxis(pixels, 0, -1)
                Image.fromarray(pixels).save(staging / "images" / f"{name}.png")
                Image.fromarray(mask.astype(np.uint8) * 255).save(staging / "masks" / f"{name}.png")
            else:
                volume = np.moveaxis(image, 0, -1) if channels > 1 else image[0]
                nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), staging / "images" / f"{name}.nii.gz")
                nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), staging / "masks" / f"{name}.nii.gz")
        manifest = {
            "description": "monai-adv synthetic polyp-like segmentation data (generated, not clinical)",
            "num_images": num_images,
            "size": size,
            "spatial_dims": spatial_dims,
            "channels": channels,
            "seed": seed,
        }
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.replace(staging, root)
        except OSError as err:  # another process (e.g. a torchrun peer) finished first
            if root.exists():
                raise FileExistsError(f"{root} was created by another process meanwhile.") from err
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def ensure_synthetic_dataset(
    root: str | os.PathLike,
    num_images: int = 80,
    size: int = 128,
    spatial_dims: int = 2,
    channels: int = 3,
    seed: int = 0,
) -> Path:
    """Return ``root``, generating the synthetic dataset there on first use.

    Raises:
        ValueError: when ``root`` exists but holds a different or incomplete dataset.
    """
    root = Path(root)
    wanted = {"num_images": num_images, "size": size, "spatial_dims": spatial_dims, "channels": channels, "seed": seed}
    if not root.exists():
        try:
            return make_synthetic_dataset(root, **wanted)
        except FileExistsError:  # another process made it meanwhile
            pass
    manifest_path = root / _MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{root} exists but has no {_MANIFEST}: it is not a complete synthetic dataset. Remove it.")
    found = json.loads(manifest_path.read_text())
    different = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
    if different:
        raise DataError(
            f"{root} holds a synthetic dataset made with other settings (found, wanted): {different}. "
            "Remove it or use another folder."
        )
    return root
