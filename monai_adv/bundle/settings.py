"""Checks of the bundle's command-line settings that MONAI's config parser cannot express.

MONAI's bundle CLI reads override values with ``fire``: ``--max_epochs 5`` arrives as ``5``, ``--intensity_range
null`` as the string ``"null"`` and ``--max_epochs abc`` as the string ``"abc"``. The functions here turn such
values into what the configs need, or refuse them at start with a :class:`~monai_adv.errors.SettingsError` that names
the key, before any data is loaded.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from monai_adv.data.augmentation import AUGMENTATIONS
from monai_adv.engines.recipes import RECIPES
from monai_adv.errors import SettingsError

__all__ = ["ADV_METHODS", "check_settings", "intensity_range", "intensity_scaling", "memory_format", "spatial_size"]

ADV_METHODS = ("none", "fgsm", "invfgsm", "both")
_NULL_WORDS = ("null", "none", "")
_TRUE_WORDS = ("true", "yes", "y", "t")
_BOOLEAN_WORDS = (*_TRUE_WORDS, "false", "no", "n", "f")


def spatial_size(image_size: int | Sequence[int], spatial_dims: int) -> list[int]:
    """The network's input size from ``--image_size`` (one number, or one per spatial dimension).

    Args:
        image_size: a positive integer used for every axis, or a sequence of ``spatial_dims`` positive integers.
        spatial_dims: 2 or 3.

    Returns:
        ``[size] * spatial_dims`` or the sequence as a list.

    Raises:
        SettingsError: (a ``ValueError``) for ``spatial_dims`` other than 2 or 3, a size that is not a positive
            integer, or a sequence of the wrong length.
    """
    if spatial_dims not in (2, 3):
        raise SettingsError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    sizes = [image_size] * spatial_dims if not isinstance(image_size, Sequence) else list(image_size)
    if isinstance(image_size, str) or len(sizes) != spatial_dims:
        raise SettingsError(
            f"image_size must be one positive integer or {spatial_dims} of them (spatial_dims={spatial_dims}), "
            f"got {image_size!r}."
        )
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise SettingsError(f"image_size must hold positive integers, got {image_size!r}.")
    return [int(s) for s in sizes]


def intensity_range(value: Any) -> list[float] | None:
    """``--intensity_range`` as ``[low, high]`` floats, or None for per-image min/max scaling.

    Accepts None and the words ``null`` / ``none`` / ``None`` in any case (how MONAI users write "no value" on the
    command line), a ``[low, high]`` pair of numbers, or its text (``"[0, 4095]"``, ``"0,4095"``).

    Args:
        value: the setting as the config holds it.

    Returns:
        ``[low, high]`` with ``low < high``, or None.

    Raises:
        SettingsError: naming ``intensity_range`` for anything else (one number, three numbers, ``low >= high``,
            non-finite numbers, words).
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in _NULL_WORDS):
        return None
    pair: Any = value
    if isinstance(value, str):
        parts = value.strip().strip("[]()").split(",")
        try:
            pair = [float(part) for part in parts]
        except ValueError:
            pair = None
    usage = (
        '--intensity_range "[low, high]" (fixed scaling of [low, high] to [0, 1], values outside clipped) or '
        "--intensity_range null (each image scaled by its own min and max)"
    )
    if (
        not isinstance(pair, Sequence)
        or isinstance(pair, str)
        or len(pair) != 2
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair)
    ):
        raise SettingsError(f"intensity_range must be {usage}; got {value!r}.")
    low, high = (float(v) for v in pair)
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise SettingsError(f"intensity_range must have finite low < high, got {value!r}: use {usage}.")
    return [low, high]


