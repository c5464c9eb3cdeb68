"""Signed-gradient perturbations: FGSM, Inverse FGSM and their iterative (projected) forms.

Everything here works on batched torch tensors ``(B, C, *spatial)`` (2D, 3D or any other
number of spatial dimensions) and knows nothing of MONAI or Ignite. The shells over
:func:`gradient_sign_attack` add the rest: the MONAI transforms (:mod:`monai_adv.transforms`), the Ignite
training handler (:mod:`monai_adv.handlers`) and the robustness evaluation.

Host-device synchronisation is kept to one point before the first gradient pass (all value checks
on images, labels and epsilon together) and one per gradient pass (finite loss, finite and non-zero
gradient together), so that the checks cost little on a GPU.

The pieces are kept separate so that a training step that already has the input gradient
from its own backward pass can build the adversarial copy with :func:`signed_gradient_step`
and :func:`project_and_clamp` alone, without a second gradient pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from monai_adv.attacks.spec import check_value_range

__all__ = [
    "AttackResult",
    "ClampMode",
    "Direction",
    "LossFunction",
    "NonFiniteLossError",
    "ZeroGradientAction",
    "ZeroInputGradientError",
    "clamp_bounds",
    "gradient_sign_attack",
    "input_gradient",
    "project_and_clamp",
    "signed_gradient_step",
]

#: ``"ascend"`` (FGSM: raise the loss) or ``"descend"`` (Inverse FGSM: lower it).
Direction = Literal["ascend", "descend"]
#: ``"range"`` (a fixed value range), ``"image"`` (each image's own min/max) or ``"none"``.
ClampMode = Literal["range", "image", "none"]
#: ``loss_function(pred, labels) -> loss``: any MONAI or torch loss; a non-scalar loss is averaged.
#: The one alias the transforms and handlers use too.
LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: What to do when the input gradient is zero everywhere: ``"raise"``, ``"warn"`` or ``"ignore"``.
ZeroGradientAction = Literal["raise", "warn", "ignore"]

_DIRECTIONS = {"ascend": 1.0, "descend": -1.0}
_CLAMP_MODES = ("range", "image", "none")
_ZERO_GRADIENT_ACTIONS = ("raise", "warn", "ignore")
# Values this far outside ``value_range`` are taken as a sign that the range is wrong for the data.
_RANGE_TOLERANCE = 1e-4
# Loss scale for input gradients under AMP (see input_gradient).
_AMP_LOSS_SCALE = 2.0**12


class ZeroInputGradientError(ValueError):
    """The loss gradient with respect to the input is zero everywhere, so no perturbation can be made."""


class NonFiniteLossError(ValueError):
    """The loss, or its gradient with respect to the input, is NaN or infinite (e.g. NaN network weights).

    ``sign(NaN)`` is 0, so without this error the attack would return the images unchanged.
    """


@dataclass
class AttackResult:
    """What :func:`gradient_sign_attack` returns.

    Attributes:
        images: the perturbed batch, detached, same shape, dtype and device as the input.
        epsilon: the per-sample perturbation bound actually used, shape ``(B,)``.
        loss_before: mean loss on the clean batch (detached 0-dim tensor).
        loss_after: mean loss on the perturbed batch, or None unless ``return_loss_after``.
        iou: each image's foreground IoU at the result ``(B,)``, when the attack measured it (a best iterate or
            restarts), else None.
    """

    images: torch.Tensor
    epsilon: torch.Tensor
    loss_before: torch.Tensor
    loss_after: torch.Tensor | None = None
    iou: torch.Tensor | None = None


def _direction_sign(direction: Direction) -> float:
    """``+1.0`` for ``"ascend"``, ``-1.0`` for ``"descend"``; the one place the direction is checked."""
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 'ascend' (FGSM) or 'descend' (Inverse FGSM), got {direction!r}.")
    return _DIRECTIONS[direction]


def _per_sample(value: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a ``(B,)`` tensor so that it broadcasts over ``(B, C, *spatial)``."""
    return value.reshape(-1, *([1] * (ndim - 1)))


@dataclass(frozen=True)
class _LabelStats:
    """Label values gathered in the one synchronisation before the attack (see :func:`_batch_statistics`)."""

    low: float
    high: float
    non_integer: bool


def _describe_label(labels: torch.Tensor, stats: _LabelStats | None) -> str:
    text = f"label of shape {tuple(labels.shape)} and dtype {labels.dtype}"
    if stats is not None:
        text += f" with values in [{stats.low:g}, {stats.high:g}]"
    return text


