"""Checks of the bundle's command-line settings that MONAI's config parser cannot express."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

__all__ = ["spatial_size"]


def spatial_size(image_size: int | Sequence[int], spatial_dims: int) -> list[int]:
    """The network's input size from ``--image_size`` (one number, or one per spatial dimension).

    Args:
        image_size: a positive integer used for every axis, or a sequence of ``spatial_dims`` positive integers.
        spatial_dims: 2 or 3.

    Returns:
        ``[size] * spatial_dims`` or the sequence as a list.

    Raises:
        ValueError: for ``spatial_dims`` other than 2 or 3, a size that is not a positive integer, or a
            sequence of the wrong length.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    sizes = [image_size] * spatial_dims if not isinstance(image_size, Sequence) else list(image_size)
    if isinstance(image_size, str) or len(sizes) != spatial_dims:
        raise ValueError(
            f"image_size must be one positive integer or {spatial_dims} of them (spatial_dims={spatial_dims}), "
            f"got {image_size!r}."
        )
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"image_size must hold positive integers, got {image_size!r}.")
    return [int(s) for s in sizes]
