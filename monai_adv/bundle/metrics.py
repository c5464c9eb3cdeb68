"""Scores per class: the names of the classes and MONAI metric handlers for each, beside the foreground means."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai.handlers import MeanDice, MeanIoUHandler, from_engine

__all__ = ["class_names", "per_class_metrics"]


def _slug(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", str(name).strip().lower()).strip("_") or "class"


def class_names(
    out_channels: int, dataset_dir: str | os.PathLike | None = None, datalist_file: str | os.PathLike | None = None
) -> list[str]:
    """Names of the classes after the background, for metric keys (``val_iou_<name>``).

    From the ``labels`` of a Decathlon ``dataset.json`` (in ``dataset_dir``, or ``datalist_file`` itself when it
    has one) when it names ``out_channels`` classes, lower-cased with ``_`` for other characters; else
    ``foreground`` for a binary task and ``class_1``, ``class_2``, ... otherwise.

    Raises:
        ValueError: when ``dataset.json``'s labels name another number of classes than ``out_channels``.
    """
    out_channels = int(out_channels)
    count = max(out_channels, 2) - 1
    for source in (Path(dataset_dir) / "dataset.json" if dataset_dir else None, datalist_file):
        if source is None or not Path(source).is_file():
            continue
        try:
            labels = json.loads(Path(source).read_text()).get("labels")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(labels, dict) and labels:
            ordered = [labels[k] for k in sorted(labels, key=lambda k: int(k))]
            if len(ordered) != max(out_channels, 2):
                raise ValueError(
                    f"{source} names {len(ordered)} labels {ordered} (background included), but out_channels is "
                    f"{out_channels}: give --out_channels {len(ordered)}."
                )
            return [_slug(n) for n in ordered[1:]]
    return ["foreground"] if count == 1 else [f"class_{k}" for k in range(1, count + 1)]


def _channel(index: int) -> Callable[[Any], tuple[list, list]]:
    pick = from_engine(["pred", "label"])

    def output_transform(output: Any) -> tuple[list, list]:
        preds, labels = pick(output)
        return [p[index : index + 1] for p in preds], [y[index : index + 1] for y in labels]

    return output_transform


def per_class_metrics(names: Sequence[str], prefix: str = "val") -> dict[str, Any]:
    """MONAI metric handlers of IoU and Dice for each class after the background (none for a binary task, whose
    foreground mean is its one class), keyed ``<prefix>_iou_<name>`` and ``<prefix>_dice_<name>``.

    Each reads one channel of the one-hot ``pred`` and ``label`` (the bundle's validation postprocessing);
    a volume without the class in its label is left out of that class's mean, as MONAI's ``ignore_empty`` does.
    """
    if len(names) < 2:
        return {}
    metrics: dict[str, Any] = {}
    for k, name in enumerate(names, start=1):
        metrics[f"{prefix}_iou_{name}"] = MeanIoUHandler(include_background=True, output_transform=_channel(k))
        metrics[f"{prefix}_dice_{name}"] = MeanDice(include_background=True, output_transform=_channel(k))
    return metrics
