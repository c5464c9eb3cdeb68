"""Small helpers the bundle configs call: choosing a component by name, finding a checkpoint."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

__all__ = ["as_bool", "latest_checkpoint", "require_file", "select"]

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


def require_file(path: str | os.PathLike, what: str = "file") -> str:
    """Return ``path`` if it is a file, else raise an error that says which input it was.

    Raises:
        FileNotFoundError: when ``path`` is not a file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} does not exist.")
    return str(path)


def as_bool(value: bool | int | str, name: str = "value") -> bool:
    """A command-line flag as a bool: ``--resume true`` arrives as the string ``"true"``.

    Raises:
        ValueError: for anything but a bool, 0/1 or true/false/yes/no/on/off (any case).
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", "none", ""):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}.")