def _check_labels_fit_prediction(pred: torch.Tensor, labels: torch.Tensor, stats: _LabelStats | None) -> None:
    """Catch the label mistakes that segmentation losses would otherwise accept silently.

    Class-index labels (one channel, or no channel) must hold integers ``0..C-1`` for a
    ``C``-channel prediction (``C >= 2``): a mask stored as {0, 255} is the common mistake, and
    ``to_onehot_y`` would cast it without complaint. One-hot or sigmoid-head labels must lie in [0, 1].
    ``stats`` is None for boolean or empty labels, which need no check.
    """
    if stats is None:
        return
    num_classes = pred.shape[1]
    index_labels = labels.ndim == pred.ndim - 1 or (labels.shape[1] == 1 and num_classes > 1)
    if index_labels:
        limit = num_classes - 1
        if stats.low < 0 or stats.high > limit or stats.non_integer:
            raise ValueError(
                f"labels must be class indices 0..{limit} for a prediction with {num_classes} channels; got "
                f"{_describe_label(labels, stats)}. Binarise masks (e.g. AsDiscrete(threshold=0.5)) before the attack."
            )
    elif stats.low < 0 or stats.high > 1:
        raise ValueError(
            f"labels with {labels.shape[1]} channel(s) for a prediction with {num_classes} channel(s) must be "
            f"one-hot or binary with values in [0, 1]; got {_describe_label(labels, stats)}."
        )


def _label_stats(labels: torch.Tensor) -> _LabelStats | None:
    """Label statistics for the label check (one synchronisation); used where no batch statistics exist."""
    if labels.dtype == torch.bool or labels.numel() == 0:
        return None
    low, high, non_integer = _label_summary(labels).tolist()
    return _LabelStats(low, high, bool(non_integer))


def _label_summary(labels: torch.Tensor) -> torch.Tensor:
    """``[min, max, any non-integer]`` of non-empty, non-boolean labels, as a float32 tensor on their device."""
    values = labels.float() if not labels.is_floating_point() else labels
    non_integer = (values != values.round()).any() if labels.is_floating_point() else values.new_zeros(())
    low, high = torch.aminmax(values)  # one pass for both
    return torch.stack([low.float(), high.float(), non_integer.float()])


def _prediction(output: object) -> torch.Tensor:
    """The prediction tensor from a network output: the tensor itself, or the first element of a tuple or list
    (deep supervision, as MONAI's networks return it).

    Raises:
        TypeError: for any other output, e.g. a dict (as torchvision's segmentation models return).
    """
    pred = output[0] if isinstance(output, (tuple, list)) and len(output) > 0 else output
    if isinstance(pred, torch.Tensor):
        return pred
    if isinstance(output, dict):
        found = f"a dict with keys {sorted(map(str, output))}"
    elif isinstance(output, (tuple, list)):
        found = f"a {type(output).__name__} whose first element is {type(pred).__name__}"
    else:
        found = type(output).__name__
    raise TypeError(
        "the network must return the prediction as a tensor (B, K, *spatial), or a tuple/list whose first element "
        f"is that tensor (deep supervision); it returned {found}. Wrap the network in a module whose forward "
        "returns the prediction tensor (e.g. net(x)['out'])."
    )


def _compute_loss(
    loss_function: LossFunction, pred: torch.Tensor, labels: torch.Tensor, stats: _LabelStats | None
) -> torch.Tensor:
    _check_labels_fit_prediction(pred, labels, stats)
    try:
        loss = loss_function(pred, labels)
    except Exception as err:
        # Keep the error's type (an out-of-memory error must stay one); only say what the loss was given.
        if hasattr(err, "add_note"):
            name = getattr(loss_function, "__name__", type(loss_function).__name__)
            err.add_note(
                f"monai-adv: loss_function {name} failed on a prediction of shape {tuple(pred.shape)} and a "
                f"{_describe_label(labels, stats)}."
            )
        raise
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_function must return a torch.Tensor, got {type(loss).__name__}.")
    return loss.mean() if loss.ndim > 0 else loss


