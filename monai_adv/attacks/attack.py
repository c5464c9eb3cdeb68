"""The one attack loop: signed-gradient steps or Auto-PGD, a shrinking radius, restarts and a best iterate.

:func:`run_attack` runs every attack the project makes, from the paper's FGSM and Inverse FGSM to SegPGD, CosPGD
and SEA's APGD runs, from one :class:`~monai_adv.attacks.spec.AttackSpec`. The transforms, the training handler
and the robustness evaluator are shells over it.

- ``schedule="sign"``: ``x <- P(x + s * step * sign(grad))`` (FGSM for one step, I-FGSM / PGD for more);
  ``P`` projects onto the L-infinity ball of the current radius around the clean images and clamps to the bounds.
- ``schedule="apgd"``: Auto-PGD (Croce & Hein, ICML 2020) for the L-infinity ball: step ``2 * radius``, momentum
  0.75, and at checkpoints (22%, then shrinking gaps of the steps) the step is halved, and the point reset to the
  best one, for each image whose loss rose in fewer than 75% of the steps since the last checkpoint or did not
  improve since then.
- ``radii``: stages of radius ``r * epsilon``; each stage starts from the previous one's point projected onto its
  smaller ball (SEA, Croce et al. ECCV 2024).
- ``restarts``: the attack again from a random start; per image the lowest-IoU result is kept.
- ``keep_best``: per image, the iterate of the last stage with the lowest IoU (the points of the last stage
  all lie inside the epsilon ball).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from monai_adv.attacks.gradient_sign import (
    AttackResult,
    GradientPass,
    LossFunction,
    ZeroInputGradientError,
    _as_network_input,
    _batch_statistics,
    _bounds,
    _compute_loss,
    _per_sample,
    _prediction,
    _validate_types_and_shapes,
    objective_gradient,
    project_and_clamp,
    signed_gradient_step,
)
from monai_adv.attacks.losses import as_class_index, attack_loss, per_image_iou
from monai_adv.attacks.network_state import preserved_network_state, unwrap_network
from monai_adv.attacks.spec import AttackSpec, check_value_range

__all__ = ["apgd_checkpoints", "run_attack"]

_ZERO_GRADIENT_MESSAGE = (
    "the gradient of the loss with respect to the input is zero everywhere, so the perturbation would return the "
    "images unchanged. A common cause is softmax over a single output channel (e.g. DiceCELoss(softmax=True) or "
    "CrossEntropy with out_channels=1): use two or more output channels, or sigmoid=True for a one-channel head. "
    "A network that quantises its input or saturates its output also has a zero gradient (gradient masking): "
    "its robustness cannot be measured with gradients."
)
# APGD (Croce & Hein 2020): momentum, and the share of rising steps below which the step is halved.
_APGD_MOMENTUM = 0.75
_APGD_RHO = 0.75


def apgd_checkpoints(num_steps: int) -> list[int]:
    """The steps at which APGD checks its progress: ``ceil(p_j * N)`` for ``p_0 = 0``, ``p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, below ``N``."""
    points, previous, current = [], 0.0, 0.22
    while current < 1.0:
        step = math.ceil(current * num_steps - 1e-9)  # 0.57 * 100 is 57.000000001 in floating point
        if 0 < step < num_steps and step not in points:
            points.append(step)
        previous, current = current, current + max(current - previous - 0.03, 0.06)
    return points


def _stage_steps(num_steps: int, stages: int) -> list[int]:
    """Steps per radius stage: as equal as possible, the last stage taking the rest."""
    base = num_steps // stages
    return [base] * (stages - 1) + [num_steps - base * (stages - 1)]


class _Run:
    """The state of one :func:`run_attack` call shared by its stages (network, labels, bounds, objective)."""

    def __init__(self, network, loss_function, images, labels, spec, eps, bounds, label_stats) -> None:
        self.network, self.loss_function, self.spec = network, loss_function, spec
        self.images, self.labels, self.eps, self.bounds = images, labels, eps, bounds
        self.label_stats = label_stats
        self.sign = 1.0 if spec.direction == "ascend" else -1.0
        self.target: torch.Tensor | None = None  # class indices, from the first prediction's channels
        self.checked_zero = False
        self.passes = 0
        self.first_loss: torch.Tensor | None = None

    def target_for(self, logits: torch.Tensor) -> torch.Tensor:
        if self.target is None:
            self.target = as_class_index(self.labels, logits.shape[1])
        return self.target

    def objective(self, step: int, num_steps: int):
        def compute(pred: torch.Tensor):
            if self.spec.loss is None:
                return _compute_loss(self.loss_function, pred, self.labels, self.label_stats), None
            per_image = attack_loss(self.spec.loss, pred, self.target_for(pred), step, num_steps)
            return per_image.sum(), per_image

        return compute

    def gradient(self, x: torch.Tensor, step: int, num_steps: int) -> GradientPass:
        result = objective_gradient(self.network, x, self.objective(step, num_steps), self.spec.amp)
        self.passes += 1
        if not self.checked_zero:
            self.checked_zero = True
            self.first_loss = result.loss if result.per_image is None else result.per_image.mean()
            if result.zero and self.spec.on_zero_gradient != "ignore":
                if self.spec.on_zero_gradient == "raise":
                    raise ZeroInputGradientError(_ZERO_GRADIENT_MESSAGE)
                warnings.warn(_ZERO_GRADIENT_MESSAGE, stacklevel=4)
        return result

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=self.spec.amp):
            return _prediction(self.network(_as_network_input(self.network, x))).float()

    def iou(self, logits: torch.Tensor) -> torch.Tensor:
        return per_image_iou(logits, self.target_for(logits))

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.bounds is None else torch.clamp(x, self.bounds[0], self.bounds[1])

    def project(self, x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        if not self.spec.project:  # N-FGSM: only the value bounds
            return self.clamp(x)
        return project_and_clamp(x, self.images, radius, self.bounds)

    def random_start(self, radius: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # u * 2r - r with u ~ U[0, 1): the same draw as torch's uniform_(-r, r), so that a peer implementation
        # seeded alike starts at the same point
        noise = torch.rand(self.images.shape, generator=generator, device=self.images.device, dtype=self.images.dtype)
        r = _per_sample(radius * self.spec.start_radius, self.images.ndim)
        return self.project(self.images + (noise * (2 * r) - r), radius)


class _Best:
    """Each image's lowest-IoU point so far (only points inside the epsilon ball are offered)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images.clone()
        self.iou = torch.full((images.shape[0],), math.inf, device=images.device)

    def offer(self, x: torch.Tensor, iou: torch.Tensor) -> None:
        better = iou < self.iou
        self.iou = torch.where(better, iou, self.iou)
        self.images = torch.where(_per_sample(better, x.ndim), x, self.images)


