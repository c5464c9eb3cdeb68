"""``LoadImaged`` that names the file it could not read, or whose values are NaN or infinite."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.transforms import LoadImaged

from monai_adv.data.checks import read_fully
from monai_adv.errors import DataError, LoadError, UnreadableFileError

__all__ = ["CheckedLoadImageD", "CheckedLoadImageDict", "CheckedLoadImaged"]


class CheckedLoadImaged(LoadImaged):
    """:class:`monai.transforms.LoadImaged` whose read and decode errors name the key and the file.

    PIL decodes lazily, so a truncated JPEG fails inside ``LoadImaged`` with a bare
    ``OSError: image file is truncated`` that names no file. This subclass takes the same
    arguments and, when loading fails, decodes each of the item's files on its own to find the
    culprit and re-raises with its key and path (the original error chained as the cause).

    A loaded image with NaN or infinite values is refused, naming its file: it would make the loss, and then the
    model, NaN.

    Raises:
        OSError: for an undecodable file (a truncated or corrupt image), naming it.
        DataError: (a ``ValueError``) for a file with NaN or infinite values, naming it and the count.
        RuntimeError: for any other loading error, naming the item's files.
    """

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        loaded = self._load(data, reader)
        for key in self.key_iterator(loaded):
            value = loaded[key]
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                finite = torch.isfinite(value)
                if not bool(finite.all()):
                    count = int(finite.numel() - finite.sum())
                    raise DataError(
                        f"{key!r} file {data.get(key)} has {count} NaN or infinite value(s) of {finite.numel()}: "
                        "they would make the loss and the model NaN. Fix or remove the file."
                    )
        return loaded

    def _load(self, data: Mapping[Hashable, Any], reader: Any) -> dict[Hashable, Any]:
        try:
            return super().__call__(data, reader)
        except Exception as err:
            files = {key: data[key] for key in self.key_iterator(dict(data))}
            for key, path in files.items():
                if not isinstance(path, str) and not hasattr(path, "__fspath__"):  # e.g. a list of files (series)
                    continue
                try:
                    read_fully(path)
                except ValueError as decode_error:
                    raise UnreadableFileError(f"cannot load {key!r}: {decode_error}") from err
            listing = ", ".join(f"{key}={path}" for key, path in files.items())
            raise LoadError(f"cannot load {listing}: {type(err).__name__}: {err}") from err


CheckedLoadImageD = CheckedLoadImageDict = CheckedLoadImaged
