"""Dictionary transforms: FGSMd and InvFGSMd, the ``Compose``-friendly forms of :mod:`.array`."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import ClassVar, Literal

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms.transform import MapTransform, RandomizableTransform
from torch import nn

from monai_adv.attacks import ClampMode, NetworkMode
from monai_adv.transforms.array import FGSM, GradientSign, InvFGSM

__all__ = ["FGSMD", "FGSMDict", "FGSMd", "GradientSignd", "InvFGSMD", "InvFGSMDict", "InvFGSMd"]

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GradientSignd(RandomizableTransform, MapTransform):
    """Dictionary-based shell of :class:`monai_adv.transforms.GradientSign`.

    Every image under ``keys`` is perturbed separately against the label under ``label_key``;
    with probability ``prob`` per call (seeded by :meth:`set_random_state`), else the data is
    returned untouched. All keys share the epsilon sampled for the call. The input mapping is
    not modified: a new dictionary is returned, and on an error nothing is half-written.

    Args:
        keys: keys of the images to perturb.
        label_key: key of the label the loss is measured against.
        network, loss_function, epsilon, num_steps, step_size, random_start, clamp, value_range,
        network_mode, batched, amp, return_loss_after, on_zero_gradient: as for
            :class:`monai_adv.transforms.GradientSign`.
        prob: probability of perturbing the data at each call.
        allow_missing_keys: skip image keys that are missing instead of raising.

    Raises:
        ValueError: for ``prob`` outside [0, 1], or a ``label_key`` that is also an image key.
    """

    array_class: ClassVar[type[GradientSign]] = GradientSign
    backend = GradientSign.backend

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        network: nn.Module | None = None,
        loss_function: LossFunction | None = None,
        epsilon: float | Sequence[float] = 0.1,
        prob: float = 1.0,
        num_steps: int = 1,
        step_size: float | None = None,
        random_start: bool = False,
        clamp: ClampMode = "range",
        value_range: Sequence[float] = (0.0, 1.0),
        network_mode: NetworkMode = "eval",
        batched: bool = False,
        amp: bool = False,
        return_loss_after: bool = False,
        on_zero_gradient: Literal["raise", "warn", "ignore"] = "raise",
        allow_missing_keys: bool = False,
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
            num_steps=num_steps,
            step_size=step_size,
            random_start=random_start,
            clamp=clamp,
            value_range=value_range,
            network_mode=network_mode,
            batched=batched,
            amp=amp,
            return_loss_after=return_loss_after,
            on_zero_gradient=on_zero_gradient,
        )

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
        """Epsilon and losses of the last perturbation made (see :class:`GradientSign`)."""
        return self.attack.last_stats

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> GradientSignd:
        super().set_random_state(seed, state)
        self.attack.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """
        Raises:
            KeyError: when an image key (unless ``allow_missing_keys``) or the label key is missing.
        """
        d = dict(data)
        self.randomize(None)
        self.attack.last_stats = {}
        if not self._do_transform:
            return d
        keys = list(self.key_iterator(d))  # raises KeyError for a missing key unless allowed
        if not keys:
            return d
        if self.label_key not in d:
            raise KeyError(
                f"label key {self.label_key!r} is missing from the data (keys present: {sorted(map(str, d))})."
            )
        self.attack.randomize()
        # Compute every output before writing any, so that an error leaves nothing half-done.
        outputs = {key: self.attack(d[key], d[self.label_key], randomize=False) for key in keys}
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
