"""Dictionary transforms: FGSMd and InvFGSMd, the ``Compose``-friendly forms of :mod:`.array`."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms.transform import MapTransform, RandomizableTransform
from torch import nn

from monai_adv.attacks import AttackSpec, LossFunction
from monai_adv.transforms.array import FGSM, GradientSign, InvFGSM, check_input_gradient

__all__ = ["FGSMD", "FGSMDict", "FGSMd", "GradientSignd", "InvFGSMD", "InvFGSMDict", "InvFGSMd"]

_WORKER_WARNING = (
    "{name} runs inside a DataLoader worker process: it attacks the worker's copy of the network, taken when the "
    "worker started, so weight updates made by training in the main process never reach it (with "
    "persistent_workers=True, never at all), and a CUDA network cannot be used in a forked worker. For online "
    "adversarial augmentation during training use monai_adv.handlers.AdversarialAugmentationHandler (it attacks "
    "the trainer's current network); in a pipeline, use a fixed trained network or num_workers=0."
)


class GradientSignd(RandomizableTransform, MapTransform):
    """Dictionary-based shell of :class:`monai_adv.transforms.GradientSign`.

    Every image under ``keys`` is perturbed separately against the label under ``label_key``;
    with probability ``prob`` per call (seeded by :meth:`set_random_state`), else the data is
    returned untouched. All keys share the epsilon sampled for the call. The input mapping is
    not modified: a new dictionary is returned, and on an error nothing is half-written.
    ``network``, ``loss_function``, ``epsilon``, ``spec``, ``batched``, ``return_loss_after`` and the attack
    ``options`` (the fields of :class:`monai_adv.attacks.AttackSpec`: ``num_steps``, ``clamp``, ...) are as for
    :class:`monai_adv.transforms.GradientSign`, and are validated here.

    Args:
        keys: keys of the images to perturb.
        label_key: key of the label the loss is measured against.
        prob: probability of perturbing the data at each call.
        allow_missing_keys: skip image keys that are missing instead of raising.

    Raises:
        ValueError: for ``prob`` outside [0, 1], a ``label_key`` that is also an image key, or a bad attack option.
        TypeError: for an unknown attack option.
    """

    array_class: ClassVar[type[GradientSign]] = GradientSign
    backend = GradientSign.backend

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        network: nn.Module | None = None,
        loss_function: LossFunction | None = None,
        epsilon: float | Sequence[float] | None = None,
        prob: float = 1.0,
        spec: AttackSpec | Mapping[str, Any] | None = None,
        batched: bool = False,
        return_loss_after: bool = False,
        allow_missing_keys: bool = False,
        **options: Any,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob!r}.")
        RandomizableTransform.__init__(self, prob)
        if label_key in self.keys:
            raise ValueError(f"label_key {label_key!r} is also one of the image keys {self.keys}.")
        self.label_key = label_key
        self.attack = self.array_class(
            network=network,
            loss_function=loss_function,
            epsilon=epsilon,
            spec=spec,
            batched=batched,
            return_loss_after=return_loss_after,
            **options,
        )
        self._applied = False
        self._warned_worker = False

    @property
    def network(self) -> nn.Module | None:
        """The network attacked (shared with the inner array transform)."""
        return self.attack.network

    @network.setter
    def network(self, network: nn.Module | None) -> None:
        self.attack.network = network

    @property
    def loss_function(self) -> LossFunction | None:
        """The loss whose gradient is followed (shared with the inner array transform)."""
        return self.attack.loss_function

    @loss_function.setter
    def loss_function(self, loss_function: LossFunction | None) -> None:
        self.attack.loss_function = loss_function

    @property
    def last_stats(self) -> dict[str, torch.Tensor | None]:
        """Epsilon and losses of the last perturbation made (see :class:`GradientSign`); empty when none was."""
        return self.attack.last_stats

    @property
    def applied(self) -> bool:
        """Whether the latest draw (:meth:`randomize`, done by each call) perturbs: False when ``prob`` skipped it."""
        return self._applied

    @property
    def method(self) -> str:
        """The method's name: ``"fgsm"`` or ``"invfgsm"`` (used to name metrics and tracked parameters)."""
        return self.attack.method

    @property
    def batched(self) -> bool:
        """Whether the transform takes collated batches ``(B, C, *spatial)``."""
        return self.attack.batched

    @property
    def single_step(self) -> bool:
        """Whether it is the single-step form, which :meth:`perturb_with_gradient` can build from a given gradient."""
        return self.attack.single_step

    @property
    def tracks_loss(self) -> bool:
        """Whether each call also measures the loss on its output (``return_loss_after``)."""
        return self.attack.return_loss_after

    @property
    def network_mode(self) -> str:
        """The network's mode during the attack (``"eval"``, ``"train"`` or ``"unchanged"``)."""
        return self.attack.network_mode

    def check_gradient(self, images: torch.Tensor, gradient: torch.Tensor, check_finite: bool = True) -> None:
        """Check a given input gradient and the images against this transform's settings, with one host-device
        sync (see :func:`monai_adv.transforms.array.check_input_gradient`)."""
        check_input_gradient(
            images, gradient, self.attack.clamp, self.attack.value_range, self.attack.on_zero_gradient, check_finite
        )

    @property
    def amp(self) -> bool:
        """Whether the attack's forward passes run under ``torch.autocast``."""
        return self.attack.amp

    @amp.setter
    def amp(self, amp: bool) -> None:
        self.attack.amp = bool(amp)

    @property
    def spec(self) -> AttackSpec:
        """The attack's validated settings (shared with the inner array transform)."""
        return self.attack.spec

    @property
    def params(self) -> dict[str, Any]:
        """The settings, flat, for experiment tracking (epsilon as a number, or ``[low, high]`` for a range)."""
        low, high = self.attack.epsilon
        return {
            "epsilon": low if low == high else [low, high],
            "num_steps": self.attack.num_steps,
            "prob": self.prob,
            "clamp": self.attack.clamp,
        }

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> GradientSignd:
        super().set_random_state(seed, state)
        self.attack.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        """Draw whether to perturb (``prob``) and, if so, this call's epsilon; see :attr:`applied`."""
        super().randomize(None)
        self._applied = self._do_transform
        self.attack.last_stats = {}
        if self._applied:
            self.attack.randomize()

    def _warn_if_in_worker(self) -> None:
        if not self._warned_worker and torch.utils.data.get_worker_info() is not None:
            self._warned_worker = True
            warnings.warn(_WORKER_WARNING.format(name=type(self).__name__), stacklevel=3)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """
        Raises:
            KeyError: when an image key (unless ``allow_missing_keys``) or the label key is missing.
        """
        self._warn_if_in_worker()
        d = dict(data)
        self.randomize(None)
        if not self._applied:
            return d
        keys = list(self.key_iterator(d))  # raises KeyError for a missing key unless allowed
        if not keys:
            self._applied = False
            return d
        if self.label_key not in d:
            raise KeyError(
                f"label key {self.label_key!r} is missing from the data (keys present: {sorted(map(str, d))})."
            )
        # Compute every output before writing any, so that an error leaves nothing half-done.
        outputs = {key: self.attack(d[key], d[self.label_key], randomize=False) for key in keys}
        d.update(outputs)
        return d

    def perturb_with_gradient(
        self,
        data: Mapping[Hashable, NdarrayOrTensor],
        gradients: Mapping[Hashable, torch.Tensor],
        randomize: bool = True,
        validate: bool = True,
    ) -> dict[Hashable, NdarrayOrTensor]:
        """Like :meth:`__call__`, but from given input gradients (one per image key), with no gradient pass.

        Only for the single-step form (:attr:`single_step`); see :meth:`GradientSign.from_gradient`.
        The outputs are plain detached tensors on the images' device.

        Args:
            data: the batch; its images must be torch tensors.
            gradients: the loss gradient of each image key, at the images in ``data``.
            randomize: draw ``prob`` and epsilon anew (False: use the latest :meth:`randomize`).
            validate: check each gradient and image range (one host-device sync per key).

        Raises:
            KeyError: when an image key lacks its image or gradient.
            ValueError: see :meth:`GradientSign.from_gradient`.
        """
        d = dict(data)
        if randomize:
            self.randomize(None)
        if not self._applied:
            return d
        keys = list(self.key_iterator(d))
        missing = [key for key in keys if key not in gradients]
        if missing:
            raise KeyError(
                f"no input gradient given for image key(s) {missing} (given: {sorted(map(str, gradients))})."
            )
        outputs = {
            key: self.attack.from_gradient(d[key], gradients[key], randomize=False, validate=validate)  # type: ignore[arg-type]
            for key in keys
        }
        d.update(outputs)
        return d


class FGSMd(GradientSignd):
    """Dictionary-based :class:`monai_adv.transforms.FGSM` (raises the loss).

    Example::

        train_transforms = Compose([
            LoadImaged(keys=["image", "label"], ensure_channel_first=True),
            ScaleIntensityd(keys="image"),
            FGSMd(keys="image", label_key="label", network=net,
                  loss_function=DiceCELoss(to_onehot_y=True, softmax=True), epsilon=0.1, prob=0.5),
        ])
    """

    array_class: ClassVar[type[GradientSign]] = FGSM


class InvFGSMd(GradientSignd):
    """Dictionary-based :class:`monai_adv.transforms.InvFGSM` (lowers the loss)."""

    array_class: ClassVar[type[GradientSign]] = InvFGSM


FGSMD = FGSMDict = FGSMd
InvFGSMD = InvFGSMDict = InvFGSMd
