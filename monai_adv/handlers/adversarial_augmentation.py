"""Ignite handler that adds adversarial copies to each training batch, as in the paper's protocol."""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data.meta_tensor import MetaTensor
from monai.engines.utils import IterationEvents
from monai.transforms.transform import Randomizable
from monai.utils import CommonKeys, IgniteInfo, min_version, optional_import
from torch import nn

from monai_adv.attacks import LossFunction, input_gradient, preserved_network_state, unwrap_network
from monai_adv.transforms.dictionary import GradientSignd

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric")
MetricUsage, _ = optional_import("ignite.metrics.metric", IgniteInfo.OPT_IMPORT_VERSION, min_version, "MetricUsage")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["AdversarialAugmentationHandler", "EpochMean"]

_MODES = ("append", "replace")


class EpochMean(Metric):  # type: ignore[misc, valid-type]
    """Mean over an epoch's iterations of a value read from ``source()`` after each iteration.

    Values may be device tensors: they are summed on their device and read once, when the mean is
    written to ``engine.state.metrics`` at the epoch's last iteration (so that ``StatsHandler`` and
    ``MLFlowHandler`` see it at ``EPOCH_COMPLETED`` whatever their order of attachment). Iterations
    where ``source()`` gives None do not count; an epoch with none leaves no stale value behind.

    Args:
        source: called after each iteration; returns the iteration's value, or None.
    """

    def __init__(self, source: Callable[[], torch.Tensor | float | None]) -> None:
        self._source = source
        super().__init__(output_transform=lambda _: source())

    def reset(self) -> None:
        self._sum: torch.Tensor | float = 0.0
        self._count = 0

    def update(self, output: torch.Tensor | float | None) -> None:
        if output is None:
            return
        value = output.detach().to(torch.float64) if isinstance(output, torch.Tensor) else float(output)
        self._sum = self._sum + value
        self._count += 1

    def compute(self) -> float | None:
        return float(self._sum) / self._count if self._count else None

    def completed(self, engine: Engine, name: str) -> None:
        result = self.compute()
        if result is None:
            engine.state.metrics.pop(name, None)
        else:
            engine.state.metrics[name] = result

    @staticmethod
    def usage() -> MetricUsage:
        """Reset at each epoch's start, update after each iteration, write at the epoch's last iteration."""

        def last_of_epoch(engine: Engine, iteration: int) -> bool:
            length = engine.state.epoch_length
            return length is None or iteration % length == 0

        return MetricUsage(
            started=Events.EPOCH_STARTED,
            completed=Events.ITERATION_COMPLETED(event_filter=last_of_epoch),
            iteration_completed=Events.ITERATION_COMPLETED,
        )


