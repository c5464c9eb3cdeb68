"""Ignite handler that adds adversarial copies to each training batch, as in the paper's protocol."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.transforms.transform import Randomizable
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from monai_adv.transforms.dictionary import GradientSignd

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["AdversarialAugmentationHandler"]

_MODES = ("append", "replace")
LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _batch_size(batch: dict[Hashable, Any], keys: Sequence[Hashable]) -> int:
    return int(batch[keys[0]].shape[0])


def _concat(parts: list[Any], batch_size: int) -> Any:
    """Stack per-sample entries of several batches; leave anything that is not per-sample as in the first."""
    first = parts[0]
    if isinstance(first, torch.Tensor) and first.ndim > 0 and first.shape[0] == batch_size:
        return torch.cat([torch.as_tensor(p).to(first.device) for p in parts], dim=0)
    if isinstance(first, list) and len(first) == batch_size:
        return [item for part in parts for item in part]
    return first


class AdversarialAugmentationHandler(Randomizable):
    """Rewrite each training batch with FGSM / Inverse FGSM copies made by the trainer's own network.

    Attached to a :class:`monai.engines.SupervisedTrainer`, it runs at ``ITERATION_STARTED``,
    just before the trainer's iteration reads ``engine.state.batch`` (the same model-in-the-loop
    pattern as :class:`monai.apps.deepgrow.interaction.Interaction`). The batch is moved to
    ``engine.state.device``; each of ``transform`` (batched dictionary transforms such as
    :class:`monai_adv.transforms.FGSMd`) then perturbs it with the current network and loss:

    - ``mode="append"``: the adversarial copies are concatenated to the batch (the paper's
      "data doubled"; with both FGSM and InvFGSM it is tripled). Labels and other per-sample
      entries are repeated.
    - ``mode="replace"``: a random ``replace_fraction`` of the samples is replaced by adversarial
      versions (split among the transforms); the batch size is unchanged.

    The attack only takes the input gradient, so parameter gradients (gradient accumulation
    included) are untouched, and a ``DistributedDataParallel`` network is attacked through its
    inner module, with no gradient synchronisation.

    Each iteration it records running epoch means in ``engine.state.metrics`` (where
    ``StatsHandler`` and ``MLFlowHandler`` log them at the epoch's end): ``adv_epsilon``,
    ``adv_samples`` (adversarial samples per batch), ``adv_loss_clean`` and, for transforms built
    with ``return_loss_after=True``, the loss on their output (``adv_loss_fgsm``,
    ``adv_loss_invfgsm``). At ``STARTED`` it hands :attr:`params` to any ``MLFlowHandler``
    attached to the same engine, so that MLflow runs carry the adversarial settings as parameters.

    Args:
        transform: one batched dictionary transform (``FGSMd``/``InvFGSMd``, ``batched=True``)
            or a sequence of them.
        mode: ``"append"`` or ``"replace"``.
        replace_fraction: fraction of each batch replaced in ``"replace"`` mode.
        start_epoch: first epoch (1-based) to augment; earlier epochs train on clean data, as the
            paper attacks an already trained model.
        enabled: switch; when False the handler returns at once and the batch is untouched.
            It may be flipped at any time.
        network: network to attack; default the trainer's ``engine.network``. Only used for
            transforms that have none.
        loss_function: loss to follow; default the trainer's ``engine.loss_function``. Only used
            for transforms that have none.
        name: name of the logger; default ``monai_adv.AdversarialAugmentationHandler``.

    Raises:
        TypeError: when ``transform`` holds anything but :class:`GradientSignd` transforms.
        ValueError: for an unknown mode, a fraction outside (0, 1], ``start_epoch < 1``, or a
            transform not constructed with ``batched=True``.
    """

    def __init__(
        self,
        transform: GradientSignd | Sequence[GradientSignd],
        mode: str = "append",
        replace_fraction: float = 0.5,
        start_epoch: int = 1,
        enabled: bool = True,
        network: nn.Module | None = None,
        loss_function: LossFunction | None = None,
        name: str | None = None,
    ) -> None:
        transforms = [transform] if isinstance(transform, GradientSignd) else list(transform)
        for t in transforms:
            if not isinstance(t, GradientSignd):
                raise TypeError(
                    f"transform must be FGSMd/InvFGSMd (GradientSignd) or a sequence of them, got {type(t).__name__}."
                )
            if not t.attack.batched:
                raise ValueError(
                    f"{type(t).__name__}(keys={list(t.keys)}) must be constructed with batched=True to work on "
                    "the collated training batches the handler sees."
                )
        if enabled and not transforms:
            raise ValueError("transform is empty: give at least one FGSMd/InvFGSMd, or set enabled=False.")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
        if not 0.0 < float(replace_fraction) <= 1.0:
            raise ValueError(f"replace_fraction must be in (0, 1], got {replace_fraction!r}.")
        if int(start_epoch) < 1:
            raise ValueError(f"start_epoch must be >= 1 (epochs count from 1), got {start_epoch!r}.")
        self.transforms = transforms
        self.mode = mode
        self.replace_fraction = float(replace_fraction)
        self.start_epoch = int(start_epoch)
        self.enabled = enabled
        self.network = network
        self.loss_function = loss_function
        self.logger = logging.getLogger(name or f"monai_adv.{type(self).__name__}")
        self._totals: dict[str, tuple[float, int]] = {}  # metric name -> (sum, count) this epoch

    @property
    def params(self) -> dict[str, Any]:
        """The adversarial settings, flat, for experiment tracking."""
        if not self.enabled or not self.transforms:
            return {"adv_method": "none"}
        attack = self.transforms[0].attack
        params: dict[str, Any] = {
            "adv_method": "+".join(self._method_name(t) for t in self.transforms),
            "adv_mode": self.mode,
            "adv_start_epoch": self.start_epoch,
            "adv_epsilon": attack.epsilon[0] if attack.epsilon[0] == attack.epsilon[1] else list(attack.epsilon),
            "adv_num_steps": attack.num_steps,
            "adv_prob": self.transforms[0].prob,
            "adv_clamp": attack.clamp,
        }
        if self.mode == "replace":
            params["adv_replace_fraction"] = self.replace_fraction
        return params

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> Randomizable:
        """Seed the choice of replaced samples and every transform."""
        super().set_random_state(seed, state)
        for t in self.transforms:
            t.set_random_state(seed, state)
        return self

    def attach(self, engine: Engine) -> None:
        """Register the event handlers on ``engine``."""
        engine.add_event_handler(Events.STARTED, self._prepare)
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset_stats)
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def _prepare(self, engine: Engine) -> None:
        """At ``STARTED`` (MONAI workflows attach handlers before they set their network), fill in
        missing networks and losses from ``engine``, follow its AMP setting and share :attr:`params`.

        Raises:
            ValueError: when neither the transforms, the handler nor the engine give a network or loss.
        """
        network = self.network if self.network is not None else getattr(engine, "network", None)
        loss_function = self.loss_function if self.loss_function is not None else getattr(engine, "loss_function", None)
        for t in self.transforms:
            if t.network is None:
                t.network = network
            if t.loss_function is None:
                t.loss_function = loss_function
            if t.network is None or t.loss_function is None:
                raise ValueError(
                    f"{type(t).__name__} has no network or loss_function, and the engine gives none: pass them to "
                    "the transform or the handler."
                )
            if getattr(engine, "amp", False):
                t.attack.amp = True
        self._share_params(engine)

    def _share_params(self, engine: Engine) -> None:
        """Give :attr:`params` to the MLFlowHandlers attached to ``engine`` (logged when their run starts)."""
        from monai.handlers import MLFlowHandler

        for callback, _, _ in engine._event_handlers.get(Events.STARTED, []):
            handler = getattr(callback, "__self__", None)
            if isinstance(handler, MLFlowHandler):
                params = {k: str(v) for k, v in self.params.items()}
                if handler.cur_run is None:  # its start() has not run yet: it logs experiment_param then
                    handler.experiment_param = {**(handler.experiment_param or {}), **params}
                else:
                    handler._delete_exist_param_in_dict(params)
                    handler._log_params(params)

    def _reset_stats(self, engine: Engine) -> None:
        """Start the epoch's means afresh; drop last epoch's values so none is reported stale."""
        for name in self._totals:
            engine.state.metrics.pop(name, None)
        self._totals = {}

    def __call__(self, engine: Engine) -> None:
        """Replace ``engine.state.batch`` by its augmented version.

        Raises:
            TypeError: when the batch is not a dictionary.
            KeyError: when the batch lacks an image or label key of a transform.
        """
        if not self.enabled or engine.state.epoch < self.start_epoch:
            return
        batch = engine.state.batch
        if not isinstance(batch, dict):
            raise TypeError(
                f"{type(self).__name__} needs dictionary batches (e.g. from LoadImaged pipelines), got "
                f"{type(batch).__name__}."
            )
        device = getattr(engine.state, "device", None)
        non_blocking = bool(getattr(engine, "non_blocking", False))
        needed = {key for t in self.transforms for key in (*t.keys, t.label_key)}
        missing = sorted(str(key) for key in needed if key not in batch)
        if missing:
            raise KeyError(
                f"batch has no key(s) {missing} needed by the adversarial transforms (has {sorted(map(str, batch))})."
            )
        batch = dict(batch)
        if device is not None:
            for key in needed:
                if isinstance(batch[key], torch.Tensor):
                    batch[key] = batch[key].to(device, non_blocking=non_blocking)
        size = _batch_size(batch, list(needed))
        if self.mode == "append":
            copies = []
            for t in self.transforms:
                copy = t(batch)
                if t.last_stats:  # skipped by its prob: no clean duplicate
                    copies.append(copy)
            new_batch = {key: _concat([batch[key]] + [c[key] for c in copies], size) for key in batch}
            added = size * len(copies)
        else:
            new_batch, added = self._replace(batch, size)
        engine.state.batch = new_batch
        self._record(engine, added)

    def _replace(self, batch: dict[Hashable, Any], size: int) -> tuple[dict[Hashable, Any], int]:
        count = max(1, int(round(self.replace_fraction * size)))
        chosen = self.R.permutation(size)[:count]
        new_batch = dict(batch)
        replaced = 0
        for t, indices in zip(self.transforms, np.array_split(chosen, len(self.transforms))):
            if len(indices) == 0:
                continue
            index = torch.as_tensor(indices, dtype=torch.long)
            keys = (*t.keys, t.label_key)
            subset = {key: batch[key][index.to(batch[key].device)] for key in keys}
            perturbed = t(subset)
            if not t.last_stats:  # skipped by its prob: these samples stay clean
                continue
            replaced += len(indices)
            for key in t.keys:
                updated = new_batch[key].clone()  # never write into the loader's tensors
                updated[index.to(updated.device)] = perturbed[key].to(updated.dtype)
                new_batch[key] = updated
        return new_batch, replaced

    def _record(self, engine: Engine, added: int) -> None:
        """Update the running epoch means; each one averages only the iterations that produced its value."""
        values: dict[str, float] = {"adv_samples": float(added)}
        applied = [t for t in self.transforms if t.last_stats]
        if applied:
            values["adv_epsilon"] = float(torch.stack([t.last_stats["epsilon"].float().cpu() for t in applied]).mean())
            values["adv_loss_clean"] = float(applied[0].last_stats["loss_before"])  # type: ignore[arg-type]
        for t in applied:
            if t.last_stats.get("loss_after") is not None:
                values[f"adv_loss_{self._method_name(t)}"] = float(t.last_stats["loss_after"])  # type: ignore[arg-type]
        for name, value in values.items():
            total, count = self._totals.get(name, (0.0, 0))
            self._totals[name] = (total + value, count + 1)
            engine.state.metrics[name] = (total + value) / (count + 1)

    @staticmethod
    def _method_name(transform: GradientSignd) -> str:
        return type(transform.attack).__name__.lower()