def intensity_scaling(value: Any, keys: str | Sequence[str] = "image") -> Any:
    """The bundle's intensity transform for ``--intensity_range`` (see :func:`intensity_range`).

    Args:
        value: the ``intensity_range`` setting.
        keys: the image keys to scale.

    Returns:
        ``ScaleIntensityd(minv=0, maxv=1)`` (per-image min/max) when the range is None, else
        ``ScaleIntensityRanged(a_min=low, a_max=high, b_min=0, b_max=1, clip=True)``.

    Raises:
        SettingsError: for a value that is not a range or null.
    """
    from monai.transforms import ScaleIntensityd, ScaleIntensityRanged

    scaled = intensity_range(value)
    if scaled is None:
        return ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0)
    return ScaleIntensityRanged(keys=keys, a_min=scaled[0], a_max=scaled[1], b_min=0.0, b_max=1.0, clip=True)


def memory_format(channels_last: Any, spatial_dims: int) -> Any:
    """The ``torch.memory_format`` of ``--channels_last``: ``torch.channels_last`` (2D) or
    ``torch.channels_last_3d`` (3D) when true, else ``torch.contiguous_format``.

    The network's weights in channels-last make its convolutions run channels-last (PyTorch follows the weight's
    format); on a CPU it helps most beside ``--amp true`` (bf16). Results equal the default format's up to
    floating-point rounding.

    Raises:
        SettingsError: for a value that is not true or false, or true with ``spatial_dims`` other than 2 or 3.
    """
    import torch

    problem = _boolean("channels_last", channels_last)
    if problem:
        raise SettingsError(problem)
    if not (channels_last if isinstance(channels_last, bool) else str(channels_last).strip().lower() in _TRUE_WORDS):
        return torch.contiguous_format
    formats = {2: torch.channels_last, 3: torch.channels_last_3d}
    if int(spatial_dims) not in formats:
        raise SettingsError(f"--channels_last true needs spatial_dims 2 or 3, got {spatial_dims!r}.")
    return formats[int(spatial_dims)]


