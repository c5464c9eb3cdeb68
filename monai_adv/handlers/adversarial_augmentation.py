"""Ignite handler that adds adversarial copies to each training batch, as in the paper's protocol."""

from __future__ import annotations

import dataclasses
import logging
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.transforms.transform import Randomizable
from monai.utils import CommonKeys, IgniteInfo, min_version, optional_import
from torch import nn

from monai_adv.attacks import LossFunction
from monai_adv.engines.adversarial_step import AdversarialMethod, AdversarialTrainingStep, StepPlan
from monai_adv.engines.recipes import TrainingRecipe
from monai_adv.transforms.dictionary import GradientSignd

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric")
MetricUsage, _ = optional_import("ignite.metrics.metric", IgniteInfo.OPT_IMPORT_VERSION, min_version, "MetricUsage")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["AdversarialAugmentationHandler", "EpochMean"]


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


class AdversarialAugmentationHandler(Randomizable):
    """Train on adversarial copies of each batch, made by the trainer's own network: the user's entry point.

    The handler holds the settings and the statistics; the training step itself has one owner, an
    :class:`~monai_adv.engines.AdversarialTrainingStep` (:attr:`iteration_update`). Two ways to use it:

    - **The step owns the iteration** (the bundle, and what to do in your own trainer)::

          handler = AdversarialAugmentationHandler(FGSMd(keys="image", epsilon=0.03, batched=True))
          trainer = SupervisedTrainer(..., iteration_update=handler.iteration_update, train_handlers=[handler])

      Every recipe works, and single-step append copies are *fused*: built from the input gradient of the clean
      backward pass, one more forward and backward pass per copy (see :mod:`monai_adv.engines.adversarial_step`).
    - **A trainer that runs its own iteration** (the handler only attached): at ``ITERATION_STARTED`` the batch
      is attacked and ``engine.state.batch`` rewritten (copies appended, or samples replaced), and the trainer
      trains on it: attack, then concatenate, in separate passes. Recipes that change the loss (weights, the
      consistency term) or the step (``free``) need the step and are refused at the start, saying so.

    What runs (``adv_step``: ``fused``, ``separate``, ``free`` or ``plain``, and ``adv_step_reason``) is decided
    when the trainer starts, logged, and in :attr:`params` (for experiment tracking) once the handler is attached
    to a trainer that has its network.

    Each epoch it records means in ``engine.state.metrics`` (written at the epoch's last iteration):
    ``adv_samples`` (adversarial samples per batch), ``adv_epsilon``, ``adv_loss_clean``, each method's
    ``adv_loss_<method>`` (in a trainer's own iteration, only for transforms built with
    ``return_loss_after=True``) and, with a consistency term, ``adv_loss_consistency``.

    Args:
        transform: one batched dictionary transform (``FGSMd``/``InvFGSMd``, ``batched=True``) or a sequence of
            them: their attack specs, ``prob`` and keys say what copies to make (the handler does not call them
            or write into them).
        mode: ``"append"``, ``"replace"`` or ``"free"``; default the recipe's (``"append"``).
        replace_fraction: fraction of each batch replaced in ``"replace"`` mode; default the recipe's (0.5).
        start_epoch: first epoch (from 1) to augment; default the recipe's (1).
        enabled: switch; when False the step is the plain one. It may be flipped at any time.
        network: network to attack; default the transforms' or the trainer's.
        loss_function: loss the attack follows; default the transforms' or the trainer's.
        fused: allow the fused step; False always attacks in a separate pass.
        recipe: a :class:`~monai_adv.engines.TrainingRecipe` or a mapping of its options (loss weights, the
            consistency term, epsilon warm-up and random epsilon); ``mode``, ``replace_fraction`` and
            ``start_epoch``, when given, replace its fields.
        store_device: where the free mode keeps its perturbations (default: the images' device).

    Raises:
        TypeError: when ``transform`` holds anything but :class:`GradientSignd` transforms (an array transform such
            as ``FGSM`` is named, with the dictionary form to use).
        ValueError: for a bad recipe option, a transform not constructed with ``batched=True``, or transforms with
            different networks, losses or keys.
    """

    def __init__(
        self,
        transform: GradientSignd | Sequence[GradientSignd],
        mode: str | None = None,
        replace_fraction: float | None = None,
        start_epoch: int | None = None,
        enabled: bool = True,
        network: nn.Module | None = None,
        loss_function: LossFunction | None = None,
        fused: bool = True,
        recipe: TrainingRecipe | Mapping[str, Any] | None = None,
        store_device: str | torch.device | None = None,
    ) -> None:
        transforms = _as_transforms(transform)
        if enabled and not transforms:
            raise ValueError("transform is empty: give at least one FGSMd/InvFGSMd, or set enabled=False.")
        if start_epoch is not None and (
            isinstance(start_epoch, bool) or not isinstance(start_epoch, numbers.Integral) or start_epoch < 1
        ):
            raise ValueError(f"start_epoch must be an integer >= 1 (epochs count from 1), got {start_epoch!r}.")
        given = {"mode": mode, "replace_fraction": replace_fraction, "start_epoch": start_epoch}
        self.recipe = TrainingRecipe.create(recipe, **{k: v for k, v in given.items() if v is not None})
        self.transforms = transforms
        self.keys = _common(transforms, "keys", lambda t: (str(t.keys[0]), str(t.label_key)), (CommonKeys.IMAGE,
                                                                                             CommonKeys.LABEL))  # fmt: skip
        if any(len(t.keys) != 1 for t in transforms):
            raise ValueError("each adversarial transform must perturb one image key (keys='image').")
        self.network = network if network is not None else _common(transforms, "network", lambda t: t.network)
        self.loss_function = (
            loss_function
            if loss_function is not None
            else _common(transforms, "loss_function", lambda t: t.loss_function)
        )
        self.fused = bool(fused)
        self.step = AdversarialTrainingStep(
            [AdversarialMethod(t.spec, t.method, float(t.prob), t.tracks_loss) for t in transforms],
            self.recipe,
            fused=self.fused,
            network=self.network,
            loss_function=self.loss_function,
            store_device=store_device,
            enabled=enabled,
        )
        self._engine: Engine | None = None
        self._plan: StepPlan | None = None
        self._announced: StepPlan | None = None
        self._owns_iteration = False
        self._step_handed_out = False
        self.logger = logging.getLogger("monai_adv.AdversarialAugmentationHandler")

    # ------------------------------------------------------------------------------------------------- settings

    @property
    def iteration_update(self) -> AdversarialTrainingStep:
        """The training step, to pass as ``SupervisedTrainer(iteration_update=...)``.

        Taking it tells the handler that the trainer runs the step (Ignite has no public way to ask an engine for
        its process function); if the trainer then runs another iteration, the first iteration ends with an error.
        """
        self._step_handed_out = True
        return self.step

    @property
    def enabled(self) -> bool:
        """The switch (read by the step at every iteration)."""
        return bool(self.step.enabled)

    @enabled.setter
    def enabled(self, enabled: bool) -> None:
        self.step.enabled = bool(enabled)

    @property
    def mode(self) -> str:
        return self.recipe.mode

    @property
    def replace_fraction(self) -> float:
        return self.recipe.replace_fraction

    @property
    def start_epoch(self) -> int:
        return self.recipe.start_epoch

    @property
    def adversarial(self) -> torch.Tensor | None:
        """The latest adversarial images (detached), for inspection."""
        return self.step.adversarial

    @property
    def params(self) -> dict[str, Any]:
        """The adversarial settings, flat (``adv_*``), for experiment tracking; with ``adv_step`` and
        ``adv_step_reason`` (what runs) once attached to a trainer that has its network (see :meth:`params_for`)."""
        return self._params(self._current_plan())

    def params_for(self, network: nn.Module, loss_function: LossFunction) -> dict[str, Any]:
        """:attr:`params` for a trainer with this network and loss that runs :attr:`iteration_update`, before it
        exists (a bundle logs its parameters before it builds the trainer). At the start the handler checks that
        this is what runs, and warns if it is not.
        """
        self._announced = self.step.plan_for(network, loss_function)
        return self._params(self._announced)

    def _params(self, plan: StepPlan | None) -> dict[str, Any]:
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
        }
        if self.mode == "replace":
            params["adv_replace_fraction"] = self.replace_fraction
        defaults = TrainingRecipe()
        for name in ("clean_weight", "adversarial_weight", "consistency_weight", "epsilon_warmup_epochs",
                     "random_epsilon"):  # fmt: skip
            if getattr(self.recipe, name) != getattr(defaults, name):
                params[f"adv_{name}"] = getattr(self.recipe, name)
        if plan is not None:
            params["adv_step"] = plan.kind
            params["adv_step_reason"] = plan.reason
            params["adv_fused"] = plan.kind == "fused"
        return params

    @property
    def metric_names(self) -> list[str]:
        """The names this handler writes into ``engine.state.metrics``."""
        names = ["adv_samples", "adv_epsilon", "adv_loss_clean"] + [f"adv_loss_{t.method}" for t in self.transforms]
        return names + (["adv_loss_consistency"] if self.recipe.consistency_weight else [])

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> Randomizable:
        """Seed the step's choices (which copies, which samples are replaced, epsilon draws, random starts)."""
        super().set_random_state(seed, state)
        self.step.set_random_state(int(self.R.randint(0, 2**31 - 1)))
        return self

    # ------------------------------------------------------------------------------------------------- engine

    def attach(self, engine: Engine) -> None:
        """Register the event handlers and epoch metrics on ``engine`` (once, however often it is called)."""
        if engine.has_event_handler(self, Events.ITERATION_STARTED):
            return
        self._engine = engine
        engine.add_event_handler(Events.STARTED, self._prepare)
        engine.add_event_handler(Events.ITERATION_STARTED, self)
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self._check_the_step_ran)
        for name in self.metric_names:
            EpochMean(lambda name=name: self.step.last_values.get(name)).attach(engine, name, usage=EpochMean.usage())

    def _current_plan(self) -> StepPlan | None:
        engine = self._engine
        if engine is None or getattr(engine, "network", None) is None:
            return self._plan
        return self._decide(engine)

    def _decide(self, engine: Engine) -> StepPlan:
        # The step runs as the trainer's iteration when it was taken as iteration_update (checked after the first
        # iteration); otherwise the handler rewrites the batch, and a step that runs anyway trains it plainly.
        self._owns_iteration = self._step_handed_out
        if self._owns_iteration:
            return self.step.plan(engine)
        needs_step = [
            name
            for name, value in (
                ("mode='free'", self.recipe.mode == "free"),
                ("clean_weight", self.recipe.clean_weight is not None),
                ("adversarial_weight", self.recipe.adversarial_weight is not None),
                ("consistency_weight", bool(self.recipe.consistency_weight)),
            )
            if value
        ]
        if needs_step and self.enabled:
            raise ValueError(
                f"the recipe's {', '.join(needs_step)} changes the training step, which this trainer runs itself: "
                "build it with SupervisedTrainer(..., iteration_update=handler.iteration_update)."
            )
        return StepPlan(
            "separate",
            "attack, then the trainer trains on the rewritten batch (its own iteration; pass "
            "iteration_update=handler.iteration_update to fuse)",
        )

    def _prepare(self, engine: Engine) -> None:
        """At ``STARTED``: decide what runs, log it, follow the trainer's AMP setting.

        Raises:
            ValueError: when no network or loss is known, or the recipe needs the step in a trainer that runs its
                own iteration.
        """
        if self.network is None and getattr(engine, "network", None) is None:
            raise ValueError("the adversarial transforms have no network, and the engine gives none.")
        if self.loss_function is None and getattr(engine, "loss_function", None) is None:
            raise ValueError("the adversarial transforms have no loss_function, and the engine gives none.")
        if getattr(engine, "amp", False):
            self.step.methods = [dataclasses.replace(m, spec=m.spec.replace(amp=True)) for m in self.step.methods]
        self._plan = self._decide(engine)
        if self._announced is not None and self._announced.kind != self._plan.kind and self.enabled:
            warnings.warn(
                f"the tracked parameters say adv_step={self._announced.kind}, but the step that runs is "
                f"{self._plan.kind}: {self._plan.reason}.",
                stacklevel=2,
            )
        if self.enabled and self.transforms:
            self.logger.info("adversarial training step: %s (%s)", self._plan.kind, self._plan.reason)
            for message in self._plan.warnings:
                warnings.warn(message, stacklevel=2)
        max_epochs = getattr(engine.state, "max_epochs", None)
        if self.enabled and self.transforms and max_epochs is not None and self.start_epoch > max_epochs:
            warnings.warn(
                f"start_epoch={self.start_epoch} is after the last epoch (max_epochs={max_epochs}): no batch will "
                f"be augmented, although the tracked parameters say adv_method={self.params['adv_method']}.",
                stacklevel=2,
            )

    def _check_the_step_ran(self, engine: Engine) -> None:
        """After the first iteration: a handler whose step was taken as ``iteration_update`` must have seen it run.

        Raises:
            RuntimeError: when the trainer ran another iteration (no batch was augmented).
        """
        if self._owns_iteration and self.step.last_iteration != (id(engine), engine.state.iteration):
            raise RuntimeError(
                "handler.iteration_update was taken, but this trainer runs another iteration, so no batch was "
                "augmented: build the trainer with SupervisedTrainer(..., iteration_update=handler.iteration_update), "
                "or attach a handler whose iteration_update was not taken (it then rewrites the batches)."
            )

    def __call__(self, engine: Engine) -> None:
        """At ``ITERATION_STARTED``: in a trainer that runs its own iteration, rewrite ``engine.state.batch``.

        Raises:
            TypeError: when the batch is not a dictionary.
            KeyError: when the batch lacks the image or label key.
            ValueError: when the batch holds no samples.
        """
        if self._owns_iteration:
            return
        self.step.last_values = {}
        if not self.step.active(int(engine.state.epoch)):
            return
        batch = engine.state.batch
        if not isinstance(batch, dict):
            raise TypeError(
                f"{type(self).__name__} needs dictionary batches (e.g. from LoadImaged pipelines), got "
                f"{type(batch).__name__}."
            )
        missing = sorted(str(key) for key in self.keys if key not in batch)
        if missing:
            raise KeyError(
                f"batch has no key(s) {missing} needed by the adversarial transforms (has {sorted(map(str, batch))})."
            )
        if int(batch[self.keys[0]].shape[0]) == 0:
            raise ValueError(
                f"the training batch holds no samples (keys {sorted(map(str, batch))}): nothing to train on."
            )
        device = getattr(engine.state, "device", None)
        non_blocking = bool(getattr(engine, "non_blocking", False))
        batch = dict(batch)
        for key in self.keys:
            if device is not None and isinstance(batch[key], torch.Tensor):
                batch[key] = batch[key].to(device, non_blocking=non_blocking)
        engine.state.batch = self.step.augment_batch(engine, batch, self.keys)


