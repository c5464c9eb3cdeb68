"""Signed-gradient perturbations: FGSM, Inverse FGSM and their iterative (projected) forms.

Everything here works on batched torch tensors ``(B, C, *spatial)`` (2D, 3D or any other
number of spatial dimensions) and knows nothing of MONAI or Ignite. The MONAI transforms,
the Ignite handler and the evaluation code are thin shells over :func:`gradient_sign_attack`.

The pieces are kept separate so that a training step that already has the input gradient
from its own backward pass can build the adversarial copy with :func:`signed_gradient_step`
and :func:`project_and_clamp` alone, without a second gradient pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from monai_adv.attacks.network_state import NetworkMode, preserved_network_state, unwrap_network

__all__ = [
    "AttackResult",
    "ClampMode",
    "Direction",
    "LossFunction",
    "ZeroGradientAction",
    "ZeroInputGradientError",
    "clamp_bounds",
    "gradient_sign_attack",
    "input_gradient",
    "project_and_clamp",
    "signed_gradient_step",
]

Direction = Literal["ascend", "descend"]
ClampMode = Literal["range", "image", "none"]
LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
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


@dataclass
class AttackResult:
    """What :func:`gradient_sign_attack` returns.

    Attributes:
        images: the perturbed batch, detached, same shape, dtype and device as the input.
        epsilon: the per-sample perturbation bound actually used, shape ``(B,)``.
        loss_before: mean loss on the clean batch (detached 0-dim tensor).
        loss_after: mean loss on the perturbed batch, or None unless ``return_loss_after``.
    """

    images: torch.Tensor
    epsilon: torch.Tensor
    loss_before: torch.Tensor
    loss_after: torch.Tensor | None = None


def _per_sample(value: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a ``(B,)`` tensor so that it broadcasts over ``(B, C, *spatial)``."""
    return value.reshape(-1, *([1] * (ndim - 1)))


def _describe_label(labels: torch.Tensor) -> str:
    text = f"label of shape {tuple(labels.shape)} and dtype {labels.dtype}"
    if labels.numel() > 0:
        text += f" with values in [{labels.min().item():g}, {labels.max().item():g}]"
    return text


def _check_labels_fit_prediction(pred: torch.Tensor, labels: torch.Tensor) -> None:
    """Catch the label mistakes that segmentation losses would otherwise accept silently.

    Class-index labels (one channel, or no channel) must hold integers ``0..C-1`` for a
    ``C``-channel prediction (``C >= 2``): a mask stored as {0, 255} is the common mistake, and
    ``to_onehot_y`` would cast it without complaint. One-hot or sigmoid-head labels must lie in [0, 1].
    """
    if labels.dtype != torch.bool and labels.numel() > 0:
        num_classes = pred.shape[1]
        index_labels = labels.ndim == pred.ndim - 1 or (labels.shape[1] == 1 and num_classes > 1)
        low, high = labels.min(), labels.max()
        if index_labels:
            limit = num_classes - 1
            non_integer = labels.is_floating_point() and bool((labels != labels.round()).any())
            if low < 0 or high > limit or non_integer:
                raise ValueError(
                    f"labels must be class indices 0..{limit} for a prediction with {num_classes} channels; got "
                    f"{_describe_label(labels)}. Binarise masks (e.g. AsDiscrete(threshold=0.5)) before the attack."
                )
        elif low < 0 or high > 1:
            raise ValueError(
                f"labels with {labels.shape[1]} channel(s) for a prediction with {num_classes} channel(s) must be "
                f"one-hot or binary with values in [0, 1]; got {_describe_label(labels)}."
            )


def _compute_loss(loss_function: LossFunction, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    _check_labels_fit_prediction(pred, labels)
    try:
        loss = loss_function(pred, labels)
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as err:
        name = getattr(loss_function, "__name__", type(loss_function).__name__)
        raise ValueError(
            f"loss_function {name} failed on a prediction of shape {tuple(pred.shape)} and a "
            f"{_describe_label(labels)}: {err}"
        ) from err
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
        ValueError: when the loss function fails on these labels, or the loss does not depend on
            the input at all.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        with torch.autocast(device_type=x.device.type, enabled=amp):
            pred = network(_as_network_input(network, x))
        if isinstance(pred, (tuple, list)):
            pred = pred[0]
        loss = _compute_loss(loss_function, pred.float() if amp else pred, labels)
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not depend on the input images (no autograd graph): check that the network "
                "and loss_function are differentiable and that the network is not frozen under torch.no_grad."
            )
        if not amp:
            (grad,) = torch.autograd.grad(loss, x)
            return grad.detach(), loss.detach()
        # Under float16 autocast, small input gradients underflow to zero and lose their sign.
        # The sign does not change with a positive scale, so scale the loss as GradScaler does,
        # and fall back to no scaling if that overflows.
        (grad,) = torch.autograd.grad(loss * _AMP_LOSS_SCALE, x, retain_graph=True)
        if not bool(torch.isfinite(grad).all()):
            (grad,) = torch.autograd.grad(loss, x)
    return grad.detach(), loss.detach()


