"""The adversarial training step, with one owner: batch, attack, forward, backward, losses and optimiser step.

:class:`AdversarialTrainingStep` is an ``iteration_update`` for :class:`monai.engines.SupervisedTrainer` (the
pattern of :class:`monai.apps.deepgrow.interaction.Interaction`): the trainer calls it for every iteration, and
it does the whole step a :class:`~monai_adv.engines.recipes.TrainingRecipe` describes, firing MONAI's
``IterationEvents`` in the trainer's order so that the user's handlers see what they expect. Three kinds of step:

- **fused** (append mode, single-step attacks on the trainer's own network and loss): the clean forward and
  backward pass gives the input gradient too, so each copy ``clip(x ± ε sign(∇x))`` costs one more forward and
  backward pass and no attack pass. For a loss that averages over samples and a network whose samples do not
  interact, this is the same update as attacking (in train mode) and then stepping on the concatenated batch;
  with BatchNorm, the copies are normalised as a batch of their own.
- **separate**: the attack runs first (:func:`~monai_adv.attacks.run_attack`, in the spec's network mode), then
  one forward and backward pass over the concatenated (append) or partly replaced (replace) batch, with the
  recipe's loss weights and consistency term.
- **free**: each image's perturbation ``δ`` is kept across epochs (keyed by ``filename_or_obj``) and updated
  with the input gradient of the step's own backward pass: the step trains on ``x + δ`` at the cost of a plain
  step (Shafahi et al. 2019; ATTA, Zheng et al. 2020). :meth:`state_dict` carries the store into checkpoints.

:meth:`plan` says which kind runs and why; :meth:`augment_batch` is the attack-then-concatenate part alone, for a
trainer that runs its own iteration (the handler uses it there).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.meta_tensor import MetaTensor
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys
from torch import nn

from monai_adv.attacks import (
    AttackSpec,
    LossFunction,
    NonFiniteLossError,
    clamp_bounds,
    input_gradient,
    preserved_network_state,
    project_and_clamp,
    run_attack,
    signed_gradient_step,
    unwrap_network,
)
from monai_adv.attacks.gradient_sign import _check_labels_fit_prediction, _label_stats, _prediction
from monai_adv.engines.recipes import TrainingRecipe, epsilon_factor
from monai_adv.hardware import cpu_has_native_bf16, cpu_model
from monai_adv.random_state import numpy_state, restore_numpy_state

__all__ = ["AdversarialMethod", "AdversarialTrainingStep", "StepPlan", "concatenate_batch", "consistency_kl"]

_METHOD_NAMES = {"ascend": "fgsm", "descend": "invfgsm"}


@dataclass(frozen=True)
class AdversarialMethod:
    """One kind of adversarial copy: a named attack and the probability that a batch gets it.

    Attributes:
        spec: the attack (its ``direction`` makes FGSM-like or Inverse-FGSM-like copies).
        name: the name in statistics (``adv_loss_<name>``); default ``fgsm``/``invfgsm`` by direction.
        prob: probability that a batch gets this copy.
        track_loss: in a separate attack pass, one more forward pass for the loss on the copies
            (``adv_loss_<name>``; the fused and free steps and the step's own separate pass get it for free).
    """

    spec: AttackSpec
    name: str = ""
    prob: float = 1.0
    track_loss: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.spec, AttackSpec):
            raise TypeError(f"spec must be an AttackSpec, got {type(self.spec).__name__}.")
        if not self.name:
            object.__setattr__(self, "name", _METHOD_NAMES[self.spec.direction])
        if not 0.0 <= float(self.prob) <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {self.prob!r}.")


@dataclass(frozen=True)
class StepPlan:
    """What the step does on an engine, and why (logged at the start and tracked as ``adv_step``)."""

    kind: str  # "plain", "fused", "separate" or "free"
    reason: str
    warnings: tuple[str, ...] = field(default=())


def consistency_kl(clean: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
    """TRADES' consistency term for segmentation: ``KL(p(clean) || p(adversarial))`` per pixel, averaged.

    A one-channel (sigmoid) head is the two-class softmax of logits ``(0, z)``. Both predictions carry gradient
    (as in TRADES).

    Args:
        clean: logits ``(B, K, *spatial)`` on the clean images.
        adversarial: logits of the same shape on the adversarial images.

    Returns:
        A 0-dim tensor.
    """
    if clean.shape != adversarial.shape:
        raise ValueError(f"clean and adversarial logits differ in shape: {clean.shape} and {adversarial.shape}.")
    if clean.shape[1] == 1:
        clean, adversarial = (torch.cat([torch.zeros_like(z), z], dim=1) for z in (clean, adversarial))
    log_p, log_q = F.log_softmax(clean.float(), dim=1), F.log_softmax(adversarial.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def _repeat_per_sample(value: Any, size: int, times: int) -> Any:
    """Repeat the per-sample entries (lists and tensors of length ``size``, also inside dicts) ``times`` times."""
    if isinstance(value, dict):
        return {k: _repeat_per_sample(v, size, times) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and len(value) == size:
        return type(value)(list(value) * times) if isinstance(value, list) else tuple(value) * times
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == size:
        return torch.cat([value] * times)
    return value


def concatenate_batch(parts: list[Any], size: int) -> Any:
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


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


def _sample_ids(images: torch.Tensor, batchdata: Any, size: int) -> list[str] | None:
    """Each sample's ``filename_or_obj`` (or ``id`` entry of the batch), or None where the batch has none."""
    names = None
    if isinstance(images, MetaTensor):
        names = images.meta.get("filename_or_obj")
    if names is None and isinstance(batchdata, dict):
        names = batchdata.get("id")
    if isinstance(names, (list, tuple)) and len(names) == size:
        return [str(n) for n in names]
    return None


class AdversarialTrainingStep:
    """One adversarial training iteration, as ``iteration_update`` of a :class:`~monai.engines.SupervisedTrainer`.

    Build the trainer with ``iteration_update=step`` (the bundle does), or let
    :class:`~monai_adv.handlers.AdversarialAugmentationHandler` build the step and pass
    ``iteration_update=handler.iteration_update``. The step reads the trainer's ``network``, ``optimizer``,
    ``loss_function``, ``inferer``, ``prepare_batch``, ``amp`` (CUDA: autocast with the trainer's GradScaler; CPU:
    bfloat16 autocast), ``accumulation_steps`` and ``optim_set_to_none``, and fires ``FORWARD_COMPLETED``,
    ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED`` and ``MODEL_COMPLETED`` as the trainer does. It never writes into
    the trainer's objects or the user's transforms. ``engine.state.output`` holds the clean batch's image, label
    and prediction in a fused or free step and the trained-on batch's in a separate one; ``LOSS`` is the loss
    that was backpropagated.

    Args:
        methods: the adversarial copies to make (empty: a plain step, the trainer's own).
        recipe: how the step uses them; default the paper's (append, weights by share of samples).
        fused: allow the fused step where it applies (see the module); False always attacks in a separate pass.
        network: the network to attack, default the trainer's.
        loss_function: the loss the attack follows, default the trainer's.
        store_device: where the free mode's perturbations live (default: the images' device).
        enabled: a switch, read at every iteration; when False the step is the plain one.

    Raises:
        ValueError: for free mode with several methods or a multi-step attack, or no methods with a recipe that
            needs them.
    """

    def __init__(
        self,
        methods: Sequence[AdversarialMethod] = (),
        recipe: TrainingRecipe | None = None,
        fused: bool = True,
        network: nn.Module | None = None,
        loss_function: LossFunction | None = None,
        store_device: str | torch.device | None = None,
        enabled: bool = True,
    ) -> None:
        self.methods = list(methods)
        for method in self.methods:
            if not isinstance(method, AdversarialMethod):
                raise TypeError(f"methods must be AdversarialMethod, got {type(method).__name__}.")
        self.recipe = recipe if recipe is not None else TrainingRecipe()
        if self.recipe.mode == "free":
            if len(self.methods) != 1 or self.methods[0].spec.direction != "ascend":
                raise ValueError("free adversarial training carries one perturbation per image: give one FGSM method.")
            if self.methods[0].spec.num_steps != 1 or self.methods[0].spec.schedule != "sign":
                raise ValueError("free adversarial training takes one signed step per training step (num_steps 1).")
        self.fused = bool(fused)
        self.network = network
        self.loss_function = loss_function
        self.store_device = None if store_device is None else torch.device(store_device)
        self.enabled = enabled
        self.R = np.random.RandomState()
        self.generator: torch.Generator | None = None
        self._seed = int(self.R.randint(0, 2**31 - 1))
        self._pending_generator_state: tuple[str, torch.Tensor] | None = None
        self.deltas: dict[str, torch.Tensor] = {}  # free mode: perturbation per sample id
        self.last_values: dict[str, torch.Tensor | float | None] = {}
        """This iteration's statistics: ``adv_samples``, ``adv_epsilon``, ``adv_loss_clean``, ``adv_loss_<name>``,
        ``adv_loss_consistency``."""
        self.adversarial: torch.Tensor | None = None
        """The latest adversarial images (detached), for inspection."""
        self._plans: dict[int, StepPlan] = {}
        self.labels_checked_epoch = 0  # the epoch whose labels were checked against the prediction
        self._rewritten_iteration: int | None = None
        self.last_iteration: tuple[int, int] | None = None
        """``(id(engine), iteration)`` of the latest iteration this step ran."""
        self.last_trained_samples = 0
        """How many samples the latest iteration's loss was backpropagated through (clean and appended copies)."""
        self.logger = logging.getLogger("monai_adv.AdversarialTrainingStep")

    # ------------------------------------------------------------------------------------------------- settings

    def set_random_state(self, seed: int | None = None) -> AdversarialTrainingStep:
        """Seed the choices (which copies, which samples are replaced, epsilon draws, random starts)."""
        self.R = np.random.RandomState(seed)
        self._seed = int(self.R.randint(0, 2**31 - 1))
        self.generator = None
        self._pending_generator_state = None
        return self

    def active(self, epoch: int) -> bool:
        """Whether ``epoch`` (from 1) is augmented."""
        return bool(self.enabled) and bool(self.methods) and epsilon_factor(self.recipe, epoch) > 0

    def attack_network(self, engine: Any) -> nn.Module:
        """The network the attack uses: the step's own, or the trainer's."""
        return self.network if self.network is not None else engine.network

    def attack_loss(self, engine: Any) -> LossFunction:
        """The loss the attack follows: the step's own, or the trainer's."""
        return self.loss_function if self.loss_function is not None else engine.loss_function

    def plan(self, engine: Any) -> StepPlan:
        """What the step does on ``engine`` when an epoch is augmented, and why.

        Raises:
            ValueError: when the engine has no network, optimizer or loss function.
        """
        key = id(engine)
        if key not in self._plans:
            for name in ("network", "optimizer", "loss_function"):
                if getattr(engine, name, None) is None:
                    raise ValueError(f"the adversarial training step needs the trainer's {name}; the engine has none.")
            self._plans[key] = self.plan_for(engine.network, engine.loss_function)
        return self._plans[key]

    def plan_for(self, network: nn.Module, loss_function: LossFunction) -> StepPlan:
        """What the step does in a trainer with this network and loss function (see :meth:`plan`)."""
        # `enabled` is read at every iteration (it may be flipped at any time), so it does not enter the plan
        if not self.methods:
            plan = StepPlan("plain", "no adversarial method is given")
        elif self.recipe.mode == "free":
            plan = StepPlan("free", "free mode: the step's own input gradient updates each image's perturbation")
        else:
            plan = self._fusion_plan(network, loss_function)
        notes: list[str] = []
        if plan.kind in ("fused", "free"):
            mixing = sorted({type(m).__name__ for m in network.modules() if _modes_differ(m)})
            if mixing:
                notes.append(
                    f"the {plan.kind} step with a network that has {mixing}: the attack gradient is the train-mode "
                    "one of the training step (BatchNorm batch statistics, dropout masks), and the copies go "
                    "through BatchNorm as a batch of their own. Pass fused=False to attack in the spec's "
                    "network_mode and train on the concatenated batch."
                )
        return StepPlan(plan.kind, plan.reason, tuple(notes))

    def _fusion_plan(self, engine_network: nn.Module, engine_loss: LossFunction) -> StepPlan:
        why_not = None
        if not self.fused:
            why_not = "fused=False"
        elif self.recipe.mode != "append":
            why_not = f"mode {self.recipe.mode!r}: only appended copies come from the clean backward pass"
        elif self.recipe.clean_weight == 0:
            why_not = "the clean loss has weight 0, so the clean backward pass gives no gradient to attack with"
        elif not all(m.spec.single_step for m in self.methods):
            why_not = "an attack with several steps, a random start or an attack loss needs its own passes"
        elif self.network is not None and unwrap_network(self.network) is not unwrap_network(engine_network):
            why_not = "the attack's network is not the trainer's"
        elif self.loss_function is not None and self.loss_function is not engine_loss:
            why_not = (
                f"the attack follows a loss object ({type(self.loss_function).__name__}) other than the trainer's, "
                "even if equal: give the trainer's own loss object, or none"
            )
        elif any(m.spec.network_mode == "eval" for m in self.methods) and any(
            _modes_differ(m) for m in engine_network.modules()
        ):
            why_not = "the attack is in eval mode and the network computes differently in train mode"
        if why_not is None:
            return StepPlan("fused", "single-step copies from the training step's own backward pass")
        return StepPlan("separate", f"attack in a separate pass: {why_not}")

    # -------------------------------------------------------------------------------------------- the iteration

    def __call__(self, engine: Any, batchdata: Any) -> dict:
        """One training iteration (the trainer's ``iteration_update``).

        Returns:
            ``engine.state.output``: ``{"image", "label", "pred", "loss"}``.

        Raises:
            ValueError: for a missing batch, an empty one, or labels that do not fit the prediction.
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        self.last_values = {}
        self.last_iteration = (id(engine), engine.state.iteration)
        epoch = int(engine.state.epoch)
        rewritten = self._rewritten_iteration == engine.state.iteration  # the handler already augmented the batch
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if len(batch) == 2:
            inputs, targets = batch
            args: tuple = ()
            kwargs: dict = {}
        else:
            inputs, targets, args, kwargs = batch
        size = int(inputs.shape[0])
        if size == 0:
            raise ValueError("the training batch holds no samples: nothing to train on.")
        engine.state.output = {CommonKeys.IMAGE: inputs, CommonKeys.LABEL: targets}
        should_zero, should_step = _accumulation(engine)
        engine.network.train()
        if should_zero:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return engine.inferer(x, engine.network, *args, **kwargs)

        kind = "plain"
        if not rewritten and self.active(epoch):
            kind = self.plan(engine).kind
        run = _Iteration(self, engine, forward, inputs, targets, size, should_step)
        if kind == "plain":
            run.plain()
        elif kind == "fused":
            run.fused(self._choose_methods(), self._epsilons(epoch, size, inputs))
        elif kind == "free":
            run.free(self._epsilons(epoch, size, inputs), _sample_ids(inputs, batchdata, size))
        else:
            run.separate(self._choose_methods(), self._epsilons(epoch, size, inputs))
        appended = kind in ("fused", "separate") and self.recipe.mode == "append"
        self.last_trained_samples = size + (int(self.last_values.get("adv_samples", 0)) if appended else 0)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def augment_batch(self, engine: Any, batch: dict[Hashable, Any], keys: tuple[str, str]) -> dict[Hashable, Any]:
        """Attack and concatenate (append) or swap in (replace) a collated batch, for a trainer that runs its own
        iteration; the step then trains this iteration's batch as given.

        Args:
            engine: the trainer (its network and loss are attacked unless the step has its own).
            batch: the collated batch dictionary, on the trainer's device.
            keys: the image and label keys.

        Returns:
            The new batch (the given one is not modified).
        """
        self.last_values = {}
        self._rewritten_iteration = engine.state.iteration
        if not self.active(int(engine.state.epoch)):
            return batch
        image_key, label_key = keys
        images, labels = batch[image_key], batch[label_key]
        size = int(images.shape[0])
        epsilons = self._epsilons(int(engine.state.epoch), size, images)
        methods = self._choose_methods()
        network, loss = self.attack_network(engine), self.attack_loss(engine)
        if methods:
            self.last_values["adv_epsilon"] = torch.stack([epsilons[m.name].mean() for m in methods]).mean()
        if self.recipe.mode == "append":
            copies = self.make_copies(network, loss, _plain(images), _plain(labels), methods, epsilons)
            self.last_values["adv_samples"] = float(size * len(copies))
            if copies:
                self.adversarial = torch.cat(copies).detach()
            return {
                key: concatenate_batch([images, *copies] if key == image_key else [value] * (1 + len(copies)), size)
                for key, value in batch.items()
            }
        replaced_images, count = self.replace_samples(network, loss, _plain(images), _plain(labels), methods, epsilons)
        self.last_values["adv_samples"] = float(count)
        new_batch = dict(batch)
        if count:
            new_batch[image_key] = _with_meta(replaced_images.to(images.dtype), images)
        return new_batch

    # -------------------------------------------------------------------------------------------------- helpers

    def _torch_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self._seed)
            pending, self._pending_generator_state = self._pending_generator_state, None
            if pending is not None and pending[0] == str(self.generator.device):
                self.generator.set_state(pending[1])  # a checkpoint's state, for the device it was drawn on
        return self.generator

    def _choose_methods(self) -> list[AdversarialMethod]:
        return [m for m in self.methods if m.prob >= 1.0 or self.R.rand() < m.prob]

    def _epsilons(self, epoch: int, size: int, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each method's per-sample epsilon ``(B,)`` at this epoch: a number, a range drawn per sample, or
        ``U(0, epsilon)`` (``random_epsilon``), times the warm-up factor."""
        factor = epsilon_factor(self.recipe, epoch)
        out = {}
        for method in self.methods:
            eps = method.spec.epsilon
            low, high = eps if isinstance(eps, tuple) else (0.0 if self.recipe.random_epsilon else eps, eps)
            if low == high:
                values = torch.full((size,), float(high), device=images.device)
            else:
                u = torch.rand(size, generator=self._torch_generator(images.device), device=images.device)
                values = low + (high - low) * u
            out[method.name] = values * factor
        return out

    def _attack(self, network, loss, images, labels, method: AdversarialMethod, epsilons) -> torch.Tensor:
        generator = None
        if method.spec.random_start or method.spec.restarts > 1:
            generator = self._torch_generator(images.device)
        result = run_attack(
            network,
            images,
            labels,
            method.spec,
            loss,
            epsilon=epsilons[method.name],
            generator=generator,
            return_loss_after=method.track_loss,
        )
        if not method.spec.random_start:  # the first gradient pass ran at the clean images
            self.last_values.setdefault("adv_loss_clean", result.loss_before)
        if result.loss_after is not None:
            self.last_values[f"adv_loss_{method.name}"] = result.loss_after
        return result.images

    def make_copies(self, network, loss, images, labels, methods, epsilons) -> list[torch.Tensor]:
        """One copy per method; single-step methods that can share it take one input-gradient pass for all."""
        first = methods[0].spec if methods else None
        shareable = len(methods) > 1 and all(
            m.spec.single_step
            and not m.track_loss
            and (m.spec.network_mode, m.spec.amp, m.spec.on_zero_gradient)
            == (first.network_mode, first.amp, first.on_zero_gradient)
            for m in methods
        )
        if not shareable:
            return [self._attack(network, loss, images, labels, m, epsilons) for m in methods]
        module = unwrap_network(network)
        with preserved_network_state(module, first.network_mode):
            gradient, clean_loss = input_gradient(module, loss, images, labels, amp=first.amp)
        self.last_values.setdefault("adv_loss_clean", clean_loss)
        return copies_from_gradient(images, gradient, methods, epsilons)

    def replace_samples(self, network, loss, images, labels, methods, epsilons) -> tuple[torch.Tensor, int]:
        """The batch with a random ``replace_fraction`` of it swapped for adversarial versions (split among the
        methods); the number replaced."""
        size = images.shape[0]
        count = max(1, round(self.recipe.replace_fraction * size))
        chosen = self.R.permutation(size)[:count]
        out, replaced = images.clone(), 0
        for method, indices in zip(methods, np.array_split(chosen, max(1, len(methods)))):
            if len(indices) == 0:
                continue
            index = torch.as_tensor(indices, dtype=torch.long, device=images.device)
            subset_eps = {method.name: epsilons[method.name][index]}
            out[index] = self._attack(network, loss, images[index], labels[index], method, subset_eps).to(out.dtype)
            replaced += len(indices)
        return out, replaced

    # ------------------------------------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        """For ``CheckpointSaver``'s ``save_dict``: the free mode's perturbations by sample id, and the random
        states of the choices and the noise, so that a training continued from the checkpoint draws what an
        uninterrupted one would."""
        generator = None
        if self.generator is not None:
            generator = {"device": str(self.generator.device), "state": self.generator.get_state()}
        elif self._pending_generator_state is not None:  # restored, not drawn from yet
            generator = {"device": self._pending_generator_state[0], "state": self._pending_generator_state[1]}
        return {"deltas": {k: v.detach().cpu() for k, v in self.deltas.items()},
                "random": {"R": numpy_state(self.R), "seed": self._seed, "generator": generator}}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the perturbations (moved to their device at first use) and the random states (a checkpoint
        written before they were saved keeps the seeded ones). A generator state drawn on another device than
        the one the training continues on is dropped: the noise is then seeded again from the step's seed."""
        self.deltas = {str(k): torch.as_tensor(v) for k, v in dict(state.get("deltas", {})).items()}
        saved = state.get("random")
        if saved is None:
            return
        restore_numpy_state(saved["R"], self.R)
        self._seed = int(saved["seed"])
        self.generator = None
        generator = saved.get("generator")
        self._pending_generator_state = (str(generator["device"]), generator["state"]) if generator else None


def copies_from_gradient(
    images: torch.Tensor,
    gradient: torch.Tensor,
    methods: Sequence[AdversarialMethod],
    epsilons: dict[str, torch.Tensor],
) -> list[torch.Tensor]:
    """Each single-step method's signed step from ``images`` along the one ``gradient``, projected and clamped
    (detached); the value bounds are taken once per clamp setting (a range check reads the images once)."""
    bounds: dict[tuple, Any] = {}
    copies = []
    for method in methods:
        spec, eps = method.spec, epsilons[method.name]
        key = (spec.clamp, spec.value_range)
        if key not in bounds:
            bounds[key] = clamp_bounds(images, spec.clamp, spec.value_range)
        if spec.relative_step is not None:
            step_size = eps * spec.relative_step
        else:
            step_size = torch.full_like(eps, spec.step_size) if spec.step_size is not None else eps
        moved = signed_gradient_step(images, gradient, step_size, spec.direction)
        copies.append(project_and_clamp(moved, images, eps, bounds[key]).detach())
    return copies


def _with_meta(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(like, MetaTensor):  # keep the batch's metadata (file names, affines) on the new values
        out = like.detach().clone()
        out.copy_(values)
        return out
    return values


def _accumulation(engine: Any) -> tuple[bool, bool]:
    """Whether this iteration zeroes the gradients and whether it steps the optimiser (the trainer's rule)."""
    acc = int(getattr(engine, "accumulation_steps", 1) or 1)
    if acc <= 1:
        return True, True
    epoch_length = engine.state.epoch_length
    if epoch_length is not None:
        local = (engine.state.iteration - 1) % epoch_length
        return local % acc == 0, (local + 1) % acc == 0 or (local + 1) == epoch_length
    local = engine.state.iteration - 1
    return local % acc == 0, (local + 1) % acc == 0


@functools.lru_cache(maxsize=1)
def _warn_if_bf16_emulated() -> None:
    """Once a process: bfloat16 autocast on a CPU without bfloat16 instructions is emulated, and slow."""
    if cpu_has_native_bf16() is False:
        logging.getLogger("monai_adv.AdversarialTrainingStep").warning(
            "amp=True on a CPU without bfloat16 instructions (%s has neither avx512_bf16 nor amx_bf16): the training "
            "step's bfloat16 autocast is emulated and can be tens of times slower than float32 (a 3D step: 15 s "
            "against 0.5 s); set amp to false (--amp false) on this machine.",
            cpu_model(),
        )


class _Iteration:
    """The passes of one iteration: forward under the trainer's autocast, backward with its scaling."""

    def __init__(self, step: AdversarialTrainingStep, engine: Any, forward: Callable, inputs, targets, size, do_step):
        self.step, self.engine, self.forward_fn = step, engine, forward
        self.inputs, self.targets, self.size, self.do_step = inputs, targets, size, do_step
        self.acc = int(getattr(engine, "accumulation_steps", 1) or 1)
        self.amp = bool(getattr(engine, "amp", False))
        self.device_type = inputs.device.type
        if self.amp and self.device_type == "cpu":
            _warn_if_bf16_emulated()
        scaler = getattr(engine, "scaler", None)
        self.scaler = scaler if (self.amp and scaler is not None and self.device_type == "cuda") else None
        self.values = step.last_values

    # the trainer's autocast: CUDA with its amp_kwargs (and GradScaler); on a CPU, bfloat16
    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        if self.device_type == "cuda":
            return torch.autocast("cuda", **getattr(self.engine, "amp_kwargs", {}))
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.forward_fn(x)

    def loss(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        engine = self.engine
        if self.step.labels_checked_epoch != engine.state.epoch:  # once an epoch, and on failure: name bad labels
            self.step.labels_checked_epoch = engine.state.epoch
            _check_labels_fit_prediction(_prediction(pred), labels, _label_stats(labels))
        try:
            with self.autocast():
                return engine.loss_function(pred, labels).mean()
        except (RuntimeError, IndexError, ValueError):
            _check_labels_fit_prediction(_prediction(pred), labels, _label_stats(labels))
            raise

    def forward_and_loss(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainer's forward pass and loss on ``x``, written to the output with their events."""
        output = self.engine.state.output
        output[CommonKeys.PRED] = pred = self.predict(x)
        self.engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        output[CommonKeys.LOSS] = loss = self.loss(pred, labels)
        self.engine.fire_event(IterationEvents.LOSS_COMPLETED)
        return pred, loss

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        scaled = loss / self.acc if self.acc > 1 else loss
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward(retain_graph=retain_graph)

    def optimizer_step(self) -> None:
        self.engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if not self.do_step:
            return
        if self.scaler is not None:
            self.scaler.step(self.engine.optimizer)
            self.scaler.update()
        else:
            self.engine.optimizer.step()

    def _weights(self, copies: int) -> tuple[float, float]:
        """The clean and per-copy loss weights (default: each sample counts once, as in the concatenated batch)."""
        recipe = self.step.recipe
        share = 1.0 / (1 + copies)
        clean = recipe.clean_weight if recipe.clean_weight is not None else share
        adversarial = recipe.adversarial_weight if recipe.adversarial_weight is not None else share * copies
        return clean, adversarial / max(copies, 1)

    # ------------------------------------------------------------------------------------------------- kinds

    def plain(self) -> None:
        _, loss = self.forward_and_loss(self.inputs, self.targets)
        self.backward(loss)
        self.optimizer_step()

    def fused(self, methods: list[AdversarialMethod], epsilons: dict[str, torch.Tensor]) -> None:
        output, step = self.engine.state.output, self.step
        self.values["adv_samples"] = float(self.size * len(methods))
        if not methods:
            return self.plain()
        clean_weight, copy_weight = self._weights(len(methods))
        beta = step.recipe.consistency_weight
        image = self.inputs.detach().requires_grad_(True)  # the backward fills its .grad beside the parameters'
        pred, loss_clean = self.forward_and_loss(image, self.targets)
        self.backward(loss_clean * clean_weight, retain_graph=beta > 0)  # the plan keeps clean_weight > 0 here
        if image.grad is None:
            raise RuntimeError(
                "the training step's backward gave no gradient for the image: the trainer's inferer does not feed "
                "it to the network differentiably. Use fused=False."
            )
        clean, gradient = _plain(image.detach()), _plain(image.grad)
        image.grad = None
        # one synchronisation: sign(NaN) would make copies equal to the clean images; an enabled GradScaler skips
        # such steps itself (its scaled gradients may overflow on purpose)
        if self.scaler is None and not bool(torch.isfinite(gradient).all() & torch.isfinite(loss_clean.detach())):
            raise NonFiniteLossError(
                f"the training loss ({float(loss_clean):g}) or its input gradient is NaN or Inf: the network "
                "diverged (lower the learning rate) or an input holds NaN/Inf."
            )
        total = loss_clean.detach() * clean_weight
        copies = copies_from_gradient(clean, gradient, methods, epsilons)
        for index, (method, adversarial) in enumerate(zip(methods, copies)):
            # one forward/backward per copy: the gradient of one pass over all copies, at a plain step's memory
            pred_adv = self.predict(adversarial)
            loss_adv = self.loss(pred_adv, self.targets)
            term = loss_adv * copy_weight
            if beta > 0:
                consistency = consistency_kl(_prediction(pred), _prediction(pred_adv))
                term = term + beta * consistency / len(methods)
                self.values["adv_loss_consistency"] = consistency.detach()
            self.backward(term, retain_graph=beta > 0 and index < len(methods) - 1)  # the clean graph, again
            total = total + term.detach()
            self.values[f"adv_loss_{method.name}"] = loss_adv.detach()
        self.values["adv_loss_clean"] = loss_clean.detach()
        self.values["adv_epsilon"] = torch.stack([epsilons[m.name].mean() for m in methods]).mean()
        output[CommonKeys.LOSS] = total.detach()
        output[CommonKeys.IMAGE] = image.detach()
        step.adversarial = torch.cat(copies) if len(copies) > 1 else copies[0]
        self.optimizer_step()

    def separate(self, methods: list[AdversarialMethod], epsilons: dict[str, torch.Tensor]) -> None:
        engine, output, step = self.engine, self.engine.state.output, self.step
        if not methods:
            self.values["adv_samples"] = 0.0
            return self.plain()
        network, attack_loss = step.attack_network(engine), step.attack_loss(engine)
        images, labels = _plain(self.inputs), _plain(self.targets)
        recipe = step.recipe
        if recipe.mode == "replace":
            replaced, count = step.replace_samples(network, attack_loss, images, labels, methods, epsilons)
            self.values["adv_samples"] = float(count)
            step.adversarial = replaced.detach()
            trained = _with_meta(replaced.to(self.inputs.dtype), self.inputs)
            output[CommonKeys.IMAGE] = trained
            _, loss = self.forward_and_loss(trained, self.targets)
            self.backward(loss)
            self.values["adv_epsilon"] = torch.stack([epsilons[m.name].mean() for m in methods]).mean()
            return self.optimizer_step()
        copies = step.make_copies(network, attack_loss, images, labels, methods, epsilons)
        k = len(copies)
        self.values["adv_samples"] = float(self.size * k)
        step.adversarial = torch.cat(copies).detach()
        trained = concatenate_batch([self.inputs, *copies], self.size)
        trained_labels = concatenate_batch([self.targets] * (1 + k), self.size)
        output[CommonKeys.IMAGE], output[CommonKeys.LABEL] = trained, trained_labels
        pred = self.predict(trained)
        output[CommonKeys.PRED] = pred
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        default_weights = recipe.clean_weight is None and recipe.adversarial_weight is None
        logits = _prediction(pred)
        parts = [logits[i * self.size : (i + 1) * self.size] for i in range(1 + k)]
        if default_weights and not recipe.consistency_weight:
            loss = self.loss(pred, trained_labels)  # the definition: one step on the concatenated batch
            with torch.no_grad():
                part_losses = [self.loss(p, self.targets).detach() for p in parts]
        else:
            clean_weight, copy_weight = self._weights(k)
            part_losses = [self.loss(p, self.targets) for p in parts]
            loss = clean_weight * part_losses[0] + copy_weight * sum(part_losses[1:])
            if recipe.consistency_weight:
                consistency = sum(consistency_kl(parts[0], p) for p in parts[1:]) / k
                loss = loss + recipe.consistency_weight * consistency
                self.values["adv_loss_consistency"] = consistency.detach()
            part_losses = [p.detach() for p in part_losses]
        output[CommonKeys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        self.backward(loss)
        self.values["adv_loss_clean"] = part_losses[0]
        for method, part_loss in zip(methods, part_losses[1:]):
            self.values[f"adv_loss_{method.name}"] = part_loss
        self.values["adv_epsilon"] = torch.stack([epsilons[m.name].mean() for m in methods]).mean()
        self.optimizer_step()

    def free(self, epsilons: dict[str, torch.Tensor], ids: list[str] | None) -> None:
        step = self.step
        if ids is None:
            raise ValueError(
                "free adversarial training keeps a perturbation per image, keyed by its file name: the batch's "
                "images carry no filename_or_obj metadata (load them with LoadImaged) and no 'id' entry."
            )
        method = step.methods[0]
        spec, eps = method.spec, epsilons[method.name]
        clean = _plain(self.inputs).detach()
        store = step.store_device or clean.device
        delta = torch.zeros_like(clean)
        for b, key in enumerate(ids):
            kept = step.deltas.get(key)
            if kept is not None and kept.shape == clean.shape[1:]:
                delta[b] = kept.to(clean)
        bounds = clamp_bounds(clean, spec.clamp, spec.value_range)
        x = project_and_clamp(clean + delta, clean, eps, bounds).requires_grad_(True)
        _, loss = self.forward_and_loss(x, self.targets)
        self.backward(loss)
        gradient = x.grad
        x_detached = x.detach()
        moved = signed_gradient_step(x_detached, gradient, eps, "ascend")
        updated = project_and_clamp(moved, clean, eps, bounds) - clean
        for b, key in enumerate(ids):
            step.deltas[key] = updated[b].detach().to(store)
        self.values["adv_samples"] = float(self.size)
        self.values["adv_epsilon"] = eps.mean()
        self.values[f"adv_loss_{method.name}"] = loss.detach()
        step.adversarial = x_detached
        self.optimizer_step()


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
