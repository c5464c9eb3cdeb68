"""Stop a training whose loss has become NaN or infinite, before a NaN model is saved.

``SupervisedTrainer`` trains on through a NaN loss (``train_loss: nan``): the optimizer step writes NaN into the
weights, the epoch checkpoint holds them, and the best-model saver may keep them as ``model.pt``.
:class:`StopOnNonFiniteLoss` raises at the end of the first iteration whose loss is not finite, with the attack off
as well as on; the epoch's checkpoints are then not written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from ignite.engine import Engine, Events

from monai_adv.attacks import NonFiniteLossError

__all__ = ["StopOnNonFiniteLoss"]


def _loss_of(output: Any) -> Any:
    if isinstance(output, dict):
        return output.get("loss")
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], dict):
        return output[0].get("loss")
    return output


class StopOnNonFiniteLoss:
    """Raise :class:`~monai_adv.attacks.NonFiniteLossError` when a training iteration's loss is NaN or infinite.

    Unlike Ignite's ``TerminateOnNan``, which ends the run as if it had completed, this fails the run, so that a
    bundle command exits with an error that says what happened (the loss, the epoch and iteration, what to check).

    Args:
        output_transform: the loss from ``engine.state.output``; default the ``"loss"`` of MONAI's trainer output.
        name: logger name.
    """

    def __init__(self, output_transform: Callable[[Any], Any] = _loss_of, name: str | None = None) -> None:
        self.output_transform = output_transform
        self.logger = logging.getLogger(name or __name__)

    def attach(self, engine: Engine) -> None:
        """Check the loss at the end of every iteration of ``engine``."""
        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Raise if the loss of the iteration that just completed is not finite.

        Raises:
            NonFiniteLossError: (a ``ValueError``) naming the loss value, the epoch and the iteration.
        """
        loss = self.output_transform(engine.state.output)
        if loss is None:
            return
        value = float(loss.detach().float().mean()) if hasattr(loss, "detach") else float(loss)
        if math.isfinite(value):
            return
        raise NonFiniteLossError(
            f"the training loss is {value} at epoch {engine.state.epoch}, iteration {engine.state.iteration}: "
            "training stopped, and this epoch's checkpoint and best model were not saved (the weights are no longer "
            "finite). Check the data for NaN/Inf values and lower --learning_rate; resume from the last checkpoint "
            "with --resume true, or start again."
        )