def _as_network_input(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Cast to the network's floating dtype (differentiably), so that e.g. float64 images keep their
    precision in the perturbation while a float32 network computes the gradient."""
    for param in network.parameters():
        if param.is_floating_point():
            return images if images.dtype == param.dtype else images.to(param.dtype)
    return images


def _non_finite_parameters(network: nn.Module) -> list[str]:
    """Names of the parameters holding NaN or Inf (for error messages only: it synchronises per parameter)."""
    return [name for name, param in network.named_parameters() if not bool(torch.isfinite(param).all())]


def _raise_non_finite(network: nn.Module, loss: torch.Tensor, loss_finite: bool) -> None:
    if loss_finite:
        raise NonFiniteLossError(
            f"the gradient of the loss with respect to the input contains NaN or Inf values although the loss is "
            f"finite ({loss.item():g}): the network or loss_function is not differentiable everywhere at these "
            "inputs (e.g. sqrt or log at 0)."
        )
    bad = _non_finite_parameters(network)
    cause = (
        f"{len(bad)} network parameter(s) hold NaN or Inf values ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})"
        ": training has diverged or the weights were loaded from a broken checkpoint"
        if bad
        else "the network's parameters are finite, so its output or the loss_function overflowed (e.g. float16 "
        "under AMP, or log of 0)"
    )
    raise NonFiniteLossError(
        f"the loss is {loss.item()} on this batch, so its gradient has no usable sign and the attack would return "
        f"the images unchanged; {cause}."
    )


#: ``objective(pred) -> (loss, per_image)``: the scalar loss to differentiate, and its value per image or None.
Objective = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass
class GradientPass:
    """What one gradient pass of :func:`objective_gradient` returns (all detached).

    Attributes:
        gradient: the input gradient, shape and dtype of the images.
        loss: the scalar loss.
        per_image: the loss per image ``(B,)``, or None when the objective gives only a scalar.
        logits: the prediction at the images (float).
        zero: whether the gradient is zero everywhere.
    """

    gradient: torch.Tensor
    loss: torch.Tensor
    per_image: torch.Tensor | None
    logits: torch.Tensor
    zero: bool


def _gradient_flags(loss: torch.Tensor, grad: torch.Tensor) -> tuple[bool, bool, bool]:
    """``(loss finite, gradient finite, gradient nonzero)`` in one pass over the gradient and one synchronisation:
    aminmax propagates NaN and keeps +-Inf, so finite extremes mean a finite gradient, and a zero gradient has
    both extremes 0."""
    low, high = torch.aminmax(grad)
    flags = torch.stack(
        [torch.isfinite(loss).all(), torch.isfinite(low) & torch.isfinite(high), (low != 0) | (high != 0)]
    )
    loss_finite, grad_finite, nonzero = flags.tolist()
    return bool(loss_finite), bool(grad_finite), bool(nonzero)


def objective_gradient(network: nn.Module, images: torch.Tensor, objective: Objective, amp: bool) -> GradientPass:
    """The input gradient of ``objective(network(images))`` with one host-device synchronisation for every check
    (two only when a scaled float16 gradient overflows).

    Raises:
        TypeError: for a network output that is not a tensor (or a tuple/list starting with one).
        ValueError: when the loss does not depend on the images.
        NonFiniteLossError: for a NaN or infinite loss or gradient.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = images.detach().requires_grad_(True)  # a new leaf on the same storage, which autograd only reads
        with torch.autocast(device_type=x.device.type, enabled=amp):
            pred = _prediction(network(_as_network_input(network, x)))
        loss, per_image = objective(pred.float() if amp else pred)
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not depend on the input images (no autograd graph): check that the network "
                "and loss_function are differentiable and that the network is not frozen under torch.no_grad."
            )
        # Under float16 autocast, small input gradients underflow to zero and lose their sign.
        # The sign does not change with a positive scale, so scale the loss as GradScaler does,
        # and fall back to no scaling if that overflows.
        scale = _AMP_LOSS_SCALE if amp else 1.0
        (grad,) = torch.autograd.grad(loss * scale if amp else loss, x, retain_graph=amp)
        loss_finite, grad_finite, nonzero = _gradient_flags(loss, grad)
        if amp and loss_finite and not grad_finite:
            (grad,) = torch.autograd.grad(loss, x)
            _, grad_finite, nonzero = _gradient_flags(loss, grad)
    if not (loss_finite and grad_finite):
        _raise_non_finite(network, loss.detach(), bool(loss_finite))
    return GradientPass(
        grad.detach(),
        loss.detach(),
        None if per_image is None else per_image.detach(),
        pred.detach().float(),
        not nonzero,
    )