def _sign_stage(run: _Run, x, radius, steps, first_step, total_steps, best, final):
    step = torch.full_like(radius, run.spec.step_size) if run.spec.step_size is not None else None
    if run.spec.relative_step is not None:
        step = run.eps * run.spec.relative_step  # of epsilon, not of this stage's radius
    # FGSM (one step of the whole radius from the clean images, no random start) ends in the ball by construction,
    # so only the value bounds apply: the projection would be a no-op costing two passes over the batch
    ends_in_ball = step is None and steps == 1 and total_steps == 1 and x is run.images
    if step is None:
        step = radius if steps == 1 and total_steps == 1 else radius * (2.5 / steps)
    for index in range(steps):
        result = run.gradient(x, first_step + index, total_steps)
        if final and best is not None:
            best.offer(x, run.iou(result.logits))
        stepped = signed_gradient_step(x, result.gradient, step, run.spec.direction)
        x = run.clamp(stepped) if ends_in_ball else run.project(stepped, radius)
    return x


def _apgd_stage(run: _Run, x, radius, steps, first_step, total_steps, best, final):
    """Auto-PGD over ``steps`` steps in the ball of ``radius``; returns the point of highest loss (APGD's output)."""
    ndim = x.ndim
    checkpoints = set(apgd_checkpoints(steps))
    step_size = 2.0 * radius.clone()
    result = run.gradient(x, first_step, total_steps)
    loss = run.sign * result.per_image
    if final and best is not None:
        best.offer(x, run.iou(result.logits))
    grad = result.gradient
    x_best, loss_best, grad_best = x.clone(), loss.clone(), grad.clone()
    loss_best_at_check = loss_best.clone()
    halved_at_check = torch.ones_like(loss, dtype=torch.bool)
    rises = torch.zeros_like(loss)
    since_check, x_previous = 0, x.clone()
    for k in range(steps):
        candidate = run.project(signed_gradient_step(x, grad, step_size, run.spec.direction), radius)
        if k > 0:
            momentum = _APGD_MOMENTUM
            candidate = run.project(x + momentum * (candidate - x) + (1 - momentum) * (x - x_previous), radius)
        x_previous, x = x, candidate
        if k == steps - 1:  # the last point needs its loss, not its gradient
            logits = run.logits(x)
            new_loss = run.sign * attack_loss(run.spec.loss, logits, run.target_for(logits), first_step + k + 1,
                                              total_steps)  # fmt: skip
            if final and best is not None:
                best.offer(x, run.iou(logits))
        else:
            result = run.gradient(x, first_step + k + 1, total_steps)
            new_loss = run.sign * result.per_image
            if final and best is not None:
                best.offer(x, run.iou(result.logits))
        rises += (new_loss > loss).to(rises.dtype)
        loss = new_loss
        improved = loss > loss_best
        x_best = torch.where(_per_sample(improved, ndim), x, x_best)
        loss_best = torch.where(improved, loss, loss_best)
        if k < steps - 1:
            grad = result.gradient
            grad_best = torch.where(_per_sample(improved, ndim), grad, grad_best)
        since_check += 1
        if (k + 1) in checkpoints:
            oscillating = rises < _APGD_RHO * since_check
            stalled = ~halved_at_check & (loss_best_at_check >= loss_best)
            halve = oscillating | stalled
            step_size = torch.where(halve, step_size / 2, step_size)
            x = torch.where(_per_sample(halve, ndim), x_best, x)
            grad = torch.where(_per_sample(halve, ndim), grad_best, grad)
            halved_at_check, loss_best_at_check = halve, loss_best.clone()
            rises.zero_()
            since_check = 0
    return x_best