def _integer(key: str, value: Any, minimum: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        return f"--{key} must be an integer >= {minimum}, got {value!r}."
    return None


def _number(key: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> str | None:
    bound = f"> {low:g}" if low_open else f">= {low:g}"
    if high < math.inf:
        bound = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return f"--{key} must be a number {bound}, got {value!r}."
    if value < low or (low_open and value == low) or value > high:
        return f"--{key} must be a number {bound}, got {value!r}."
    return None


def _adv_method(value: Any) -> str | None:
    method = str(value).strip().lower()
    if method in ADV_METHODS:
        return None
    message = f"--adv#method must be one of {', '.join(ADV_METHODS)}; got {value!r}."
    if method in ("pgd", "ifgsm", "i-fgsm", "bim"):
        return (
            f"{message} PGD adversarial training is the recipe --adv#recipe pgd; iterative FGSM is --adv#method "
            "fgsm with --adv#num_steps N (e.g. --adv#method fgsm --adv#num_steps 10; invfgsm and both iterate the "
            "same way)."
        )
    if method in RECIPES:
        return f"{message} {method!r} is a recipe: --adv#recipe {method}."
    distance, closest = min((_edit_distance(method, option), option) for option in ADV_METHODS)
    return message + (f" Did you mean {closest!r}?" if distance <= max(2, len(method) // 2 + 1) else "")


def _edit_distance(first: str, second: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    previous = list(range(len(second) + 1))
    for i, a in enumerate(first, 1):
        current = [i]
        for j, b in enumerate(second, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a != b)))
        previous = current
    return previous[-1]


def _epsilon(value: Any) -> str | None:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if len(values) not in (1, 2) or any(_number("adv#epsilon", v, 0.0) for v in values):
        return f"--adv#epsilon must be a number >= 0 or a [low, high] range of them, got {value!r}."
    if len(values) == 2 and values[0] > values[1]:
        return f"--adv#epsilon range must have low <= high, got {value!r}."
    return None


def _choice(key: str, value: Any, choices: Sequence[str]) -> str | None:
    if str(value).strip().lower() in choices:
        return None
    return f"--{key} must be one of {', '.join(choices)}; got {value!r}."


def _boolean(key: str, value: Any) -> str | None:
    if isinstance(value, bool) or str(value).strip().lower() in _BOOLEAN_WORDS:
        return None
    return f"--{key} must be true or false, got {value!r}."


_CHECKS: dict[str, Any] = {
    "max_epochs": lambda v: _integer("max_epochs", v, 1),
    "val_interval": lambda v: _integer("val_interval", v, 1),
    "batch_size": lambda v: _integer("batch_size", v, 1),
    "num_workers": lambda v: _integer("num_workers", v, 0),
    "seed": lambda v: _integer("seed", v, 0),
    "split_seed": lambda v: _integer("split_seed", v, 0),
    "in_channels": lambda v: _integer("in_channels", v, 1),
    "out_channels": lambda v: _integer("out_channels", v, 1),
    "learning_rate": lambda v: _number("learning_rate", v, 0.0, low_open=True),
    "val_fraction": lambda v: _number("val_fraction", v, 0.0, 1.0, low_open=True),
    "resume": lambda v: _boolean("resume", v),
    "channels_last": lambda v: _boolean("channels_last", v),
    "adv#method": _adv_method,
    "adv#epsilon": _epsilon,
    "adv#num_steps": lambda v: _integer("adv#num_steps", v, 1),
    "adv#start_epoch": lambda v: _integer("adv#start_epoch", v, 0),
    "adv#prob": lambda v: _number("adv#prob", v, 0.0, 1.0),
    "adv#replace_fraction": lambda v: _number("adv#replace_fraction", v, 0.0, 1.0),
    "adv#mode": lambda v: _choice("adv#mode", v, ("append", "replace", "free")),
    "adv#recipe": lambda v: _choice("adv#recipe", v, tuple(RECIPES)),
    "augment": lambda v: _choice("augment", v, AUGMENTATIONS),
    "adv#fused": lambda v: _boolean("adv#fused", v),
    "adv#track_loss": lambda v: _boolean("adv#track_loss", v),
}


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check the bundle's scalar settings at start, before the data is loaded, naming each bad key.

    Known keys (others are passed through unchecked): ``max_epochs``, ``val_interval``, ``batch_size`` (integers
    >= 1), ``num_workers``, ``seed``, ``split_seed`` (integers >= 0), ``in_channels``, ``out_channels``,
    ``learning_rate`` (> 0), ``val_fraction`` (in (0, 1]), ``resume`` and ``channels_last`` (true/false), and the ``adv#*`` settings:
    ``method`` (none, fgsm, invfgsm, both; ``pgd`` is told to use ``--adv#num_steps``), ``epsilon`` (>= 0, or a
    ``[low, high]`` range), ``num_steps`` (>= 1), ``start_epoch`` (>= 0), ``prob`` and ``replace_fraction``
    (in [0, 1]), ``mode`` (append, replace, free), ``recipe`` (a preset), ``augment`` (none, standard), ``fused`` and ``track_loss`` (true/false), and ``intensity_range``
    (see :func:`intensity_range`) and ``image_size`` with ``spatial_dims`` (see :func:`spatial_size`).

    Args:
        settings: ``{key: value}`` with the keys as written on the command line without ``--``
            (e.g. ``{"max_epochs": @max_epochs, "adv#method": @adv#method}`` in a config).

    Returns:
        ``settings`` as a dict, unchanged.

    Raises:
        SettingsError: (a ``ValueError``) listing every bad key with its value and what it must be.
    """
    problems = [message for key, value in settings.items() if key in _CHECKS and (message := _CHECKS[key](value))]
    if "intensity_range" in settings:
        try:
            intensity_range(settings["intensity_range"])
        except SettingsError as err:
            problems.append(f"--{err}")
    if "image_size" in settings and "spatial_dims" in settings:
        try:
            spatial_size(settings["image_size"], settings["spatial_dims"])
        except SettingsError as err:
            problems.append(f"--{err}")
    if problems:
        first = problems[0] if len(problems) == 1 else f"{len(problems)} bad settings: " + " ".join(problems)
        raise SettingsError(first)
    return dict(settings)
