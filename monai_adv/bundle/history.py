"""What a training cost and measured, epoch by epoch, in a file beside its checkpoints.

MLflow holds the same numbers, but a study that compares many trainings reads files: they need no tracking server,
and they stay with the bundle root they describe.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["TrainingHistory"]


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number  # NaN is not a measurement


def _empty_totals() -> dict[str, float]:
    return {"seconds": 0.0, "cpu_seconds": 0.0, "iterations": 0, "images": 0}


class TrainingHistory:
    """Write ``{"epochs": [...], "total": {...}}`` to ``path`` after every training epoch and every validation.

    Each epoch entry holds ``epoch``, ``seconds`` (the epoch's wall time, validation excluded), ``cpu_seconds``
    (the process's CPU time over the same span, all threads: a cost that another job on the machine changes far
    less than the wall time), ``iterations``
    (optimiser steps), ``images`` (samples whose loss was backpropagated: with appended adversarial copies a batch
    of 16 counts 32), the trainer's epoch metrics (``train_epoch_loss``, ``adv_*``) and, in epochs that validated,
    the validator's metrics (``val_mean_iou``, ...). ``total`` sums seconds, CPU seconds, iterations and images. The counters
    are a checkpointable state (``state_dict``), so a resumed training continues them; entries after the resumed
    epoch (an interrupted training's) are dropped.

    Args:
        path: the JSON file (its folder is created).
        validator: the evaluator run by the trainer's ``ValidationHandler``; its ``state.epoch`` is the trainer's
            epoch when it validates (MONAI's ``Evaluator.run(global_epoch)``).
        adversarial_step: the trainer's :class:`~monai_adv.engines.AdversarialTrainingStep`, which says how many
            samples each iteration trained on; without it, the number of samples of ``engine.state.output``.
    """

    def __init__(self, path: str | os.PathLike, validator: Engine | None = None, adversarial_step: Any = None):
        self.path = Path(path)
        self.validator = validator
        self.adversarial_step = adversarial_step
        self.epochs: list[dict[str, Any]] = []
        self.totals = _empty_totals()
        self._epoch_start = self._last_iteration_end = 0.0
        self._epoch_cpu_start = self._last_iteration_cpu = 0.0
        self._epoch_counts = {"iterations": 0, "images": 0}
        self._trainer: Engine | None = None

    def attach(self, engine: Engine) -> None:
        """Count the trainer's iterations and epochs, and the validator's metrics."""
        self._trainer = engine
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        if self.validator is not None:
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self._validated)

    def _started(self, engine: Engine) -> None:
        done = int(engine.state.epoch)
        self.epochs = [e for e in self.epochs if e["epoch"] <= done]
        if not done:
            self.epochs, self.totals = [], _empty_totals()

    def _epoch_started(self, engine: Engine) -> None:
        self._epoch_start = self._last_iteration_end = time.perf_counter()
        self._epoch_cpu_start = self._last_iteration_cpu = time.process_time()
        self._epoch_counts = {"iterations": 0, "images": 0}

    def _iteration_completed(self, engine: Engine) -> None:
        self._epoch_counts["iterations"] += 1
        step = self.adversarial_step
        if step is not None and getattr(step, "last_iteration", None) == (id(engine), engine.state.iteration):
            images = int(step.last_trained_samples)
        else:
            output = engine.state.output  # a list of samples when the trainer decollates (MONAI's default)
            image = output.get("image") if isinstance(output, Mapping) else None
            if isinstance(output, (list, tuple)):
                images = len(output)
            else:
                images = int(image.shape[0]) if image is not None and hasattr(image, "shape") else 0
        self._epoch_counts["images"] += images
        self._last_iteration_end = time.perf_counter()
        self._last_iteration_cpu = time.process_time()

    def _epoch_completed(self, engine: Engine) -> None:
        # up to the last iteration: a ValidationHandler attached earlier has already validated at this event
        seconds = self._last_iteration_end - self._epoch_start
        cpu_seconds = self._last_iteration_cpu - self._epoch_cpu_start
        epoch = int(engine.state.epoch)
        entry = next((e for e in self.epochs if e["epoch"] == epoch), None)
        if entry is None:
            entry = {"epoch": epoch}
            self.epochs.append(entry)
        entry.update({"seconds": seconds, "cpu_seconds": cpu_seconds, **self._epoch_counts})
        for name, value in engine.state.metrics.items():
            number = _number(value)
            if number is not None:
                entry[name] = number
        self.totals["seconds"] += seconds
        self.totals["cpu_seconds"] += cpu_seconds
        self.totals["iterations"] += self._epoch_counts["iterations"]
        self.totals["images"] += self._epoch_counts["images"]
        self.epochs.sort(key=lambda e: e["epoch"])
        self.write()

    def _validated(self, validator: Engine) -> None:
        epoch = int(validator.state.epoch)
        entry = next((e for e in self.epochs if e["epoch"] == epoch), None)
        if entry is None:  # the trainer's ValidationHandler runs before this epoch's entry is complete
            entry = {"epoch": epoch}
            self.epochs.append(entry)
        for name, value in validator.state.metrics.items():
            number = _number(value)
            if number is not None:
                entry[name] = number
        self.write()

    def write(self) -> None:
        """Write the file atomically (a reader never sees half of it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps({"epochs": self.epochs, "total": self.totals}, indent=1) + "\n")
        os.replace(partial, self.path)

    def state_dict(self) -> dict[str, Any]:
        """The counters and entries, saved with the trainer's checkpoint."""
        return {"epochs": json.loads(json.dumps(self.epochs)), "totals": dict(self.totals)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue the counters of a resumed training."""
        self.epochs = [dict(e) for e in state_dict.get("epochs", [])]
        self.totals = {**self.totals, **dict(state_dict.get("totals", {}))}