def signed_gradient_step(
    images: torch.Tensor, gradient: torch.Tensor, step_size: torch.Tensor | float, direction: Direction = "ascend"
) -> torch.Tensor:
    """One signed-gradient step: ``images + s * step_size * sign(gradient)``, ``s = +1`` (ascend) or ``-1``.

    ``"ascend"`` is FGSM (raises the loss), ``"descend"`` is Inverse FGSM (lowers it).
    ``step_size`` is a number or a per-sample tensor of shape ``(B,)``.

    Raises:
        ValueError: when ``direction`` is not ``"ascend"`` or ``"descend"``.
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 'ascend' (FGSM) or 'descend' (Inverse FGSM), got {direction!r}.")
    if isinstance(step_size, torch.Tensor):
        step_size = _per_sample(step_size.to(images), images.ndim)
    return images + _DIRECTIONS[direction] * step_size * gradient.sign()


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
    if clamp not in _CLAMP_MODES:
        raise ValueError(f"clamp must be one of {_CLAMP_MODES}, got {clamp!r}.")
    if clamp == "none":
        return None
    if clamp == "image":
        flat = images.detach().flatten(1)
        low, high = flat.min(dim=1).values, flat.max(dim=1).values
        return _per_sample(low, images.ndim), _per_sample(high, images.ndim)
    low_value, high_value = (float(v) for v in value_range)
    if not (math.isfinite(low_value) and math.isfinite(high_value) and low_value < high_value):
        raise ValueError(f"value_range must be finite (low, high) with low < high, got {tuple(value_range)}.")
    found_low, found_high = images.min().item(), images.max().item()
    tolerance = _RANGE_TOLERANCE * (high_value - low_value)
    if found_low < low_value - tolerance or found_high > high_value + tolerance:
        raise ValueError(
            f"images have values in [{found_low:g}, {found_high:g}], outside value_range "
            f"({low_value:g}, {high_value:g}); clamping would destroy them. Scale the images into the range, "
            "set value_range to the data's range, or use clamp='image' (each image's own min/max) or clamp='none'."
        )
    low = torch.tensor(low_value, dtype=images.dtype, device=images.device)
    high = torch.tensor(high_value, dtype=images.dtype, device=images.device)
    return low, high


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
        out = torch.maximum(torch.minimum(out, bounds[1]), bounds[0])
    return out


def _validate(
    images: torch.Tensor, labels: torch.Tensor, epsilon: torch.Tensor, num_steps: int, step_size: float | None
) -> None:
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"images and labels must be torch.Tensor, got {type(images).__name__} and {type(labels).__name__}."
        )
    if images.ndim < 3:
        raise ValueError(f"images must be a batch (B, C, *spatial), got shape {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise TypeError(
            f"images must be floating point, got dtype {images.dtype}: a perturbation of size epsilon would be "
            "rounded away. Convert first (e.g. EnsureType(dtype=torch.float32) and ScaleIntensity)."
        )
    if not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images)).sum())
        raise ValueError(f"images contain {bad} NaN or Inf value(s) (shape {tuple(images.shape)}).")
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
    if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
        raise ValueError(f"labels contain NaN or Inf values (shape {tuple(labels.shape)}).")
    if epsilon.shape != (images.shape[0],):
        raise ValueError(
            f"epsilon must be a number or one value per sample (shape ({images.shape[0]},)), "
            f"got shape {tuple(epsilon.shape)}."
        )
    if not bool(torch.isfinite(epsilon).all()) or bool((epsilon < 0).any()):
        raise ValueError(f"epsilon must be finite and non-negative, got {epsilon.tolist()}.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be a finite positive number or None, got {step_size!r}.")


def gradient_sign_attack(
    network: nn.Module,
    loss_function: LossFunction,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float | torch.Tensor,
    direction: Direction = "ascend",
    num_steps: int = 1,
    step_size: float | None = None,
    random_start: bool = False,
    clamp: ClampMode = "range",
    value_range: Sequence[float] = (0.0, 1.0),
    network_mode: NetworkMode = "eval",
    amp: bool = False,
    generator: torch.Generator | None = None,
    return_loss_after: bool = False,
    on_zero_gradient: Literal["raise", "warn", "ignore"] = "raise",
) -> AttackResult:
    """Perturb a batch along the sign of the loss gradient (FGSM / Inverse FGSM and iterative forms).

    With ``num_steps=1`` and no random start this is FGSM, ``x + eps * sign(grad_x L)``
    (``direction="ascend"``), or Inverse FGSM, ``x - eps * sign(grad_x L)`` (``"descend"``),
    as in Pervin et al., "Adversarial attack driven data augmentation for accurate and robust
    medical image segmentation". With ``num_steps > 1`` it is I-FGSM / PGD (or its inverse):
    each step moves by ``step_size`` and is projected back onto the ``epsilon`` ball and the
    value bounds.

    The network is left as it was (see :func:`preserved_network_state`); a
    ``DistributedDataParallel`` wrapper is bypassed so that no gradient synchronisation happens.

    Args:
        network: the segmentation network.
        loss_function: ``loss_function(pred, labels)``: any MONAI or torch loss.
        images: ``(B, C, *spatial)`` floating-point batch on the network's device.
        labels: ``(B, C_l, *spatial)`` or ``(B, *spatial)`` labels.
        epsilon: L-infinity bound: a number, or a ``(B,)`` tensor (one bound per sample).
        direction: ``"ascend"`` (FGSM, raise the loss) or ``"descend"`` (Inverse FGSM, lower it).
        num_steps: gradient steps; 1 is the fast single-step method.
        step_size: size of each step; default ``epsilon`` for one step, else ``2.5 * epsilon / num_steps``.
            A number is used for every sample.
        random_start: start from a uniform random point in the epsilon ball (PGD).
        clamp: ``"range"`` (``value_range``), ``"image"`` (each image's own min/max) or ``"none"``.
        value_range: bounds for ``clamp="range"``; images must already lie inside them.
        network_mode: ``"eval"`` (default), ``"train"`` or ``"unchanged"`` while attacking.
        amp: forward passes under ``torch.autocast``.
        generator: random generator for ``random_start`` (on the images' device).
        return_loss_after: also compute the loss on the result (one extra forward pass).
        on_zero_gradient: what to do when the input gradient is zero everywhere at the first
            step (e.g. softmax over one output channel): ``"raise"``, ``"warn"`` or ``"ignore"``.

    Returns:
        An :class:`AttackResult`.

    Raises:
        TypeError: non-tensor or non-floating-point images.
        ValueError: bad epsilon, step settings, shapes, NaN/Inf values, labels that do not fit
            the prediction or the loss, or images outside ``value_range``.
        ZeroInputGradientError: when the input gradient is identically zero and
            ``on_zero_gradient="raise"``.
    """
    batch_size = images.shape[0] if isinstance(images, torch.Tensor) and images.ndim > 0 else 0
    if isinstance(epsilon, torch.Tensor):
        eps = epsilon.detach().to(device=images.device, dtype=torch.float64).flatten()
        if eps.numel() == 1 and batch_size != 1:
            eps = eps.expand(batch_size)
    else:
        eps = torch.full((batch_size,), float(epsilon), dtype=torch.float64, device=getattr(images, "device", None))
    _validate(images, labels, eps, num_steps, step_size)
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 'ascend' (FGSM) or 'descend' (Inverse FGSM), got {direction!r}.")
    if on_zero_gradient not in _ZERO_GRADIENT_ACTIONS:
        raise ValueError(f"on_zero_gradient must be one of {_ZERO_GRADIENT_ACTIONS}, got {on_zero_gradient!r}.")

    images = images.detach()
    labels = labels.detach()
    bounds = clamp_bounds(images, clamp, value_range)
    eps = eps.to(images.dtype)
    step = eps if step_size is None and num_steps == 1 else (
        eps * (2.5 / num_steps) if step_size is None else torch.full_like(eps, step_size)
    )
    module = unwrap_network(network)

    with preserved_network_state(module, network_mode):
        adversarial = images
        if random_start:
            noise = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
            adversarial = project_and_clamp(images + (2 * noise - 1) * _per_sample(eps, images.ndim), images, eps, bounds)
        loss_before: torch.Tensor | None = None
        for index in range(num_steps):
            gradient, loss = input_gradient(module, loss_function, adversarial, labels, amp=amp)
            if index == 0:
                loss_before = loss
                if on_zero_gradient != "ignore" and not bool(gradient.any()):
                    message = (
                        "the gradient of the loss with respect to the input is zero everywhere, so the "
                        "perturbation would return the images unchanged. A common cause is softmax over a single "
                        "output channel (e.g. DiceCELoss(softmax=True) or CrossEntropy with out_channels=1): use "
                        "two or more output channels, or sigmoid=True for a one-channel head."
                    )
                    if on_zero_gradient == "raise":
                        raise ZeroInputGradientError(message)
                    warnings.warn(message, stacklevel=2)
            adversarial = signed_gradient_step(adversarial, gradient, step, direction)
            adversarial = project_and_clamp(adversarial, images, eps, bounds)
        if random_start and loss_before is not None:
            # The first gradient pass ran at the random start, not at the clean images.
            loss_before = _forward_loss(module, loss_function, images, labels, amp)
        loss_after = _forward_loss(module, loss_function, adversarial, labels, amp) if return_loss_after else None
    assert loss_before is not None
    return AttackResult(images=adversarial.detach(), epsilon=eps, loss_before=loss_before, loss_after=loss_after)


def _forward_loss(
    network: nn.Module, loss_function: LossFunction, images: torch.Tensor, labels: torch.Tensor, amp: bool
) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=amp):
        pred = network(_as_network_input(network, images))
    if isinstance(pred, (tuple, list)):
        pred = pred[0]
    with torch.no_grad():
        return _compute_loss(loss_function, pred.float() if amp else pred, labels).detach()
