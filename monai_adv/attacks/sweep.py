"""One gradient, many epsilons: FGSM / Inverse FGSM at several perturbation sizes for the cost of one backward.

For a single signed-gradient step the direction ``sign(grad_x L)`` does not depend on epsilon (and
Inverse FGSM only flips it), so a robustness curve needs one input-gradient pass per batch, not one
per epsilon and method. The functions here reuse the core's public pieces
(:func:`~monai_adv.attacks.gradient_sign.input_gradient`,
:func:`~monai_adv.attacks.gradient_sign.signed_gradient_step`,
:func:`~monai_adv.attacks.gradient_sign.project_and_clamp`,
:func:`~monai_adv.attacks.gradient_sign.clamp_bounds`) and give the same images as calling
:func:`~monai_adv.attacks.gradient_sign.gradient_sign_attack` once per epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from monai_adv.attacks.gradient_sign import (
    ClampMode,
    Direction,
    LossFunction,
    clamp_bounds,
    input_gradient,
    project_and_clamp,
    signed_gradient_step,
)
from monai_adv.attacks.network_state import NetworkMode, preserved_network_state, unwrap_network

__all__ = ["check_epsilons", "gradient_sign_sweep", "sweep_from_gradient"]


def check_epsilons(epsilons: Sequence[float]) -> list[float]:
    """The epsilons as floats, checked.

    Raises:
        ValueError: when the list is empty or holds a negative, NaN or infinite value.
    """
    values = [float(e) for e in epsilons]
    if not values:
        raise ValueError("epsilons must hold at least one value.")
    bad = [e for e in values if not math.isfinite(e) or e < 0]
    if bad:
        raise ValueError(f"epsilons must be finite and non-negative, got {bad} in {values}.")
    return values


def sweep_from_gradient(
    images: torch.Tensor,
    gradient: torch.Tensor,
    epsilons: Sequence[float],
    direction: Direction = "ascend",
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Single-step perturbations of ``images`` along ``sign(gradient)``, one per epsilon.

    Args:
        images: the clean batch ``(B, C, *spatial)``.
        gradient: the loss gradient with respect to ``images`` (same shape).
        epsilons: perturbation sizes (L-infinity).
        direction: ``"ascend"`` (FGSM) or ``"descend"`` (Inverse FGSM).
        bounds: value bounds from :func:`~monai_adv.attacks.gradient_sign.clamp_bounds`, or None.

    Returns:
        One detached batch per epsilon, in the order given.

    Raises:
        ValueError: for a bad epsilon or direction, or a gradient whose shape differs from the images'.
    """
    values = check_epsilons(epsilons)
    if gradient.shape != images.shape:
        raise ValueError(f"gradient shape {tuple(gradient.shape)} differs from image shape {tuple(images.shape)}.")
    images = images.detach()
    out = []
    for value in values:
        # The same per-sample epsilon tensor as gradient_sign_attack builds, so the results match bit for bit.
        eps = torch.full((images.shape[0],), value, dtype=torch.float64, device=images.device).to(images.dtype)
        stepped = signed_gradient_step(images, gradient, eps, direction)
        out.append(project_and_clamp(stepped, images, eps, bounds).detach())
    return out


def gradient_sign_sweep(
    network: nn.Module,
    loss_function: LossFunction,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilons: Sequence[float],
    directions: Sequence[Direction] = ("ascend",),
    clamp: ClampMode = "range",
    value_range: Sequence[float] = (0.0, 1.0),
    network_mode: NetworkMode = "eval",
    amp: bool = False,
) -> dict[Direction, list[torch.Tensor]]:
    """FGSM and/or Inverse FGSM at every epsilon from one input-gradient pass.

    Equal to ``gradient_sign_attack(network, loss_function, images, labels, eps, direction, clamp=clamp,
    value_range=value_range, network_mode=network_mode, amp=amp).images`` for each ``eps`` and direction.

    Args:
        network: the segmentation network (its mode and gradient flags are restored afterwards).
        loss_function: ``loss_function(pred, labels)``.
        images: ``(B, C, *spatial)`` floating-point batch on the network's device.
        labels: the matching labels.
        epsilons: perturbation sizes.
        directions: any of ``"ascend"`` (FGSM) and ``"descend"`` (Inverse FGSM).
        clamp: ``"range"``, ``"image"`` or ``"none"`` (see :func:`~monai_adv.attacks.gradient_sign.clamp_bounds`).
        value_range: bounds for ``clamp="range"``.
        network_mode: ``"eval"``, ``"train"`` or ``"unchanged"`` while taking the gradient.
        amp: forward pass under ``torch.autocast``.

    Returns:
        ``{direction: [batch per epsilon]}``.

    Raises:
        ValueError: for bad epsilons or directions, images outside ``value_range``, or labels the loss refuses.
    """
    check_epsilons(epsilons)
    unknown = [d for d in directions if d not in ("ascend", "descend")]
    if unknown or not directions:
        raise ValueError(f"directions must be a non-empty list of 'ascend'/'descend', got {list(directions)}.")
    images = images.detach()
    bounds = clamp_bounds(images, clamp, value_range)
    module = unwrap_network(network)
    with preserved_network_state(module, network_mode):
        gradient, _ = input_gradient(module, loss_function, images, labels.detach(), amp=amp)
    return {d: sweep_from_gradient(images, gradient, epsilons, d, bounds) for d in directions}
