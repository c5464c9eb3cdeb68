"""Array transforms: FGSM and Inverse FGSM as MONAI transforms over :mod:`monai_adv.attacks`."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from monai.config.type_definitions import NdarrayOrTensor
from monai.data.meta_tensor import MetaTensor
from monai.transforms.transform import Randomizable, Transform
from monai.utils import TransformBackends
from monai.utils.type_conversion import convert_to_dst_type, convert_to_tensor
from torch import nn

from monai_adv.attacks import (
    AttackSpec,
    ClampMode,
    Direction,
    LossFunction,
    NonFiniteLossError,
    ZeroGradientAction,
    ZeroInputGradientError,
    clamp_bounds,
    run_attack,
    signed_gradient_step,
)

__all__ = ["FGSM", "GradientSign", "InvFGSM", "check_input_gradient"]

# Values this far outside ``value_range`` (as a fraction of it) mean the range is wrong for the data.
_RANGE_TOLERANCE = 1e-4
_ZERO_GRADIENT_MESSAGE = (
    "the gradient of the loss with respect to the input is zero everywhere, so the perturbation would return the "
    "images unchanged. A common cause is softmax over a single output channel (e.g. DiceCELoss(softmax=True) with "
    "out_channels=1): use two or more output channels, or sigmoid=True for a one-channel head."
)


def check_input_gradient(
    images: torch.Tensor,
    gradient: torch.Tensor,
    clamp: ClampMode = "range",
    value_range: Sequence[float] = (0.0, 1.0),
    on_zero_gradient: ZeroGradientAction = "raise",
    check_finite: bool = True,
) -> None:
    """Check a given input gradient (and, for ``clamp="range"``, the images) with one host-device sync.

    The checks :func:`monai_adv.attacks.gradient_sign_attack` makes around its own gradient pass, for a
    gradient that came from elsewhere (e.g. a training step's backward pass). All values are gathered
    into one tensor and read once, so that a GPU step waits for the device at most once.

    Args:
        images: the clean batch ``(B, C, *spatial)``.
        gradient: the loss gradient with respect to ``images``.
        clamp: as for :class:`GradientSign`; only ``"range"`` checks the image values.
        value_range: the ``(low, high)`` the images must lie in for ``clamp="range"``.
        on_zero_gradient: ``"raise"``, ``"warn"`` or ``"ignore"`` when the gradient is zero everywhere.
        check_finite: refuse NaN/Inf gradients (off under a gradient scaler, whose overflowing steps it skips).

    Raises:
        NonFiniteLossError: for a non-finite gradient (a ``ValueError``).
        ValueError: for images outside ``value_range``.
        ZeroInputGradientError: for an all-zero gradient with ``on_zero_gradient="raise"``.
    """
    checks = [torch.isfinite(gradient).all(), gradient.ne(0).any()]
    if clamp == "range":
        checks += [images.detach().min(), images.detach().max()]
    values = torch.stack([c.to(torch.float64) for c in checks]).tolist()  # the one sync
    if check_finite and not values[0]:
        raise NonFiniteLossError(
            f"the input gradient (shape {tuple(gradient.shape)}) has NaN or Inf values: the loss or the network's "
            "output is not finite (check the weights, the learning rate and the images)."
        )
    if on_zero_gradient != "ignore" and not values[1]:
        if on_zero_gradient == "raise":
            raise ZeroInputGradientError(_ZERO_GRADIENT_MESSAGE)
        warnings.warn(_ZERO_GRADIENT_MESSAGE, stacklevel=2)
    if clamp == "range":
        low, high = (float(v) for v in value_range)
        tolerance = _RANGE_TOLERANCE * (high - low)
        if values[2] < low - tolerance or values[3] > high + tolerance:
            raise ValueError(
                f"images have values in [{values[2]:g}, {values[3]:g}], outside value_range ({low:g}, {high:g}); "
                "clamping would destroy them. Scale the images into the range, set value_range to the data's "
                "range, or use clamp='image' or clamp='none'."
            )


def _check_single_item(img: torch.Tensor, label: torch.Tensor) -> None:
    """Refuse a batch given as one item, with the fix: ``batched=True``.

    One item is ``(C, *spatial)`` with a label ``(C_l, *spatial)`` or ``(*spatial)``. A label with more
    dimensions than the image, or whose trailing (spatial) shape differs from the image's, is what a collated
    ``(B, ...)`` pair looks like when it reaches an unbatched transform.
    """
    spatial = tuple(img.shape[1:])
    fits = label.ndim in (img.ndim, img.ndim - 1) and tuple(label.shape[-len(spatial) :]) == spatial
    if not fits:
        hint = ""
        if label.ndim >= 3 and label.shape[0] == img.shape[0] and tuple(label.shape[2:]) == tuple(img.shape[2:]):
            hint = f" They look like a batch of {img.shape[0]}: pass batched=True to take (B, C, *spatial) batches."
        raise ValueError(
            f"label shape {tuple(label.shape)} does not fit image shape {tuple(img.shape)} of one item "
            f"(C, *spatial): expected a label (C_l, *{spatial}) or {spatial}.{hint}"
        )


def _network_device(network: nn.Module) -> torch.device:
    for param in network.parameters():
        return param.device
    return torch.device("cpu")


class GradientSign(Randomizable, Transform):
    """Perturb an image along the sign of the loss gradient of a network.

    The shared implementation of :class:`FGSM` and :class:`InvFGSM`, which differ only in
    :attr:`direction`: ``"ascend"`` raises the loss, ``"descend"`` lowers it. See
    :func:`monai_adv.attacks.gradient_sign_attack`.

    By default the input is one channel-first item ``(C, *spatial)`` with its label
    ``(C_l, *spatial)``, as for any MONAI transform; with ``batched=True`` it is a collated batch
    ``(B, C, *spatial)``. The image is moved to the network's device for the attack and the
    result is returned with the input's type (numpy, tensor or MetaTensor with its metadata),
    dtype and device.

    After each call, :attr:`last_stats` holds the epsilon used and the loss before (and, with
    ``return_loss_after``, after) the perturbation, as detached tensors.

    Args:
        network: the segmentation network. May be set later (``transform.network = net``), e.g.
            by :class:`monai_adv.handlers.AdversarialAugmentationHandler`.
        loss_function: ``loss_function(pred, label)``, e.g. ``DiceCELoss(to_onehot_y=True, softmax=True)``; may be
            None when the attack spec names its own ``loss``.
        epsilon: L-infinity size of the perturbation, or a ``(low, high)`` range sampled uniformly per call.
        spec: an :class:`monai_adv.attacks.AttackSpec` (or a mapping of its options) with the attack's settings;
            its direction is this class's.
        batched: take ``(B, C, *spatial)`` batches instead of single items.
        return_loss_after: also measure the loss on the perturbed image (one more forward pass).
        options: any other :class:`monai_adv.attacks.AttackSpec` option, refining ``spec``: ``num_steps``,
            ``step_size``, ``random_start``, ``clamp``, ``value_range``, ``network_mode``, ``amp``,
            ``on_zero_gradient``, ``schedule``, ``loss``, ``radii``, ``restarts``, ``keep_best``.

    Raises:
        TypeError: for an unknown option, or an epsilon that is neither a number nor a ``(low, high)`` pair.
        ValueError: for a bad option value (e.g. a negative, reversed or non-finite ``epsilon``, ``num_steps=0``,
            ``clamp="bogus"``), naming it: the spec is validated here, once.
    """

    direction: ClassVar[Direction] = "ascend"
    method: ClassVar[str] = "gradient_sign"
    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        network: nn.Module | None = None,
        loss_function: LossFunction | None = None,
        epsilon: float | Sequence[float] | None = None,
        spec: AttackSpec | Mapping[str, Any] | None = None,
        batched: bool = False,
        return_loss_after: bool = False,
        **options: Any,
    ) -> None:
        if "direction" in options:
            raise TypeError(f"{type(self).__name__} has a fixed direction ({self.direction!r}): do not pass one.")
        if epsilon is not None:
            options["epsilon"] = epsilon
        self.spec = AttackSpec.create(spec, direction=self.direction, **options)
        self.network = network
        self.loss_function = loss_function
        self.batched = batched
        self.return_loss_after = return_loss_after
        self._epsilon = self.epsilon[0]
        self._seed = 0
        self.last_stats: dict[str, torch.Tensor | None] = {}

    @property
    def epsilon(self) -> tuple[float, float]:
        """The epsilon range ``(low, high)`` (equal bounds for a fixed epsilon)."""
        eps = self.spec.epsilon
        return eps if isinstance(eps, tuple) else (eps, eps)

    @property
    def num_steps(self) -> int:
        """Gradient steps of the attack."""
        return self.spec.num_steps

    @property
    def step_size(self) -> float | None:
        """Step of the iterative form (None: the default)."""
        return self.spec.step_size

    @property
    def random_start(self) -> bool:
        """Whether the attack starts at a random point of the epsilon ball."""
        return self.spec.random_start

    @property
    def clamp(self) -> str:
        """The clamp mode (``"range"``, ``"image"`` or ``"none"``)."""
        return self.spec.clamp

    @property
    def value_range(self) -> tuple[float, float]:
        """Bounds for ``clamp="range"``."""
        return self.spec.value_range

    @property
    def network_mode(self) -> str:
        """The network's mode during the attack."""
        return self.spec.network_mode

    @property
    def on_zero_gradient(self) -> str:
        """What happens when the input gradient is zero everywhere."""
        return self.spec.on_zero_gradient

    @property
    def amp(self) -> bool:
        """Whether the attack's forward passes run under ``torch.autocast``."""
        return self.spec.amp

    @amp.setter
    def amp(self, amp: bool) -> None:
        self.spec = self.spec.replace(amp=bool(amp))

    def randomize(self, data: Any = None) -> None:
        """Sample this call's epsilon (from a range) and the seed of the random start."""
        low, high = self.epsilon
        self._epsilon = low if low == high else float(self.R.uniform(low, high))
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, img: NdarrayOrTensor, label: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """
        Args:
            img: ``(C, *spatial)``, or ``(B, C, *spatial)`` with ``batched=True``.
            label: ``(C_l, *spatial)`` or ``(*spatial)`` (``(B, ...)`` when batched).
            randomize: sample a new epsilon; False reuses the last one.

        Returns:
            The perturbed image, of the same type, dtype, device and metadata as ``img``.

        Raises:
            RuntimeError: when no network or loss function has been given.
            TypeError: for a non-array input or an integer image.
            ValueError: for NaN/Inf values, mismatched shapes, labels that do not fit the loss,
                or images outside ``value_range``.
        """
        if self.network is None or (self.loss_function is None and self.spec.loss is None):
            raise RuntimeError(
                f"{type(self).__name__} needs a network and a loss_function: pass them to the constructor or "
                "attach it through AdversarialAugmentationHandler, which uses the trainer's."
            )
        if not isinstance(img, (np.ndarray, torch.Tensor)) or not isinstance(label, (np.ndarray, torch.Tensor)):
            raise TypeError(
                f"img and label must be numpy arrays or torch tensors, got {type(img).__name__} and "
                f"{type(label).__name__}."
            )
        if randomize:
            self.randomize()
        min_ndim = 3 if self.batched else 2
        if img.ndim < min_ndim:
            expected = "(B, C, *spatial)" if self.batched else "channel-first (C, *spatial)"
            raise ValueError(f"img must be {expected}, got shape {tuple(img.shape)}.")
        if self.batched and img.shape[0] == 0:
            raise ValueError(f"img is an empty batch (shape {tuple(img.shape)}): there is nothing to perturb.")

        device = _network_device(self.network)
        # Keep the input's dtype: the core casts to the network's dtype for the forward pass only,
        # and rejects integer images (TypeError naming the dtype).
        images = convert_to_tensor(img, device=device, track_meta=False)
        labels = convert_to_tensor(label, device=device, track_meta=False)
        if not self.batched:
            _check_single_item(images, labels)
            images, labels = images.unsqueeze(0), labels.unsqueeze(0)
        generator = None
        if self.random_start or self.spec.restarts > 1:
            generator = torch.Generator(device=device).manual_seed(self._seed)
        try:
            result = run_attack(
                self.network,
                images,
                labels,
                self.spec,
                self.loss_function,
                epsilon=self._epsilon,
                generator=generator,
                return_loss_after=self.return_loss_after,
            )
        except (ValueError, RuntimeError) as err:
            if not self.batched and img.ndim >= 4:
                err.add_note(
                    f"monai-adv: {type(self).__name__} read img of shape {tuple(img.shape)} as one item "
                    f"(C, *spatial) with {img.ndim - 1} spatial dims; if it is a batch (B, C, *spatial), pass "
                    "batched=True."
                )
            raise
        self.last_stats = {
            "epsilon": result.epsilon.mean(),
            "loss_before": result.loss_before,
            "loss_after": result.loss_after,
        }
        out = result.images if self.batched else result.images[0]
        return self._as_input_type(out, img)

    @property
    def single_step(self) -> bool:
        """Whether this is the single-step form (one signed step of the given loss from the image, no random
        start), which needs only the gradient at the image."""
        return self.spec.single_step

    def from_gradient(
        self, img: torch.Tensor, gradient: torch.Tensor, randomize: bool = True, validate: bool = True
    ) -> torch.Tensor:
        """The single step from a given input gradient, with no gradient pass of its own.

        ``clamp(img + s * epsilon * sign(gradient))`` with ``s = +1`` (FGSM) or ``-1`` (InvFGSM): the
        same result as :meth:`__call__` when ``gradient`` is the loss gradient at ``img`` (any positive
        multiple of it: the sign is all that counts). Used by
        :class:`monai_adv.handlers.AdversarialAugmentationHandler` to build adversarial copies from the
        training step's own backward pass. :attr:`last_stats` holds the epsilon, and no losses.

        Args:
            img: the clean images as a torch tensor, ``(B, C, *spatial)`` with ``batched=True``.
            gradient: the loss gradient with respect to ``img``, same shape.
            randomize: sample a new epsilon; False reuses the last one.
            validate: check the gradient and image range (:func:`check_input_gradient`; one host-device sync).

        Returns:
            The perturbed images, detached, as a plain tensor of ``img``'s dtype and device.

        Raises:
            ValueError: when this transform is iterative or has a random start (it needs gradients at other
                points), for mismatched shapes, an empty batch, or what :func:`check_input_gradient` raises.
        """
        if not self.single_step:
            raise ValueError(
                f"{type(self).__name__}(num_steps={self.num_steps}, random_start={self.random_start}) needs gradients "
                "at points other than the clean image: from_gradient only makes the single step."
            )
        images = convert_to_tensor(img, track_meta=False).detach()
        gradient = convert_to_tensor(gradient, track_meta=False).detach()
        if tuple(gradient.shape) != tuple(images.shape):
            raise ValueError(f"gradient shape {tuple(gradient.shape)} differs from image shape {tuple(images.shape)}.")
        if images.ndim < 2 or images.shape[0] == 0:
            raise ValueError(f"img is empty or has no channel (shape {tuple(images.shape)}): nothing to perturb.")
        if randomize:
            self.randomize()
        if validate:
            check_input_gradient(images, gradient, self.clamp, self.value_range, self.on_zero_gradient)  # type: ignore[arg-type]
        out = signed_gradient_step(images, gradient, self._epsilon, self.direction)
        if self.clamp == "range":
            out = out.clamp(float(self.value_range[0]), float(self.value_range[1]))
        else:
            bounds = clamp_bounds(images, self.clamp)  # type: ignore[arg-type]
            if bounds is not None:
                out = torch.maximum(torch.minimum(out, bounds[1]), bounds[0])
        self.last_stats = {"epsilon": torch.tensor(self._epsilon), "loss_before": None, "loss_after": None}
        return out

    @staticmethod
    def _as_input_type(out: torch.Tensor, img: NdarrayOrTensor) -> NdarrayOrTensor:
        output: NdarrayOrTensor = convert_to_dst_type(out, dst=img)[0]
        if isinstance(img, MetaTensor) and isinstance(output, MetaTensor):
            # The perturbation is not invertible and moves no voxel: the meta data stays valid as is.
            output.applied_operations = list(img.applied_operations)
        return output


class FGSM(GradientSign):
    """Fast Gradient Sign Method: ``img + epsilon * sign(grad_img L(network(img), label))``.

    Raises the loss: adversarial copies for augmentation or robustness testing. With
    ``num_steps > 1`` it is I-FGSM, and with ``random_start=True`` PGD. The arguments are those
    of :class:`GradientSign`.

    Example::

        from monai.losses import DiceCELoss
        from monai.networks.nets import BasicUNet
        net = BasicUNet(spatial_dims=2, in_channels=3, out_channels=2)
        fgsm = FGSM(net, DiceCELoss(to_onehot_y=True, softmax=True), epsilon=0.1)
        adversarial = fgsm(image, label)  # image (3, H, W) in [0, 1], label (1, H, W) in {0, 1}
    """

    direction: ClassVar[Direction] = "ascend"
    method: ClassVar[str] = "fgsm"


class InvFGSM(GradientSign):
    """Inverse FGSM: ``img - epsilon * sign(grad_img L(network(img), label))``.

    Lowers the loss: the paper's "positive noise" augmentation. With ``num_steps > 1`` it is the
    iterative inverse. The arguments are those of :class:`GradientSign`.
    """

    direction: ClassVar[Direction] = "descend"
    method: ClassVar[str] = "invfgsm"