def run_attack(
    network: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: AttackSpec,
    loss_function: LossFunction | None = None,
    epsilon: float | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_loss_after: bool = False,
) -> AttackResult:
    """Attack a batch as ``spec`` says.

    The network is left as it was (see :func:`~monai_adv.attacks.network_state.preserved_network_state`); a
    ``DistributedDataParallel`` wrapper is bypassed so that no gradient synchronisation happens.

    Args:
        network: the segmentation network; it returns the prediction ``(B, K, *spatial)`` (a tuple/list: its first
            element). ``K = 1`` is a sigmoid head, ``K >= 2`` a softmax over classes.
        images: ``(B, C, *spatial)`` floating-point batch on the network's device.
        labels: ``(B, 1, *spatial)`` or ``(B, *spatial)`` class indices, or one-hot ``(B, K, *spatial)``.
        spec: the attack.
        loss_function: ``loss_function(pred, labels)`` for a spec without ``loss`` (e.g. the training loss).
        epsilon: the radius, a number or one per image ``(B,)``; default ``spec.epsilon`` (which must then be a number).
        generator: random generator of the random starts (on the images' device).
        return_loss_after: also compute the loss on the result (one more forward pass).

    Returns:
        An :class:`~monai_adv.attacks.gradient_sign.AttackResult`; ``iou`` holds each image's IoU at the result
        when it was computed (``keep_best`` or ``restarts > 1``).

    Raises:
        TypeError: non-tensor or integer images; a network output that is not a tensor.
        ValueError: an empty batch, mismatched shapes, NaN/Inf values, a bad epsilon, labels that do not fit the
            prediction, images outside ``value_range``, a spec without ``loss`` and no ``loss_function``.
        NonFiniteLossError: a NaN or infinite loss or input gradient at any step.
        ZeroInputGradientError: the first input gradient is zero everywhere and ``on_zero_gradient="raise"``.
    """
    if not isinstance(spec, AttackSpec):
        raise TypeError(f"spec must be an AttackSpec, got {type(spec).__name__}.")
    if spec.loss is None and loss_function is None:
        raise ValueError("the attack spec has no loss: give loss_function, or a spec with loss='ce' (or another).")
    if epsilon is None:
        if isinstance(spec.epsilon, tuple):
            raise ValueError(f"spec.epsilon is the range {spec.epsilon}: give this call's epsilon.")
        epsilon = spec.epsilon
    batch_size = images.shape[0] if isinstance(images, torch.Tensor) and images.ndim > 0 else 0
    device = getattr(images, "device", None)
    if isinstance(epsilon, torch.Tensor):
        eps = epsilon.detach().to(device=device, dtype=torch.float64).flatten()
        if eps.numel() == 1 and batch_size != 1:
            eps = eps.expand(batch_size)
    else:
        eps = torch.full((batch_size,), float(epsilon), dtype=torch.float64, device=device)
    _validate_types_and_shapes(images, labels, eps, spec.num_steps, spec.step_size)
    images, labels = images.detach(), labels.detach()
    stats = _batch_statistics(images, labels, eps)
    bounds = _bounds(images, spec.clamp, spec.value_range, lambda: (stats.image_low, stats.image_high))
    if spec.clamp == "range":
        low_value, high_value = check_value_range(spec.value_range)
        if stats.epsilon_max >= high_value - low_value:
            warnings.warn(
                f"epsilon {stats.epsilon_max:g} is at least the whole value range ({low_value:g}, {high_value:g}): "
                "every pixel the gradient touches is pushed to a bound, which destroys the image. Give epsilon on "
                "the images' scale (e.g. 8/255 = 0.031 for images in [0, 1]).",
                stacklevel=3,
            )
    eps = eps.to(images.dtype)
    module = unwrap_network(network)
    run = _Run(module, loss_function, images, labels, spec, eps, bounds, stats.labels)
    stage = _apgd_stage if spec.schedule == "apgd" else _sign_stage
    stages = _stage_steps(spec.num_steps, len(spec.radii))
    need_iou = spec.keep_best or spec.restarts > 1

    with preserved_network_state(module, spec.network_mode):
        chosen: _Best | None = None
        for restart in range(spec.restarts):
            first_radius = eps * spec.radii[0]
            x = run.random_start(first_radius, generator) if (spec.random_start or restart > 0) else images
            best = _Best(images) if spec.keep_best else None
            done = 0
            for multiplier, steps in zip(spec.radii, stages):
                radius = eps * multiplier
                # the clean images are inside every ball and within their bounds (checked above): no projection
                x = x if x is images else run.project(x, radius)
                # only points inside the epsilon ball (the radius-1 stages) may be kept as the best
                x = stage(run, x, radius, steps, done, spec.num_steps, best, multiplier == 1.0)
                done += steps
            if need_iou:
                iou_last = run.iou(run.logits(x))
                if best is not None:
                    best.offer(x, iou_last)
                    x, iou_last = best.images, best.iou
                if chosen is None:
                    chosen = _Best(images)
                chosen.offer(x, iou_last)
        # one restart and no IoU: the last point as it is (no copy)
        adversarial = chosen.images if chosen is not None else x
        # without a random start the first gradient pass ran at the clean images: its loss is the clean loss
        loss_before = run.first_loss if not spec.random_start and run.first_loss is not None else _loss_at(run, images)
        loss_after = _loss_at(run, adversarial) if return_loss_after else None
    return AttackResult(
        images=adversarial.detach(),
        epsilon=eps,
        loss_before=loss_before,
        loss_after=loss_after,
        iou=chosen.iou if chosen is not None else None,
    )


def _loss_at(run: _Run, x: torch.Tensor) -> torch.Tensor:
    """Mean loss at ``x`` without gradients (the labels were checked by the first gradient pass)."""
    logits = run.logits(x)
    with torch.no_grad():
        if run.spec.loss is None:
            return _compute_loss(run.loss_function, logits, run.labels, None).detach()
        return attack_loss(run.spec.loss, logits, run.target_for(logits), 0, run.spec.num_steps).mean().detach()