def _input_gradient(
    network: nn.Module,
    loss_function: LossFunction,
    images: torch.Tensor,
    labels: torch.Tensor,
    amp: bool,
    label_stats: _LabelStats | None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """:func:`input_gradient` plus whether the gradient is zero everywhere."""
    result = objective_gradient(
        network, images, lambda pred: (_compute_loss(loss_function, pred, labels, label_stats), None), amp
    )
    return result.gradient, result.loss, result.zero


def input_gradient(
    network: nn.Module,
    loss_function: LossFunction,
    images: torch.Tensor,
    labels: torch.Tensor,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of ``loss_function(network(images), labels)`` with respect to ``images``.

    Only the input gradient is taken (``torch.autograd.grad``): parameter ``.grad`` fields are
    never written and no graph outlives the call. The caller chooses the network's mode.

    Args:
        network: maps ``(B, C, *spatial)`` to predictions ``(B, K, *spatial)``; a tuple or list
            output (deep supervision) uses its first element.
        loss_function: ``loss_function(pred, labels)``, e.g. ``monai.losses.DiceCELoss``.
        images: the batch, floating point; cast to the network's dtype for the forward pass,
            the gradient comes back in the images' dtype.
        labels: the matching labels.
        amp: run the forward pass under ``torch.autocast`` for the images' device; the loss is
            computed in float32 and scaled for the backward pass so that float16 gradients keep
            their sign (the scale cannot change a sign).

    Returns:
        ``(gradient, loss)``: the gradient (same shape and dtype as ``images``) and the detached
        mean loss.

    Raises:
        TypeError: when the network returns neither a tensor nor a tuple/list starting with one.
        ValueError: when the loss function fails on these labels, or the loss does not depend on
            the input at all.
        NonFiniteLossError: when the loss or the gradient is NaN or infinite (e.g. NaN weights).
    """
    gradient, loss, _ = _input_gradient(network, loss_function, images, labels, amp, _label_stats(labels))
    return gradient, loss


def signed_gradient_step(
    images: torch.Tensor, gradient: torch.Tensor, step_size: torch.Tensor | float, direction: Direction = "ascend"
) -> torch.Tensor:
    """One signed-gradient step: ``images + s * step_size * sign(gradient)``, ``s = +1`` (ascend) or ``-1``.

    ``"ascend"`` is FGSM (raises the loss), ``"descend"`` is Inverse FGSM (lowers it).
    ``step_size`` is a number or a per-sample tensor of shape ``(B,)``.

    Raises:
        ValueError: when ``direction`` is not ``"ascend"`` or ``"descend"``.
    """
    sign = _direction_sign(direction)
    if isinstance(step_size, torch.Tensor):
        # one fused pass: images + (sign * step) * sign(gradient)
        return torch.addcmul(images, _per_sample(step_size.to(images) * sign, images.ndim), gradient.sign())
    return images + sign * step_size * gradient.sign()


def _bounds(
    images: torch.Tensor,
    clamp: ClampMode,
    value_range: Sequence[float],
    image_range: Callable[[], tuple[float, float]],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`clamp_bounds`, taking the batch's ``(min, max)`` from ``image_range`` only where it is needed."""
    if clamp not in _CLAMP_MODES:
        raise ValueError(f"clamp must be one of {_CLAMP_MODES}, got {clamp!r}.")
    if clamp == "none":
        return None
    if clamp == "image":
        flat = images.detach().flatten(1)
        low, high = flat.min(dim=1).values, flat.max(dim=1).values
        return _per_sample(low, images.ndim), _per_sample(high, images.ndim)
    low_value, high_value = check_value_range(value_range)
    found_low, found_high = image_range()
    tolerance = _RANGE_TOLERANCE * (high_value - low_value)
    if found_low < low_value - tolerance or found_high > high_value + tolerance:
        raise ValueError(
            f"images have values in [{found_low:g}, {found_high:g}], outside value_range "
            f"({low_value:g}, {high_value:g}); clamping would destroy them. Scale the images into the range, "
            "set value_range to the data's range, or use clamp='image' (each image's own min/max) or clamp='none'."
        )
    # Filled on the device: torch.tensor(value, device=...) would be a host-to-device copy, which synchronises.
    low = torch.full((), low_value, dtype=images.dtype, device=images.device)
    high = torch.full((), high_value, dtype=images.dtype, device=images.device)
    return low, high


def clamp_bounds(
    images: torch.Tensor, clamp: ClampMode = "range", value_range: Sequence[float] = (0.0, 1.0)
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The value bounds an adversarial batch must stay within.

    Args:
        images: the clean batch ``(B, C, *spatial)``.
        clamp: ``"range"``: the fixed ``value_range``; ``"image"``: each image's own min and max
            (for Hounsfield units or z-scored inputs); ``"none"``: no bounds.
        value_range: ``(low, high)`` for ``clamp="range"``.

    Returns:
        ``(low, high)`` tensors that broadcast over ``images``, or None for ``"none"``.

    Raises:
        ValueError: for an unknown mode, a reversed range, or (``"range"``) images that lie outside it.
    """

    def image_range() -> tuple[float, float]:
        low, high = torch.aminmax(images.detach())
        return tuple(torch.stack([low, high]).tolist())  # type: ignore[return-value]

    return _bounds(images, clamp, value_range, image_range)


def project_and_clamp(
    adversarial: torch.Tensor,
    images: torch.Tensor,
    epsilon: torch.Tensor | float,
    bounds: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Project ``adversarial`` onto the L-infinity ball of radius ``epsilon`` around ``images``, then clamp.

    Args:
        adversarial: the perturbed batch.
        images: the clean batch.
        epsilon: a number or a per-sample tensor of shape ``(B,)``.
        bounds: ``(low, high)`` from :func:`clamp_bounds`, or None.
    """
    if isinstance(epsilon, torch.Tensor):
        epsilon = _per_sample(epsilon.to(images), images.ndim)
    delta = torch.clamp(adversarial - images, -epsilon, epsilon)  # type: ignore[arg-type]
    out = images + delta
    if bounds is not None:
        out = torch.clamp(out, bounds[0], bounds[1])
    return out


def _validate_types_and_shapes(
    images: torch.Tensor, labels: torch.Tensor, epsilon: torch.Tensor, num_steps: int, step_size: float | None
) -> None:
    """The checks that need no values from the device."""
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"images and labels must be torch.Tensor, got {type(images).__name__} and {type(labels).__name__}."
        )
    if images.ndim < 3:
        raise ValueError(f"images must be a batch (B, C, *spatial), got shape {tuple(images.shape)}.")
    if images.shape[0] == 0 or images.numel() == 0:
        raise ValueError(
            f"images is an empty batch (shape {tuple(images.shape)}): there is nothing to perturb. Skip the call "
            "when no sample is selected."
        )
    if not images.is_floating_point():
        raise TypeError(
            f"images must be floating point, got dtype {images.dtype}: a perturbation of size epsilon would be "
            "rounded away. Convert first (e.g. EnsureType(dtype=torch.float32) and ScaleIntensity)."
        )
    spatial = images.shape[2:]
    if labels.shape[0] != images.shape[0] or tuple(labels.shape[-len(spatial) :]) != tuple(spatial):
        raise ValueError(
            f"label shape {tuple(labels.shape)} does not match image shape {tuple(images.shape)}: expected batch "
            f"size {images.shape[0]} and spatial shape {tuple(spatial)}."
        )
    if labels.ndim not in (images.ndim, images.ndim - 1):
        raise ValueError(
            f"labels must be (B, C, *spatial) or (B, *spatial) for images of shape {tuple(images.shape)}, "
            f"got shape {tuple(labels.shape)}."
        )
    if epsilon.shape != (images.shape[0],):
        raise ValueError(
            f"epsilon must be a number or one value per sample (shape ({images.shape[0]},)), "
            f"got shape {tuple(epsilon.shape)}."
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be a finite positive number or None, got {step_size!r}.")


@dataclass(frozen=True)
class _BatchStats:
    image_low: float
    image_high: float
    epsilon_max: float
    labels: _LabelStats | None


def _batch_statistics(images: torch.Tensor, labels: torch.Tensor, epsilon: torch.Tensor) -> _BatchStats:
    """Check the values of images, labels and epsilon, and gather what later checks need, in one synchronisation.

    Raises:
        ValueError: NaN or Inf in images or labels; NaN, Inf or negative epsilon.
    """
    check_labels = labels.dtype != torch.bool and labels.numel() > 0
    # aminmax propagates NaN and keeps +-Inf: finite extremes mean finite images, without another pass
    image_low, image_high = torch.aminmax(images.detach())
    parts = [
        torch.isfinite(image_low) & torch.isfinite(image_high),
        torch.isfinite(labels).all() if labels.is_floating_point() else images.new_ones((), dtype=torch.bool),
        torch.isfinite(epsilon).all(),
        (epsilon >= 0).all(),
        image_low,
        image_high,
        epsilon.max(),
    ]
    values = torch.stack([p.to(device=images.device, dtype=torch.float32) for p in parts])
    if check_labels:
        values = torch.cat([values, _label_summary(labels).to(images.device)])
    flags = values.tolist()
    images_finite, labels_finite, epsilon_finite, epsilon_non_negative = (bool(f) for f in flags[:4])
    if not images_finite:
        bad = int((~torch.isfinite(images)).sum())
        raise ValueError(f"images contain {bad} NaN or Inf value(s) (shape {tuple(images.shape)}).")
    if not labels_finite:
        raise ValueError(f"labels contain NaN or Inf values (shape {tuple(labels.shape)}).")
    if not (epsilon_finite and epsilon_non_negative):
        raise ValueError(f"epsilon must be finite and non-negative, got {epsilon.tolist()}.")
    label_stats = _LabelStats(flags[7], flags[8], bool(flags[9])) if check_labels else None
    return _BatchStats(flags[4], flags[5], flags[6], label_stats)


def gradient_sign_attack(
    network: nn.Module,
    loss_function: LossFunction | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float | torch.Tensor,
    direction: Direction = "ascend",
    *,
    spec: Any = None,
    generator: torch.Generator | None = None,
    return_loss_after: bool = False,
    **options: Any,
) -> AttackResult:
    """Perturb a batch along the sign of the loss gradient (FGSM / Inverse FGSM and iterative forms).

    With one step and no random start this is FGSM, ``x + eps * sign(grad_x L)`` (``direction="ascend"``), or
    Inverse FGSM, ``x - eps * sign(grad_x L)`` (``"descend"``), as in Pervin et al., "Adversarial attack driven data
    augmentation for accurate and robust medical image segmentation". With ``num_steps > 1`` it is I-FGSM / PGD (or
    its inverse): each step moves by ``step_size`` and is projected back onto the ``epsilon`` ball and the value
    bounds. A shorthand for :func:`monai_adv.attacks.run_attack` with an
    :class:`~monai_adv.attacks.AttackSpec` built from ``options`` (or given as ``spec``).

    Args:
        network: the segmentation network. It must return the prediction tensor, or a tuple/list
            whose first element is the prediction (deep supervision); a dict is refused.
        loss_function: ``loss_function(pred, labels)``: any MONAI or torch loss (None with a spec ``loss``).
        images: ``(B, C, *spatial)`` floating-point batch on the network's device, ``B >= 1``.
        labels: ``(B, C_l, *spatial)`` or ``(B, *spatial)`` labels.
        epsilon: L-infinity bound: a number, or a ``(B,)`` tensor (one bound per sample). A bound
            at least as wide as ``value_range`` (``clamp="range"``) gives a warning: it lets every
            pixel jump to a bound, which is almost always an epsilon on the wrong scale.
        direction: ``"ascend"`` (FGSM, raise the loss) or ``"descend"`` (Inverse FGSM, lower it).
        spec: an :class:`~monai_adv.attacks.AttackSpec` (or a mapping of its options) that ``options`` refine.
        generator: random generator for ``random_start`` (on the images' device).
        return_loss_after: also compute the loss on the result (one extra forward pass).
        options: :class:`~monai_adv.attacks.AttackSpec` fields: ``num_steps``, ``step_size``, ``random_start``,
            ``clamp``, ``value_range``, ``network_mode``, ``amp``, ``on_zero_gradient`` and the rest.

    Returns:
        An :class:`AttackResult`.

    Raises:
        TypeError: non-tensor or non-floating-point images; a network output that is not a tensor
            or a tuple/list starting with one; an unknown option.
        ValueError: an empty batch, bad epsilon, step settings, shapes, NaN/Inf values, labels that
            do not fit the prediction, or images outside ``value_range``.
        NonFiniteLossError: when the loss or its input gradient is NaN or Inf at any step (e.g. NaN
            weights after a diverged training), instead of silently returning the images unchanged.
        ZeroInputGradientError: when the input gradient is identically zero and
            ``on_zero_gradient="raise"``.
    """
    from monai_adv.attacks.attack import run_attack
    from monai_adv.attacks.spec import AttackSpec

    # epsilon is this call's (checked by run_attack), so the spec's own stays as it is
    attack = AttackSpec.create(spec, direction=direction, **options)
    return run_attack(
        network, images, labels, attack, loss_function, epsilon=epsilon, generator=generator,
        return_loss_after=return_loss_after,
    )  # fmt: skip