def _as_transforms(transform: Any) -> list[GradientSignd]:
    if isinstance(transform, GradientSignd):
        transforms = [transform]
    elif isinstance(transform, Sequence) and not isinstance(transform, str):
        transforms = list(transform)
    else:
        transforms = [transform]
    for t in transforms:
        if not isinstance(t, GradientSignd):
            hint = ""
            if hasattr(t, "direction") and hasattr(t, "from_gradient"):  # an array transform
                hint = (
                    f" ({type(t).__name__} is an array transform: use {type(t).__name__}d(keys='image', batched=True))"
                )
            raise TypeError(
                f"transform must be FGSMd/InvFGSMd (GradientSignd) or a sequence of them, got {type(t).__name__}{hint}."
            )
        if not t.batched:
            raise ValueError(
                f"{type(t).__name__}(keys={list(t.keys)}) must be constructed with batched=True to work on "
                "the collated training batches the handler sees."
            )
    return transforms


def _common(
    transforms: list[GradientSignd], what: str, get: Callable[[GradientSignd], Any], default: Any = None
) -> Any:
    """The one value of ``get`` the transforms share (None values aside), or ``default``.

    Raises:
        ValueError: when they differ (one step attacks with one network and loss, on one image and label key).
    """
    values = [get(t) for t in transforms if get(t) is not None]
    if not values:
        return default
    if any(v is not values[0] and v != values[0] for v in values[1:]):
        raise ValueError(
            f"the adversarial transforms have different {what}: give them one (or none, for the trainer's)."
        )
    return values[0]
