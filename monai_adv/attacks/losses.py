"""Per-pixel attack losses for segmentation, and the per-image IoU that picks an attack's best iterate.

Every loss takes the network's logits ``(B, K, *spatial)`` and class-index labels ``(B, *spatial)`` and returns one
value per image ``(B,)``: the mean over pixels of a per-pixel term. They work for a softmax head (``K >= 2``
channels, binary or several classes) and for a one-channel sigmoid head, which is rewritten as the two-class
softmax ``[0, z]`` (``softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]``, exactly), and for any number of
spatial dimensions.

- ``ce``: cross-entropy.
- ``dice``: soft Dice loss over the foreground classes.
- ``segpgd``: SegPGD (Gu et al., ECCV 2022): cross-entropy weighted ``1 - λ`` on still-correct pixels and ``λ`` on
  already-wrong ones, ``λ = t / (2T)`` at step ``t`` of ``T``, so the attack first breaks the correct pixels.
- ``cospgd``: CosPGD (Agnihotri et al., ICML 2024): cross-entropy weighted by the cosine similarity between the
  softmax prediction and the one-hot label (detached), so pixels already fooled count less.
- ``js``, ``masked_ce``, ``balanced_ce``: the losses of SEA (Croce et al., ECCV 2024): the Jensen-Shannon
  divergence between the softmax prediction and the one-hot label; cross-entropy on the correctly classified
  pixels only; and that masked cross-entropy with each pixel weighted by one minus its class's share of the
  image's pixels (small structures count more).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from monai_adv.attacks.spec import ATTACK_LOSSES

__all__ = ["ATTACK_LOSSES", "as_class_index", "as_class_logits", "attack_loss", "channel_argmax", "per_image_iou"]

_DICE_SMOOTH = 1e-5


def as_class_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits of a softmax over at least two classes: a one-channel sigmoid head ``z`` becomes ``[0, z]``."""
    if logits.shape[1] == 1:
        return torch.cat([torch.zeros_like(logits), logits], dim=1)
    return logits