def _repeat_per_sample(value: Any, size: int, times: int) -> Any:
    """Repeat the per-sample entries (lists and tensors of length ``size``, also inside dicts) ``times`` times."""
    if isinstance(value, dict):
        return {k: _repeat_per_sample(v, size, times) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and len(value) == size:
        return type(value)(list(value) * times) if isinstance(value, list) else tuple(value) * times
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == size:
        return torch.cat([value] * times)
    return value


def _concat(parts: list[Any], size: int) -> Any:
    """Stack per-sample entries of several batches; repeat per-sample metadata; leave other entries as in the first."""
    first = parts[0]
    if isinstance(first, torch.Tensor) and first.ndim > 0 and first.shape[0] == size:
        out = torch.cat([torch.as_tensor(p).to(first.device) for p in parts], dim=0)
        if isinstance(first, MetaTensor) and isinstance(out, MetaTensor) and first.is_batch:
            # torch.cat keeps the first batch's metadata: repeat its per-sample entries (file names, ...)
            out.meta = _repeat_per_sample(dict(first.meta), size, len(parts))
            out.applied_operations = _repeat_per_sample(list(first.applied_operations), size, len(parts))
            out.is_batch = True
        return out
    if isinstance(first, (list, dict)):
        return _repeat_per_sample(first, size, len(parts))
    return first


class AdversarialAugmentationHandler(Randomizable):
    """Train on FGSM / Inverse FGSM copies of each batch, made by the trainer's own network.

    Attached to a :class:`monai.engines.SupervisedTrainer`, each of ``transform`` (batched
    dictionary transforms such as :class:`monai_adv.transforms.FGSMd`) perturbs the batch with the
    current network and loss:

    - ``mode="append"``: the model trains on the batch and its adversarial copies (the paper's
      "data doubled"; with both FGSM and InvFGSM, tripled).
    - ``mode="replace"``: a random ``replace_fraction`` of the samples is replaced by adversarial
      versions (split among the transforms); the batch size is unchanged.

    **Fused append (``fused=True``, the default).** The copies are built from the input gradient of
    the training step's own backward pass, so no separate attack pass runs: at ``ITERATION_STARTED``
    the image tensor is made to require grad; at ``IterationEvents.LOSS_COMPLETED`` the clean loss is
    weighted ``1 / (1 + k)`` (``k`` copies); at ``IterationEvents.BACKWARD_COMPLETED`` (before the
    optimizer step) the copies ``clip(x ± epsilon * sign(grad_x))`` go through the network, one
    forward and backward pass per copy (so memory stays that of a plain step), and their losses,
    weighted ``1 / (1 + k)`` each, are backpropagated into the same parameter gradients (divided by
    ``accumulation_steps`` and scaled by ``engine.scaler``, as the trainer does). For a loss that
    averages over samples and a network whose samples do not interact (instance norm, no BatchNorm),
    that is the same parameter update as one step on the concatenated batch, with the attack taken
    **at the weights before this step's update, in train mode** (the trainer's forward pass); FGSM
    and InvFGSM share the one gradient. ``engine.state.output["loss"]`` is the concatenated batch's
    loss; its image, label and prediction are the clean batch's; :attr:`adversarial` holds the copies.
    For networks whose train and eval modes differ (dropout; BatchNorm, whose batch statistics also
    mix samples), the gradient is the train-mode one and BatchNorm sees the clean batch and each copy
    as separate batches: ``fused=False`` attacks in the transform's ``network_mode`` and trains on the
    concatenated batch instead (a warning at the start says so). Fusing applies to single-step
    transforms on the trainer's ``"image"``/``"label"`` keys that attack the trainer's own network
    and loss; otherwise (iterative or random-start transforms, other keys, another network or loss,
    ``mode="replace"``) the handler uses separate attack passes.

    **Separate passes (``fused=False``, and ``mode="replace"``).** At ``ITERATION_STARTED`` (the
    pattern of :class:`monai.apps.deepgrow.interaction.Interaction`) the batch is moved to
    ``engine.state.device``, attacked at the current weights in each transform's ``network_mode``
    (``"eval"`` by default), and ``engine.state.batch`` is rewritten: in append mode the copies are
    concatenated (labels and per-sample entries, metadata included, are repeated), in replace mode the
    chosen samples are swapped. Single-step transforms on the same keys share one input-gradient pass.
    Only the input gradient is taken (no parameter gradients), and a ``DistributedDataParallel``
    network is attacked through its inner module.

    Each epoch it records means in ``engine.state.metrics`` (Ignite metrics, written at the epoch's
    last iteration): ``adv_samples`` (adversarial samples per batch), ``adv_epsilon``,
    ``adv_loss_clean`` and the loss on each method's copies (``adv_loss_fgsm``, ``adv_loss_invfgsm``),
    which the fused mode gets for free and the separate mode measures only for transforms built with
    ``return_loss_after=True``. :attr:`params` gives the settings for experiment tracking.

    Args:
        transform: one batched dictionary transform (``FGSMd``/``InvFGSMd``, ``batched=True``)
            or a sequence of them.
        mode: ``"append"`` or ``"replace"``.
        replace_fraction: fraction of each batch replaced in ``"replace"`` mode.
        start_epoch: first epoch (1-based, an integer) to augment; earlier epochs train on clean data,
            as the paper attacks an already trained model.
        enabled: switch; when False the handler returns at once and the batch is untouched.
            It may be flipped at any time.
        network: network to attack; default the trainer's ``engine.network``. Only used for
            transforms that have none.
        loss_function: loss to follow; default the trainer's ``engine.loss_function``. Only used
            for transforms that have none.
        fused: build append-mode copies from the training step's own backward pass (see above);
            False restores separate attack passes and a concatenated batch.

    Raises:
        TypeError: when ``transform`` holds anything but :class:`GradientSignd` transforms (an
            array transform such as ``FGSM`` is named, with the dictionary form to use).
        ValueError: for an unknown mode, a fraction outside (0, 1], a ``start_epoch`` that is not an
            integer >= 1, or a transform not constructed with ``batched=True``.
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
        fused: bool = True,
    ) -> None:
        if isinstance(transform, GradientSignd):
            transforms = [transform]
        elif isinstance(transform, Sequence) and not isinstance(transform, str):
            transforms = list(transform)
        else:
            transforms = [transform]  # type: ignore[list-item]
        for t in transforms:
            if not isinstance(t, GradientSignd):
                hint = ""
                if hasattr(t, "direction") and hasattr(t, "from_gradient"):  # an array transform
                    hint = f" ({type(t).__name__} is an array transform: use {type(t).__name__}d(keys='image', batched=True))"
                raise TypeError(
                    "transform must be FGSMd/InvFGSMd (GradientSignd) or a sequence of them, got "
                    f"{type(t).__name__}{hint}."
                )
            if not t.batched:
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
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, numbers.Integral) or start_epoch < 1:
            raise ValueError(f"start_epoch must be an integer >= 1 (epochs count from 1), got {start_epoch!r}.")
        self.transforms = transforms
        self.mode = mode
        self.replace_fraction = float(replace_fraction)
        self.start_epoch = int(start_epoch)
        self.enabled = enabled
        self.network = network
        self.loss_function = loss_function
        self.fused = bool(fused)
        self.adversarial: torch.Tensor | None = None
        """The latest adversarial images (fused mode; detached), for inspection."""
        self._can_fuse = False
        self._fusable_engine = False
        self._pending: dict[str, Any] | None = None  # the fused step under way
        self._values: dict[str, torch.Tensor | float | None] = {}  # this iteration's metric values

    @property
    def params(self) -> dict[str, Any]:
        """The adversarial settings, flat (``adv_*``), for experiment tracking."""
        if not self.enabled or not self.transforms:
            return {"adv_method": "none"}
        first = self.transforms[0].params
        params: dict[str, Any] = {
            "adv_method": "+".join(t.method for t in self.transforms),
            "adv_mode": self.mode,
            "adv_start_epoch": self.start_epoch,
            "adv_epsilon": first["epsilon"],
            "adv_num_steps": first["num_steps"],
            "adv_prob": first["prob"],
            "adv_clamp": first["clamp"],
            # What the settings allow; the engine may still rule fusing out (another network or loss).
            "adv_fused": self.fused and self.mode == "append" and all(t.single_step for t in self.transforms),
        }
        if self.mode == "replace":
            params["adv_replace_fraction"] = self.replace_fraction
        return params

    @property
    def metric_names(self) -> list[str]:
        """The names this handler writes into ``engine.state.metrics``."""
        return ["adv_samples", "adv_epsilon", "adv_loss_clean"] + [f"adv_loss_{t.method}" for t in self.transforms]

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> Randomizable:
        """Seed the choice of replaced samples and every transform."""
        super().set_random_state(seed, state)
        for t in self.transforms:
            t.set_random_state(seed, state)
        return self

    def attach(self, engine: Engine) -> None:
        """Register the event handlers and epoch metrics on ``engine`` (once, however often it is called)."""
        if engine.has_event_handler(self, Events.ITERATION_STARTED):
            return
        engine.add_event_handler(Events.STARTED, self._prepare)
        engine.add_event_handler(Events.ITERATION_STARTED, self)
        try:  # MONAI's SupervisedTrainer registers these; a plain Ignite engine does not (then nothing is fused)
            engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._weight_clean_loss)
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._add_adversarial_gradient)
            self._fusable_engine = True
        except ValueError:
            self._fusable_engine = False
        for name in self.metric_names:
            EpochMean(lambda name=name: self._values.get(name)).attach(engine, name, usage=EpochMean.usage())

    def _prepare(self, engine: Engine) -> None:
        """At ``STARTED`` (MONAI workflows attach handlers before they set their network), fill in
        missing networks and losses from ``engine``, follow its AMP setting, decide whether to fuse.

        Raises:
            ValueError: when neither the transforms, the handler nor the engine give a network or loss.
        """
        engine_network = getattr(engine, "network", None)
        engine_loss = getattr(engine, "loss_function", None)
        network = self.network if self.network is not None else engine_network
        loss_function = self.loss_function if self.loss_function is not None else engine_loss
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
                t.amp = True
        self._can_fuse = (
            self.fused
            and self._fusable_engine
            and self.mode == "append"
            and engine_network is not None
            and hasattr(engine, "optimizer")
            and all(
                t.single_step
                and list(t.keys) == [CommonKeys.IMAGE]
                and t.label_key == CommonKeys.LABEL
                and unwrap_network(t.network) is unwrap_network(engine_network)  # DDP wrapper or its module
                and t.loss_function is engine_loss
                for t in self.transforms
            )
        )
        if self._can_fuse and self.enabled:
            mixing = [type(m).__name__ for m in engine_network.modules() if _modes_differ(m)]
            if mixing:
                warnings.warn(
                    f"fused adversarial augmentation with a network that has {sorted(set(mixing))}: the attack "
                    "gradient is the train-mode one of the training step (BatchNorm batch statistics, dropout "
                    "masks), and the copies go through BatchNorm as a batch of their own. Pass fused=False to "
                    "attack in the transform's network_mode and train on the concatenated batch.",
                    stacklevel=2,
                )
        max_epochs = getattr(engine.state, "max_epochs", None)
        if self.enabled and self.transforms and max_epochs is not None and self.start_epoch > max_epochs:
            warnings.warn(
                f"start_epoch={self.start_epoch} is after the last epoch (max_epochs={max_epochs}): no batch will "
                f"be augmented, although the tracked parameters say adv_method={self.params['adv_method']}.",
                stacklevel=2,
            )

    def _active(self, engine: Engine) -> bool:
        return self.enabled and bool(self.transforms) and engine.state.epoch >= self.start_epoch

    def __call__(self, engine: Engine) -> None:
        """At ``ITERATION_STARTED``: prepare the fused step, or rewrite ``engine.state.batch`` (separate passes).

        Raises:
            TypeError: when the batch is not a dictionary.
            KeyError: when the batch lacks an image or label key of a transform.
            ValueError: when the batch holds no samples.
        """
        self._values = {}
        self._pending = None
        if not self._active(engine):
            return
        batch = engine.state.batch
        if not isinstance(batch, dict):
            raise TypeError(
                f"{type(self).__name__} needs dictionary batches (e.g. from LoadImaged pipelines), got "
                f"{type(batch).__name__}."
            )
        needed = {key for t in self.transforms for key in (*t.keys, t.label_key)}
        missing = sorted(str(key) for key in needed if key not in batch)
        if missing:
            raise KeyError(
                f"batch has no key(s) {missing} needed by the adversarial transforms (has {sorted(map(str, batch))})."
            )
        size = int(batch[next(iter(sorted(needed, key=str)))].shape[0])
        if size == 0:
            raise ValueError(
                f"the training batch holds no samples (keys {sorted(map(str, batch))}): nothing to train on."
            )
        device = getattr(engine.state, "device", None)
        non_blocking = bool(getattr(engine, "non_blocking", False))
        batch = dict(batch)
        for key in needed:
            if device is not None and isinstance(batch[key], torch.Tensor):
                batch[key] = batch[key].to(device, non_blocking=non_blocking)
        if self._can_fuse:
            self._start_fused_step(engine, batch, size)
            return
        if self.mode == "append":
            new_batch, added = self._append(batch, size)
        else:
            new_batch, added = self._replace(batch, size)
        engine.state.batch = new_batch
        self._record_separate(added)

    # ------------------------------------------------------------------------------------------------ fused step

    def _start_fused_step(self, engine: Engine, batch: dict[Hashable, Any], size: int) -> None:
        for t in self.transforms:
            t.randomize()
        applied = [t for t in self.transforms if t.applied]
        self._values["adv_samples"] = float(size * len(applied))
        if not applied:
            return
        # A fresh leaf that requires grad: the trainer's backward fills its .grad alongside the parameters'.
        image = batch[CommonKeys.IMAGE].detach().requires_grad_(True)
        batch[CommonKeys.IMAGE] = image
        engine.state.batch = batch
        self._pending = {"image": image, "transforms": applied}

    def _weight_clean_loss(self, engine: Engine) -> None:
        """``LOSS_COMPLETED``: weight the clean half as in the concatenated batch (the trainer backpropagates this)."""
        if self._pending is None:
            return
        loss = engine.state.output[CommonKeys.LOSS]
        self._pending["loss_clean"] = loss.detach()
        engine.state.output[CommonKeys.LOSS] = loss / (1 + len(self._pending["transforms"]))

    def _add_adversarial_gradient(self, engine: Engine) -> None:
        """``BACKWARD_COMPLETED``: build the copies from the input gradient and add their parameter gradient.

        Raises:
            RuntimeError: when the trainer's forward pass did not use ``batch["image"]`` (custom ``prepare_batch``).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        image: torch.Tensor = pending["image"]
        transforms: list[GradientSignd] = pending["transforms"]
        gradient = image.grad
        if gradient is None:
            raise RuntimeError(
                "the training step's backward gave no gradient for batch['image']: the trainer's prepare_batch or "
                "inferer does not feed it to the network differentiably. Use fused=False."
            )
        scaler = getattr(engine, "scaler", None)
        use_scaler = bool(getattr(engine, "amp", False)) and scaler is not None
        clean = image.detach()
        if isinstance(clean, MetaTensor):
            clean = clean.as_tensor()
        gradient = gradient.as_tensor() if isinstance(gradient, MetaTensor) else gradient
        # the one host-device sync of the step; the scaler skips overflowing steps itself
        transforms[0].check_gradient(clean, gradient, check_finite=not (use_scaler and scaler.is_enabled()))
        copies = [
            t.perturb_with_gradient({t.keys[0]: clean}, {t.keys[0]: gradient}, randomize=False, validate=False)[
                t.keys[0]
            ]
            for t in transforms
        ]
        labels = engine.state.output[CommonKeys.LABEL]
        k = len(copies)
        acc = int(getattr(engine, "accumulation_steps", 1) or 1)
        adversarial_loss = torch.zeros((), device=clean.device)
        losses = []
        for adversarial in copies:
            # One forward/backward per copy: the same gradient as one pass over all copies (samples do not
            # interact), at the memory of a plain step; the same autocast as the trainer's forward
            # (SupervisedTrainer autocasts on CUDA only).
            with torch.autocast("cuda", **engine.amp_kwargs) if use_scaler else contextlib.nullcontext():
                loss = engine.loss_function(engine.inferer(adversarial, engine.network), labels).mean()
            # each copy weighs 1 / (1 + k), as its samples would in the mean over the concatenated batch
            weighted = loss / (1 + k)
            scaled = weighted / acc if acc > 1 else weighted
            (scaler.scale(scaled) if use_scaler else scaled).backward()
            losses.append(loss.detach())
            adversarial_loss = adversarial_loss + weighted.detach()
        engine.state.output[CommonKeys.LOSS] = (engine.state.output[CommonKeys.LOSS] + adversarial_loss).detach()
        engine.state.output[CommonKeys.IMAGE] = image.detach()  # keeps its metadata; no longer requires grad
        image.grad = None
        self.adversarial = torch.cat(copies) if k > 1 else copies[0]
        self._values["adv_loss_clean"] = pending["loss_clean"]
        self._values["adv_epsilon"] = torch.stack([t.last_stats["epsilon"] for t in transforms]).mean()
        for t, loss in zip(transforms, losses):
            self._values[f"adv_loss_{t.method}"] = loss

    # -------------------------------------------------------------------------------------------- separate passes

    def _shared_gradient(self, batch: dict[Hashable, Any]) -> dict[Hashable, torch.Tensor] | None:
        """One input-gradient pass for all transforms, where they can share it (single step, same keys and mode)."""
        first = self.transforms[0]
        shareable = len(self.transforms) > 1 and all(
            t.single_step
            and list(t.keys) == list(first.keys)
            and t.label_key == first.label_key
            and t.network is first.network
            and t.loss_function is first.loss_function
            and t.network_mode == first.network_mode
            and not t.tracks_loss
            for t in self.transforms
        )
        if not shareable:
            return None
        module = unwrap_network(first.network)  # type: ignore[arg-type]
        gradients = {}
        with preserved_network_state(module, first.network_mode):
            for key in first.key_iterator(batch):
                images = torch.as_tensor(batch[key])
                gradient, loss = input_gradient(
                    module, first.loss_function, images, torch.as_tensor(batch[first.label_key]), amp=first.amp
                )
                gradients[key] = gradient
                self._values.setdefault("adv_loss_clean", loss)
        return gradients

    def _append(self, batch: dict[Hashable, Any], size: int) -> tuple[dict[Hashable, Any], int]:
        gradients = self._shared_gradient(batch)
        copies = []
        for t in self.transforms:
            copy = t(batch) if gradients is None else t.perturb_with_gradient(batch, gradients)
            if t.applied:  # skipped by its prob: no clean duplicate
                copies.append(copy)
        new_batch = {key: _concat([batch[key]] + [c[key] for c in copies], size) for key in batch}
        return new_batch, size * len(copies)

    def _replace(self, batch: dict[Hashable, Any], size: int) -> tuple[dict[Hashable, Any], int]:
        count = max(1, round(self.replace_fraction * size))
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
            if not t.applied:  # skipped by its prob: these samples stay clean
                continue
            replaced += len(indices)
            for key in t.keys:
                updated = new_batch[key].clone()  # never write into the loader's tensors
                updated[index.to(updated.device)] = perturbed[key].to(updated.dtype)
                new_batch[key] = updated
        return new_batch, replaced

    def _record_separate(self, added: int) -> None:
        """This iteration's values from the transforms' stats (device tensors: read at the epoch's end)."""
        self._values["adv_samples"] = float(added)
        applied = [t for t in self.transforms if t.applied and t.last_stats]
        if not applied:
            return
        epsilons = [t.last_stats["epsilon"] for t in applied]
        self._values["adv_epsilon"] = torch.stack([e.to(epsilons[0]).float() for e in epsilons]).mean()
        if applied[0].last_stats.get("loss_before") is not None:
            self._values["adv_loss_clean"] = applied[0].last_stats["loss_before"]
        for t in applied:
            if t.last_stats.get("loss_after") is not None:
                self._values[f"adv_loss_{t.method}"] = t.last_stats["loss_after"]


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _modes_differ(module: nn.Module) -> bool:
    """Whether ``module`` computes differently in train and eval mode, or mixes the samples of a batch."""
    if isinstance(module, _BATCH_NORMS):
        return True
    if isinstance(module, _INSTANCE_NORMS):
        return bool(module.track_running_stats)
    if isinstance(module, _DROPOUTS):
        return module.p > 0
    return False
