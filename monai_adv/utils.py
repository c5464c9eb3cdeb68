"""Small helpers the bundle configs call: choosing a component by name, finding a checkpoint."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

__all__ = ["latest_checkpoint", "select"]

T = TypeVar("T")


def select(name: str, options: Mapping[str, T], what: str = "option") -> T:
    """``options[name]``, with an error that lists the valid names.

    Used by the bundle to pick, e.g., the adversarial method or the loss from a config override.

    Raises:
        ValueError: when ``name`` is not a key of ``options``.
    """
    key = str(name).lower()
    if key not in options:
        raise ValueError(f"unknown {what} {name!r}: choose one of {sorted(options)}.")
    return options[key]


def latest_checkpoint(folder: str | os.PathLike, pattern: str = "checkpoint_epoch=*.pt") -> str:
    """The most recent file matching ``pattern`` in ``folder`` (by the epoch in its name, then time).

    Raises:
        FileNotFoundError: when no checkpoint matches.
    """
    found = list(Path(folder).glob(pattern))
    if not found:
        raise FileNotFoundError(f"no checkpoint matching {pattern!r} in {folder}: nothing to resume from.")

    def order(path: Path) -> tuple[int, float]:
        digits = "".join(ch for ch in path.stem.rsplit("=", 1)[-1] if ch.isdigit())
        return (int(digits) if digits else -1, path.stat().st_mtime)

    return str(max(found, key=order))


