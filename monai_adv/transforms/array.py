"""Array transforms: FGSM and Inverse FGSM as MONAI transforms over :mod:`monai_adv.attacks`."""

from __future__ import annotations

import math
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
    AttackResult,
    AttackSpec,
    ClampMode,
    Direction,
    LossFunction,
    NonFiniteLossError,
    ZeroGradientAction,
    ZeroInputGradientError,
    clamp_bounds,
    preserved_network_state,
    project_and_clamp,
    run_attack,
    signed_gradient_step,
    unwrap_network,
)
from monai_adv.attacks.attack import _ZERO_GRADIENT_MESSAGE as _ATTACK_ZERO_GRADIENT_MESSAGE
from monai_adv.attacks.gradient_sign import (
    _as_network_input,
    _bounds,
    _compute_loss,
    _label_summary,
    _LabelStats,
    _per_sample,
    _prediction,
    _validate_types_and_shapes,
    _value_range,
    objective_gradient,
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


def _single_step_gradient(
    network: nn.Module, x: torch.Tensor, labels: torch.Tensor, loss_function: LossFunction, stats: _LabelStats | None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The input gradient, the loss and whether the gradient is zero everywhere, as
    :func:`~monai_adv.attacks.gradient_sign.objective_gradient` (``amp=False``) gives them, with its checks in one
    read of ``(loss, min, max)``: ``aminmax`` propagates NaN and shows an Inf, so the gradient is finite exactly when
    its min and max are, and (then) zero everywhere exactly when both are 0. Where a check fails, the core's pass
    runs again and raises its own error."""

    def objective(pred: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _compute_loss(loss_function, pred, labels, stats), None

    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        with torch.autocast(device_type=xg.device.type, enabled=False):  # as the core: no outer autocast
            pred = _prediction(network(_as_network_input(network, xg)))
        loss, _ = objective(pred)
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss, xg)
            low, high = torch.aminmax(grad)
            # in a dtype that holds both exactly (float32 could flush a tiny float64 gradient to zero)
            dtype = torch.promote_types(loss.dtype, grad.dtype)
            value, low_value, high_value = torch.stack(
                [loss.detach().to(dtype), low.to(dtype), high.to(dtype)]
            ).tolist()
            if math.isfinite(value) and math.isfinite(low_value) and math.isfinite(high_value):
                return grad.detach(), loss.detach(), low_value == 0 and high_value == 0
    # a loss with no graph, or a NaN/Inf loss or gradient: the core's pass raises the error it names
    result = objective_gradient(network, x, objective, False)
    return result.gradient, result.loss, result.zero


def _single_step_attack(
    network: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: AttackSpec,
    loss_function: LossFunction,
    epsilon: float,
) -> AttackResult | None:
    """:func:`~monai_adv.attacks.run_attack` for one signed step from the clean images with the default step and
    projection (FGSM, Inverse FGSM): the same checks, errors, warnings and result, with fewer passes over the batch.

    What it leaves out of the hot path, and why that is equivalent:

    - NaN/Inf in images and labels: read from their ``aminmax`` (which propagates NaN) in the one read of the
      range check, instead of separate ``isfinite(...).all()`` passes; the epsilon, a Python number here, is checked
      on the host.
    - the projection of the clean images onto their own ball before the step: a no-op when they lie within the
      bounds (known from that read), so it runs only where the range check's tolerance let values outside them.
    - the copy of the result that ``run_attack`` keeps as the "best" point (a single step has only one), and the
      temporaries of the projection after the step (done in place on the fresh result; ``clamp`` equals
      ``maximum(minimum(x, high), low)`` for ``low <= high``).
    - the gradient checks: see :func:`_single_step_gradient`.

    Returns:
        The result, or None where a check of the inputs fails: ``run_attack`` then runs and raises its own error.
    """
    eps = torch.full((images.shape[0],), float(epsilon), dtype=torch.float64, device=images.device)
    _validate_types_and_shapes(images, labels, eps, spec.num_steps, spec.step_size)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        return None
    images, labels = images.detach(), labels.detach()
    check_labels = labels.dtype != torch.bool and labels.numel() > 0
    parts = [p.to(torch.float32) for p in torch.aminmax(images)]  # float32, as run_attack's statistics
    values = torch.stack(parts)
    if check_labels:
        values = torch.cat([values, _label_summary(labels).to(images.device)])
    flags = values.tolist()  # the one synchronisation before the gradient pass
    if not all(math.isfinite(v) for v in flags[: 4 if check_labels else 2]):
        return None  # NaN/Inf images or labels (or float64 values beyond float32): run_attack names them
    image_low, image_high = flags[0], flags[1]
    label_stats = _LabelStats(flags[2], flags[3], bool(flags[4])) if check_labels else None
    bounds = _bounds(images, spec.clamp, spec.value_range, lambda: (image_low, image_high))
    if spec.clamp == "range":
        low_value, high_value = _value_range(spec.value_range)
        epsilon_max = float(np.float32(epsilon))  # run_attack reads it as float32
        if epsilon_max >= high_value - low_value:
            warnings.warn(
                f"epsilon {epsilon_max:g} is at least the whole value range ({low_value:g}, {high_value:g}): "
                "every pixel the gradient touches is pushed to a bound, which destroys the image. Give epsilon on "
                "the images' scale (e.g. 8/255 = 0.031 for images in [0, 1]).",
                stacklevel=3,  # the caller of the transform, as run_attack's
            )
    eps = eps.to(images.dtype)
    module = unwrap_network(network)
    with preserved_network_state(module, spec.network_mode):
        x = images
        within = spec.clamp != "range" or (
            images.dtype == torch.float32  # the statistics are exact in float32 only
            and image_low >= float(np.float32(spec.value_range[0]))
            and image_high <= float(np.float32(spec.value_range[1]))
        )
        if not within:
            x = project_and_clamp(images, images, eps, bounds)
        if spec.amp:
            result = objective_gradient(
                module, x, lambda pred: (_compute_loss(loss_function, pred, labels, label_stats), None), True
            )
            gradient, loss, zero = result.gradient, result.loss, result.zero
        else:
            gradient, loss, zero = _single_step_gradient(module, x, labels, loss_function, label_stats)
        if zero and spec.on_zero_gradient != "ignore":
            if spec.on_zero_gradient == "raise":
                raise ZeroInputGradientError(_ATTACK_ZERO_GRADIENT_MESSAGE)
            warnings.warn(_ATTACK_ZERO_GRADIENT_MESSAGE, stacklevel=2)  # the transform's call, as run_attack's
        out = signed_gradient_step(x, gradient, eps, spec.direction)  # a fresh tensor: the projection is in place
        radius = _per_sample(eps, out.ndim)
        out.sub_(images).clamp_(-radius, radius).add_(images)
        if bounds is not None:
            out.clamp_(bounds[0], bounds[1])
    return AttackResult(images=out.detach(), epsilon=eps, loss_before=loss)


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
        self._single_step_for: tuple[AttackSpec, bool] | None = None  # (spec, whether it takes the single step)

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
            result = None
            if self._takes_single_step() and self.loss_function is not None:
                result = _single_step_attack(
                    self.network, images, labels, self.spec, self.loss_function, float(self._epsilon)
                )
            if result is None:  # every other attack, and inputs that fail a check (run_attack raises the error)
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

    def _takes_single_step(self) -> bool:
        """Whether a call takes :func:`_single_step_attack`: one signed step of the given loss with the default
        step and projection, and no loss after. Worked out once per spec (the options are fixed in it)."""
        spec = self.spec
        cached = getattr(self, "_single_step_for", None)  # None also on a transform unpickled from before
        if cached is None or cached[0] is not spec:
            plain = spec.single_step and spec.project and spec.step_size is None and spec.relative_step is None
            self._single_step_for = (spec, plain)
        return self._single_step_for[1] and not self.return_loss_after

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