def channel_argmax(values: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """``values.argmax(dim=1)`` (the first maximum on ties), computed as ``values.max(dim=1).indices``.

    On a CPU, torch's ``argmax`` over the channel dimension of a batch is tens of times slower than ``max``'s
    indices (13 ms against 0.2 ms for 16x2x64x64, 60 ms against 1.5 ms for 2x3x48x64x48; torch 2.13, 2 cores),
    and the robustness evaluation takes it after every attack step.
    """
    return values.max(dim=1, keepdim=keepdim).indices


def as_class_index(labels: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Class indices ``(B, *spatial)`` from labels ``(B, 1, *spatial)``, ``(B, *spatial)`` or one-hot ``(B, K, ...)``.

    Args:
        labels: the labels.
        num_channels: the prediction's channels ``K`` (1 for a sigmoid head).
    """
    if labels.ndim >= 3 and labels.shape[1] == num_channels and num_channels > 1:  # one-hot
        return channel_argmax(labels)
    if labels.ndim >= 3 and labels.shape[1] == 1:
        labels = labels[:, 0]
    return (labels.round() if labels.is_floating_point() else labels).long()


def _mean_per_image(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], -1).mean(dim=1)


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction="none")


def _correct(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (channel_argmax(logits.detach()) == target).to(logits.dtype)


def _one_hot(target: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(target, num_classes).movedim(-1, 1).to(dtype)


def _loss_ce(logits, target, step, num_steps):
    return _mean_per_image(_ce(logits, target))


def _loss_dice(logits, target, step, num_steps):
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = _one_hot(target, logits.shape[1], probs.dtype)[:, 1:]
    dims = tuple(range(2, probs.ndim))
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    return (1 - (2 * intersection + _DICE_SMOOTH) / (denominator + _DICE_SMOOTH)).mean(dim=1)


def _loss_segpgd(logits, target, step, num_steps):
    weight_wrong = step / (2 * num_steps)
    correct = _correct(logits, target)
    weight = (1 - weight_wrong) * correct + weight_wrong * (1 - correct)
    return _mean_per_image(weight * _ce(logits, target))


def _loss_cospgd(logits, target, step, num_steps):
    probs = torch.softmax(logits, dim=1)
    # cos(p, onehot(y)) = p_y / |p|: the same value as F.cosine_similarity, which on a CPU takes 100x longer over
    # the channel dimension (13 ms against 0.1 ms for 16x2x64x64); |p| >= 1/sqrt(K), so no epsilon is needed
    cosine = probs.gather(1, target.unsqueeze(1)).squeeze(1) * torch.rsqrt(probs.square().sum(dim=1))
    return _mean_per_image(cosine.detach() * _ce(logits, target))


def _loss_js(logits, target, step, num_steps):
    # JS(p, onehot(y)) depends on p_y alone: ((1 - p_y) ln 2 + p_y ln(2 p_y / (1 + p_y)) + ln(2 / (1 + p_y))) / 2,
    # written with log-softmax so that saturated pixels give no 0 * log(0) in the gradient
    log_p = torch.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    p = log_p.exp()
    log2 = math.log(2.0)
    divergence = (1 - p) * log2 + p * (log2 + log_p - torch.log1p(p)) + (log2 - torch.log1p(p))
    return _mean_per_image(divergence / 2)


def _loss_masked_ce(logits, target, step, num_steps):
    return _mean_per_image(_correct(logits, target) * _ce(logits, target))


def _loss_balanced_ce(logits, target, step, num_steps):
    onehot = _one_hot(target, logits.shape[1], logits.dtype)
    dims = tuple(range(2, onehot.ndim))
    share = onehot.mean(dims, keepdim=True)  # (B, K, 1, ...): each class's share of the image
    weight = 1 - (onehot * share).sum(dim=1)  # one minus the share of the pixel's own class
    return _mean_per_image(weight * _correct(logits, target) * _ce(logits, target))


_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]] = {
    "ce": _loss_ce,
    "dice": _loss_dice,
    "segpgd": _loss_segpgd,
    "cospgd": _loss_cospgd,
    "js": _loss_js,
    "masked_ce": _loss_masked_ce,
    "balanced_ce": _loss_balanced_ce,
}
assert tuple(_LOSSES) == ATTACK_LOSSES


def attack_loss(
    name: str, logits: torch.Tensor, target: torch.Tensor, step: int = 0, num_steps: int = 1
) -> torch.Tensor:
    """One attack loss per image.

    Args:
        name: one of :data:`ATTACK_LOSSES`.
        logits: the prediction ``(B, K, *spatial)`` (``K = 1``: a sigmoid head).
        target: class indices ``(B, *spatial)`` (see :func:`as_class_index`).
        step: the attack's current step (0-based), for ``segpgd``.
        num_steps: the attack's number of steps, for ``segpgd``.

    Returns:
        ``(B,)``: the loss of each image (higher: a stronger attack).

    Raises:
        ValueError: for an unknown name, or labels outside ``0..K-1``.
    """
    if name not in _LOSSES:
        raise ValueError(f"unknown attack loss {name!r}: choose from {list(ATTACK_LOSSES)}.")
    logits = as_class_logits(logits.float())
    return _LOSSES[name](logits, target, step, num_steps)


def per_image_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean foreground IoU of each image's argmax prediction, as the bundle's metric counts it.

    A class absent from both the label and the prediction is left out of the mean; an image where every
    foreground class is absent from both scores 1.

    Args:
        logits: the prediction ``(B, K, *spatial)`` (``K = 1``: a sigmoid head, foreground where ``z > 0``).
        target: class indices ``(B, *spatial)``.

    Returns:
        ``(B,)`` IoU values in [0, 1].
    """
    logits = as_class_logits(logits.detach())
    num_classes = logits.shape[1]
    pred = _one_hot(channel_argmax(logits), num_classes, torch.float32)[:, 1:]
    label = _one_hot(target, num_classes, torch.float32)[:, 1:]
    dims = tuple(range(2, pred.ndim))
    intersection = (pred * label).sum(dims)
    union = pred.sum(dims) + label.sum(dims) - intersection
    present = union > 0
    iou = torch.where(present, intersection / union.clamp_min(1), torch.zeros_like(union))
    count = present.sum(dim=1)
    return torch.where(count > 0, iou.sum(dim=1) / count.clamp_min(1), torch.ones_like(count, dtype=iou.dtype))
