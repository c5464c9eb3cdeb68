"""Robustness of a segmentation network: IoU and Dice on clean and attacked images, a per-image worst case over
strong segmentation attacks, and checks for gradient masking.

:class:`RobustnessEvaluator` is an Ignite engine over a validation loader (one iteration per batch), so that MONAI's
handlers attach to it as to any evaluator: the bundle's ``CheckpointLoader`` loads the weights (one way to load a
checkpoint), ``ProgressBar`` shows progress, and ``MLFlowHandler`` (added by ``--tracking mlflow``) logs its metrics.
Every attack comes from the core (:func:`monai_adv.attacks.run_attack`, one loop); FGSM and Inverse FGSM share one
input gradient per batch (:func:`monai_adv.attacks.gradient_sign_sweep`).

Attacks (white box, L-infinity, the true labels):

- ``fgsm``, ``invfgsm``: the paper's single steps on the training loss (Inverse FGSM lowers the loss with the true
  label: the paper's measurement, no threat).
- ``pgd``: sign-PGD on the training loss from a random start.
- ``segpgd``, ``cospgd``: sign-PGD on the SegPGD and CosPGD losses from a random start.
- ``apgd``: APGD with SEA's radius schedule 2ε → 1.5ε → ε, one row per loss of ``apgd_losses`` (Jensen-Shannon,
  masked CE, class-balanced masked CE by default).
- ``noise``: uniform random noise of the same radius (a baseline, not an attack).
- ``ensemble``: per image, the worst (lowest IoU) result over the other listed attacks except ``invfgsm`` and
  ``noise``. The number to quote.

Iterative attacks keep each image's lowest-IoU iterate. Every row holds the mean over images of the per-image
foreground IoU and Dice (as ``run evaluating``), the IoU pooled over all pixels, and, with several classes, IoU and
Dice per class.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import decollate_batch
from monai.metrics import compute_dice, compute_iou
from monai.networks.utils import one_hot
from monai.utils import convert_to_tensor
from torch import nn

from monai_adv.attacks import AttackSpec, LossFunction, check_epsilons, gradient_sign_sweep, run_attack
from monai_adv.attacks.gradient_sign import clamp_bounds, project_and_clamp
from monai_adv.attacks.losses import channel_argmax
from monai_adv.data.datalist import case_id
from monai_adv.evaluation.figures import plot_robustness_curve, save_example_grid
from monai_adv.evaluation.inferer import InfererNetwork

__all__ = [
    "APGD_LOSSES",
    "ATTACKS",
    "DEFAULT_ATTACKS",
    "DEFAULT_EPSILONS",
    "RobustnessEvaluator",
    "format_table",
    "load_network_weights",
]

ATTACKS = ("fgsm", "invfgsm", "pgd", "segpgd", "cospgd", "apgd", "noise", "ensemble")
DEFAULT_ATTACKS = ATTACKS
#: The paper's epsilons and 1/255, 2/255, 4/255, 8/255 (images in [0, 1]).
DEFAULT_EPSILONS = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 0.0012, 0.0118, 0.1176, 0.2)
APGD_LOSSES = ("js", "masked_ce", "balanced_ce")
#: SEA's shrinking radius for the APGD runs.
APGD_RADII = (2.0, 1.5, 1.0)
# Attacks the ensemble takes its worst case over (Inverse FGSM helps the model; noise is the baseline).
_NOT_IN_ENSEMBLE = ("invfgsm", "noise", "ensemble")
_DIRECTION = {"fgsm": "ascend", "invfgsm": "descend"}
_NAMES = {"fgsm": "FGSM", "invfgsm": "InvFGSM"}
#: IoU differences below this are read as noise of the estimate by the gradient-masking checks.
CHECK_TOLERANCE = 0.02


def load_network_weights(network: nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Load a bundle checkpoint into ``network``: ``model.pt`` (a state dict) or ``checkpoint_epoch=N.pt`` (``{"model": ...}``).

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        ValueError: when the file holds no weights for this network.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint (ckpt_path) {path} does not exist: train first or give --ckpt_path.")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(f"checkpoint {path} does not fit the network (check features/in_channels): {err}") from err
    return network


@dataclass(frozen=True)
class _Row:
    """One measured setting: an attack (and loss) at one epsilon and step budget."""

    attack: str
    loss: str
    epsilon: float
    num_steps: int
    restarts: int


class _Scores:
    """Per-image, per-class IoU and Dice (NaN where the class is absent from the label, as MONAI counts it) and the
    intersections and unions for the pooled IoU."""

    def __init__(self) -> None:
        self.iou: list[torch.Tensor] = []
        self.dice: list[torch.Tensor] = []
        self.intersection: list[torch.Tensor] = []
        self.union: list[torch.Tensor] = []

    def add(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """``pred``, ``label``: one-hot ``(B, K, *spatial)``."""
        self.iou.append(compute_iou(pred, label, include_background=False).cpu())
        self.dice.append(compute_dice(pred, label, include_background=False).cpu())
        dims = tuple(range(2, pred.ndim))
        intersection = (pred[:, 1:] * label[:, 1:]).sum(dims)
        self.intersection.append(intersection.cpu())
        self.union.append((pred[:, 1:].sum(dims) + label[:, 1:].sum(dims) - intersection).cpu())

    def last_per_image(self) -> torch.Tensor:
        """The last batch's per-image IoU (mean over its classes present in the label; NaN when none is)."""
        return _nanmean(self.iou[-1], dim=1)

    def take(self, other: _Scores, index: int, mask: torch.Tensor) -> None:
        """Replace the entries of batch ``index`` by ``other``'s where ``mask`` (per image) is true."""
        for name in ("iou", "dice", "intersection", "union"):
            mine, theirs = getattr(self, name), getattr(other, name)
            while len(mine) <= index:
                mine.append(theirs[len(mine)].clone())
            mine[index] = torch.where(mask.unsqueeze(1), theirs[index], mine[index])

    def summary(self, class_names: Sequence[str]) -> dict[str, float]:
        iou, dice = torch.cat(self.iou), torch.cat(self.dice)
        intersection, union = torch.cat(self.intersection).sum(0), torch.cat(self.union).sum(0)
        pooled = intersection / union.clamp_min(1)
        out = {
            # MONAI's MeanIoU / MeanDice aggregate ("mean"): each image's mean over its classes present in the label,
            # then the mean over images
            "mean_iou": _nanmean(_nanmean(iou, dim=1), dim=0).item(),
            "mean_dice": _nanmean(_nanmean(dice, dim=1), dim=0).item(),
            "pooled_iou": pooled.mean().item(),
        }
        if len(class_names) > 1:
            for k, name in enumerate(class_names):
                out[f"iou_{name}"] = _nanmean(iou[:, k], dim=0).item()
                out[f"dice_{name}"] = _nanmean(dice[:, k], dim=0).item()
        return out


def _image_names(batch: Any, key: str, first_index: int) -> list[str]:
    """The batch's image names (file names without extension, ``.nii.gz`` included, from the images'
    ``filename_or_obj``; else ``id``; else the index)."""
    size = len(batch[key])
    names = getattr(batch[key], "meta", {}).get("filename_or_obj") if isinstance(batch, dict) else None
    if names is None and isinstance(batch, dict):
        names = batch.get("id")
    if isinstance(names, (list, tuple)) and len(names) == size:
        return [case_id(str(n)) if isinstance(n, (str, os.PathLike)) else str(n) for n in names]
    return [str(first_index + i) for i in range(size)]


def _describe(value: Any) -> Any:
    """A stable description of an object's kind and plain settings (``repr`` may hold a memory address)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    settings = sorted(getattr(value, "__dict__", {}).items())
    plain = {k: _describe(v) for k, v in settings if isinstance(v, (bool, int, float, str, list, tuple))}
    return {"type": f"{type(value).__module__}.{type(value).__qualname__}", **plain}


def _batch_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A digest of a batch's images and labels (values, shapes and dtypes), wherever they are."""
    digest = hashlib.sha256()
    for tensor in (images, labels):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _nanmean(values: torch.Tensor, dim: int) -> torch.Tensor:
    valid = ~torch.isnan(values)
    total = torch.where(valid, values, torch.zeros_like(values)).sum(dim)
    count = valid.sum(dim)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def _listed_check(
    failures: list[dict[str, Any]], reason: str, describe: Callable[[dict], str], shown: int | None = None
) -> dict[str, Any]:
    """A check that passes when ``failures`` is empty; its reason names them (``reason``, then the first ``shown``
    described)."""
    named = ", ".join(describe(d) for d in failures[:shown])
    return {"passed": not failures, "details": failures, "reason": reason + named}


class RobustnessEvaluator(Engine):
    """Evaluate a network on clean and attacked versions of a validation set, with gradient-masking checks.

    Every batch is attacked with the ground-truth labels (white box, L-infinity, in the images' units, clamped as
    ``clamp``/``value_range`` say). Predictions go through ``postprocessing`` (the bundle's validation
    postprocessing: softmax, argmax, one-hot) per image, so the epsilon-0 row equals ``run evaluating`` on the same
    checkpoint.

    When the run completes it writes, under ``output_dir``: ``robustness.json`` (``{"checkpoint", "num_images",
    "results": [rows], "checks": {...}, "suspect_gradient_masking": bool, "suspect_reasons": [...], "seconds",
    "continued"}``: ``seconds`` is the wall time of the measurement, the runs stopped before it included when it
    continued from a progress file; ``continued`` holds the batches and seconds it took from that file); each row
    ``{"attack", "loss", "epsilon", "num_steps", "restarts", "mean_iou", "mean_dice", "pooled_iou", ...}``),
    ``robustness.csv``, ``robustness_per_image.csv`` (each image's IoU and Dice per row, clean included, named by
    the file stem of its ``filename_or_obj``), ``robustness.png`` (IoU against epsilon) and, with ``num_examples > 0``,
    ``robustness_examples.png`` (input, FGSM and InvFGSM images at ``example_epsilon``, amplified difference,
    label, predictions). It puts ``robust_iou/<attack>/eps_<e>`` into ``state.metrics``, adds the files to the
    artifacts of an attached ``MLFlowHandler``, and logs a warning for every check that fails.

    The checks (Carlini et al. 2019, "On evaluating adversarial robustness"), each under ``checks``:

    - ``monotone_in_epsilon``: no attack's IoU rises with epsilon;
    - ``monotone_in_steps``: PGD with twice the steps is not weaker, at ``check_epsilon``;
    - ``large_radius``: PGD at ``masking_epsilon`` (0.5: the images can be replaced) drives IoU below 0.1;
    - ``noise_weaker``: uniform noise of the same radius lowers IoU by less than half as much as the ensemble
      (where the ensemble lowers it by 0.05 or more);
    - ``fgsm_not_stronger``: FGSM is not stronger than PGD at the same epsilon;
    - ``transfer_not_stronger``: with a ``surrogate`` network, PGD made on it is not stronger than the white-box
      ensemble.

    Differences under ``CHECK_TOLERANCE`` (0.02 IoU) are not counted. A zero input gradient stops the run with
    :class:`~monai_adv.attacks.ZeroInputGradientError` (its robustness cannot be measured with gradients).

    Args:
        network: the segmentation network (weights loaded by a ``CheckpointLoader`` among ``handlers``, or before).
        loss_function: the training loss, for FGSM, InvFGSM and PGD.
        data_loader: validation loader of dicts with ``image_key`` and ``label_key`` (labels ``(B, 1, ...)``
            class indices).
        output_dir: where the files go (created).
        device: the network's device.
        checkpoint: the checkpoint's path, recorded in the JSON.
        attacks: any of :data:`ATTACKS`.
        epsilons: L-infinity radii in the images' units; 0 is the clean score.
        num_steps: steps of every iterative attack.
        restarts: runs of every iterative attack (random starts after the first); the worst per image is kept.
        random_start: start PGD, SegPGD and CosPGD at a random point of the ball.
        apgd_losses: the losses of the ``apgd`` rows.
        iterative_epsilons: the epsilons at which the iterative attacks, the noise and the ensemble run (a subset
            of ``epsilons``; default all): FGSM and Inverse FGSM, which cost one gradient for every epsilon, still
            run at all of them.
        num_classes: output channels of the network.
        class_names: names of the classes after the background, for the per-class keys (default ``class_1``, ...).
        clamp: value bounds of the attacked images (``"range"``, ``"image"`` or ``"none"``).
        value_range: bounds for ``clamp="range"``.
        postprocessing: per-image ``{"pred": logits, "label": label}`` -> one-hot ``pred`` and ``label`` (the
            bundle's ``validate#postprocessing``); default softmax (sigmoid for one channel), argmax, one-hot.
        checks: run the gradient-masking checks (a few more attack runs).
        check_epsilon: epsilon of the steps check (default: the median positive epsilon).
        masking_epsilon: radius of the large-radius check.
        surrogate: an independently trained network (weights loaded) for the transfer check, or None.
        num_examples: rows of the example grid (0: no grid).
        example_epsilon: epsilon of the example grid (default: the largest of ``epsilons``); computed even when it
            is not one of ``epsilons``.
        handlers: Ignite/MONAI handlers to attach (``CheckpointLoader``, ``MLFlowHandler``, ``ProgressBar``).
        seed: seed of the random starts and the noise.
        amp: attack and predict under ``torch.autocast``.
        image_key, label_key: keys of the batch.
        inferer: the evaluation's MONAI inferer (e.g. ``SlidingWindowInferer``); predictions and every attack go
            through it (:class:`~monai_adv.evaluation.InfererNetwork`), so the gradient flows through
            ``sliding_window_inference``. Default: the network on the whole input.
        progress_file: where the run keeps what it has measured after every batch (None: nowhere). A run stopped
            part way (a kill, the end of a session) and started again with the same network weights, settings
            and data continues after the last finished batch, with the same random state, so its results equal
            those of an uninterrupted run; a file written for other weights or settings is ignored (and replaced),
            a file whose images differ from the loader's is refused. Removed when the run completes.

    Raises:
        ValueError: for an unknown attack or loss, bad epsilons, steps or restarts (naming the option); at run
            time, for a ``progress_file`` whose images are not the loader's.
    """

    def __init__(
        self,
        network: nn.Module,
        loss_function: LossFunction,
        data_loader: Any,
        output_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        checkpoint: str | os.PathLike | None = None,
        attacks: Sequence[str] = DEFAULT_ATTACKS,
        epsilons: Sequence[float] = DEFAULT_EPSILONS,
        num_steps: int = 20,
        restarts: int = 1,
        random_start: bool = True,
        apgd_losses: Sequence[str] = APGD_LOSSES,
        iterative_epsilons: Sequence[float] | None = None,
        num_classes: int = 2,
        class_names: Sequence[str] | None = None,
        clamp: str = "range",
        value_range: Sequence[float] = (0.0, 1.0),
        postprocessing: Callable[[dict], dict] | None = None,
        checks: bool = True,
        check_epsilon: float | None = None,
        masking_epsilon: float = 0.5,
        surrogate: nn.Module | None = None,
        num_examples: int = 4,
        example_epsilon: float | None = None,
        handlers: Sequence[Any] = (),
        seed: int = 0,
        amp: bool = False,
        image_key: str = "image",
        label_key: str = "label",
        inferer: Callable[..., Any] | None = None,
        progress_file: str | os.PathLike | None = None,
    ) -> None:
        attacks = [attacks] if isinstance(attacks, str) else list(attacks)
        unknown = [a for a in attacks if str(a).lower() not in ATTACKS]
        if unknown or not attacks:
            raise ValueError(f"unknown attack(s) {unknown or attacks!r}: choose from {list(ATTACKS)}.")
        self.attacks = [str(a).lower() for a in attacks]
        self.epsilons = check_epsilons(epsilons)
        self.checks_enabled = bool(checks)
        positive = sorted(e for e in self.epsilons if e > 0)
        if iterative_epsilons is not None:
            chosen = check_epsilons(iterative_epsilons)
            outside = [e for e in chosen if e not in self.epsilons]
            if outside:
                raise ValueError(f"iterative_epsilons {outside} are not among the epsilons {self.epsilons}.")
            positive = sorted(e for e in chosen if e > 0)
        self.iterative_epsilons = positive
        self.check_epsilon = (
            float(check_epsilon) if check_epsilon is not None else (positive[len(positive) // 2] if positive else 0.0)
        )
        self.masking_epsilon = float(masking_epsilon)
        check_epsilons([self.check_epsilon, self.masking_epsilon])
        common = {"clamp": clamp, "value_range": tuple(value_range), "amp": amp}
        # Every attack's spec, built (and validated) once: a bad option fails here, naming it.
        base = AttackSpec.create(num_steps=num_steps, restarts=restarts, keep_best=True, **common)
        starts = {"random_start": random_start}
        self.specs: dict[tuple[str, str], AttackSpec] = {}
        if "pgd" in self.attacks or self.checks_enabled:
            self.specs["pgd", "training"] = base.replace(**starts)
        for name in ("segpgd", "cospgd"):
            if name in self.attacks:
                self.specs[name, name] = base.replace(loss=name, **starts)
        if "apgd" in self.attacks:
            for loss in [apgd_losses] if isinstance(apgd_losses, str) else list(apgd_losses):
                self.specs["apgd", str(loss)] = base.replace(schedule="apgd", loss=loss, radii=APGD_RADII)
        self.single = AttackSpec.create(**common)  # FGSM / InvFGSM (one gradient for every epsilon)
        # the attacks and the scores go through the evaluation's inferer (e.g. sliding windows on volumes)
        self.network = InfererNetwork(network, inferer) if inferer is not None else network
        self.device = torch.device(device)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        super().__init__(self._iteration)
        self.loss_function = loss_function
        self.data_loader = data_loader
        self.output_dir = Path(output_dir)
        self.num_classes = int(num_classes)
        names = list(class_names) if class_names is not None else [f"class_{k}" for k in range(1, self.num_classes)]
        if len(names) != max(self.num_classes - 1, 1):
            raise ValueError(
                f"class_names must name the {self.num_classes - 1} classes after the background, got {names}."
            )
        self.class_names = names
        self.postprocessing = postprocessing
        self.surrogate = (
            InfererNetwork(surrogate, inferer) if surrogate is not None and inferer is not None else surrogate
        )
        self.num_examples = int(num_examples)
        self.example_epsilon = max(self.epsilons) if example_epsilon is None else float(example_epsilon)
        check_epsilons([self.example_epsilon])
        self.seed = seed
        self.amp = amp
        self.image_key, self.label_key = image_key, label_key
        self.logger = logging.getLogger("RobustnessEvaluator")
        self.rows: list[dict[str, Any]] = []
        self.checks: dict[str, dict[str, Any]] = {}
        self.files: list[str] = []
        self._generator = torch.Generator(device=self.device)
        self._scores: dict[_Row, _Scores] = {}
        #: the example grid's columns (name -> one image per row) of the last run
        self.examples: dict[str, list[torch.Tensor]] = {}
        self._num_images = 0
        self._batch_index = 0
        self._image_names: list[str] = []
        self._batch_sizes: list[int] = []
        self._batch_digests: list[str] = []  # of each measured batch's images and labels (a progress file's check)
        # Registered before any handler attaches, so that the files exist when MLFlowHandler logs artifacts.
        self.add_event_handler(Events.STARTED, self._reset)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._finish)
        self.handlers = [h for h in (handlers or ()) if h is not None]  # a disabled config entry is None
        for handler in self.handlers:
            handler.attach(self)
        self.progress_file = None if progress_file is None else Path(progress_file)
        #: batches of this run restored from ``progress_file`` (skipped, not measured again)
        self.restored_batches = 0
        self._run_fingerprint = ""
        self._measure_start = time.monotonic()  # wall time of this run's measurement, from STARTED
        self._seconds_before = 0.0  # of the stopped runs a progress file continues
        self._settings = {
            "attacks": self.attacks, "epsilons": self.epsilons, "iterative_epsilons": self.iterative_epsilons,
            "specs": {f"{a}/{loss}": repr(spec) for (a, loss), spec in self.specs.items()},
            "single": repr(self.single), "checks": self.checks_enabled, "check_epsilon": self.check_epsilon,
            "masking_epsilon": self.masking_epsilon, "num_examples": self.num_examples,
            "example_epsilon": self.example_epsilon, "num_classes": self.num_classes, "seed": self.seed,
            "amp": bool(amp), "inferer": _describe(inferer), "postprocessing": _describe(postprocessing),
            "loss": _describe(loss_function), "device": self.device.type,
        }  # fmt: skip
        # after the handlers: the CheckpointLoader has loaded the weights that the progress file must match
        self.add_event_handler(Events.STARTED, self._restore_progress)

    def run(self, data: Any = None, max_epochs: int = 1, **kwargs: Any):
        return super().run(self.data_loader if data is None else data, max_epochs=max_epochs, **kwargs)

    # -- per batch ---------------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._measure_start = time.monotonic()
        self._seconds_before = 0.0
        self._generator.manual_seed(self.seed)
        self._scores, self.examples, self._num_images, self._batch_index = {}, {}, 0, 0
        self.rows, self.checks, self._image_names, self._batch_sizes, self._batch_digests = [], {}, [], [], []

    def _loss_name(self, spec_loss: str) -> str:
        return type(self.loss_function).__name__ if spec_loss == "training" else spec_loss

    def _postprocess(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One-hot predictions and labels ``(B, K, *spatial)``, through the bundle's postprocessing when given."""
        if self.postprocessing is None:
            k = max(self.num_classes, 2)
            index = (logits > 0).long() if logits.shape[1] == 1 else channel_argmax(logits, keepdim=True)
            return one_hot(index, k), one_hot(labels.round().long(), k)
        items = decollate_batch({"pred": logits, "label": labels})
        out = [self.postprocessing(item) for item in items]
        pred = torch.stack([convert_to_tensor(o["pred"], track_meta=False) for o in out]).to(logits.device)
        label = torch.stack([convert_to_tensor(o["label"], track_meta=False) for o in out]).to(logits.device)
        return pred, label

    def _logits(self, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=self.amp):
            logits = network(images)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return logits.float()

    def _score(self, row: _Row, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pred, label = self._postprocess(self._logits(self.network, images), labels)
        self._scores.setdefault(row, _Scores()).add(pred, label)
        return pred

    def _iteration(self, engine: Engine, batch: dict) -> dict:
        if engine.state.iteration <= self.restored_batches:
            self._check_restored_batch(engine.state.iteration - 1, batch)
            return {}  # measured before the run was stopped (its scores came from the progress file)
        # plain tensors: metadata tracking would only slow the many forward passes down
        self._image_names.extend(_image_names(batch, self.image_key, self._num_images))
        images = convert_to_tensor(batch[self.image_key], track_meta=False).to(self.device)
        labels = convert_to_tensor(batch[self.label_key], track_meta=False).to(self.device)
        if self.progress_file is not None:
            self._batch_digests.append(_batch_digest(images, labels))
        self.network.eval()
        positive = [e for e in self.epsilons if e > 0]
        clean = self._score(_Row("clean", "none", 0.0, 0, 0), images, labels)
        single = [a for a in self.attacks if a in _DIRECTION]
        sweep_eps = sorted(set(positive) | ({self.example_epsilon} if self.num_examples and single else set()))
        swept: dict[str, list[torch.Tensor]] = {}
        if sweep_eps and (single or self.checks_enabled):
            directions = [_DIRECTION[a] for a in single] or ["ascend"]
            if self.checks_enabled and "ascend" not in directions:
                directions.append("ascend")
            by_direction = gradient_sign_sweep(
                self.network, self.loss_function, images, labels, sweep_eps, directions,
                clamp=self.single.clamp, value_range=self.single.value_range, amp=self.amp,
            )  # fmt: skip
            swept = {a: by_direction[d] for a, d in _DIRECTION.items() if d in by_direction}
            for attack, xs in swept.items():
                if attack in single or (attack == "fgsm" and self.checks_enabled):
                    for eps, x in zip(sweep_eps, xs):
                        if eps in positive:
                            self._score(_Row(attack, self._loss_name("training"), eps, 1, 1), x, labels)
        for (attack, loss), spec in self.specs.items():
            for eps in self.iterative_epsilons:
                x = run_attack(self.network, images, labels, spec, self.loss_function, eps, self._generator).images
                self._score(_Row(attack, self._loss_name(loss), eps, spec.num_steps, spec.restarts), x, labels)
        if "noise" in self.attacks or self.checks_enabled:
            for eps in self.iterative_epsilons:
                self._score(_Row("noise", "none", eps, 0, 1), self._noise(images, eps), labels)
        if self.checks_enabled:
            self._check_runs(images, labels)
        self._collect_examples(images, labels, clean, dict(zip(sweep_eps, swept.get("fgsm", []))),
                               dict(zip(sweep_eps, swept.get("invfgsm", []))))  # fmt: skip
        self._num_images += images.shape[0]
        self._batch_index += 1
        self._batch_sizes.append(images.shape[0])
        self._save_progress()
        return {}

    # -- progress (a stopped run continues) -----------------------------------------------------------------------
    def _fingerprint(self) -> str:
        """What the measurements depend on besides the data: the settings and the weights (a digest)."""
        digest = hashlib.sha256()
        for network in (self.network, self.surrogate):
            for name, tensor in ({} if network is None else network.state_dict()).items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return json.dumps({**self._settings, "weights": digest.hexdigest()}, sort_keys=True)

    def _save_progress(self) -> None:
        if self.progress_file is None:
            return
        state = {
            "fingerprint": self._run_fingerprint,
            "rows": [[r.attack, r.loss, r.epsilon, r.num_steps, r.restarts] for r in self._scores],
            "scores": [
                {k: getattr(s, k) for k in ("iou", "dice", "intersection", "union")} for s in self._scores.values()
            ],
            "image_names": self._image_names,
            "batch_sizes": self._batch_sizes,
            "batch_digests": self._batch_digests,
            "seconds": self._seconds(),
            "examples": self.examples,
            "generator": self._generator.get_state(),
            "global_generator": torch.get_rng_state(),
        }
        self.progress_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.progress_file.with_name(self.progress_file.name + ".partial")
        torch.save(state, partial)
        os.replace(partial, self.progress_file)  # atomic: a kill while writing leaves the previous file

    def _seconds(self) -> float:
        """Wall time of this measurement so far: this run's, and that of the runs it continues."""
        return self._seconds_before + time.monotonic() - self._measure_start

    def _restore_progress(self) -> None:
        self.restored_batches = 0
        if self.progress_file is None:
            return
        # the digest of the weights now loaded, computed once per run (the weights do not change during it)
        self._run_fingerprint = self._fingerprint()
        if not self.progress_file.is_file():
            return
        try:
            state = torch.load(self.progress_file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - an unreadable file is only lost progress
            self.logger.warning(
                "progress file %s cannot be read (%s): starting from the first batch", self.progress_file, err
            )
            return
        if state.get("fingerprint") != self._run_fingerprint:
            self.logger.warning("progress file %s was written for other weights or settings: starting from the first "
                                "batch (it is replaced)", self.progress_file)  # fmt: skip
            return
        self._scores = {}
        for row, scores in zip(state["rows"], state["scores"]):
            restored = self._scores.setdefault(_Row(*row), _Scores())
            for name, values in scores.items():
                setattr(restored, name, list(values))
        self._image_names, self._batch_sizes = list(state["image_names"]), list(state["batch_sizes"])
        self._batch_digests = list(state.get("batch_digests", []))
        self._seconds_before = float(state.get("seconds", 0.0))
        self.examples = {name: list(images) for name, images in state["examples"].items()}
        self._generator.set_state(state["generator"])
        torch.set_rng_state(state["global_generator"])
        self._batch_index = self.restored_batches = len(self._batch_sizes)
        self._num_images = sum(self._batch_sizes)
        self.logger.info("continuing from %s: %d batches (%d images) already measured", self.progress_file,
                         self._batch_index, self._num_images)  # fmt: skip

    def _check_restored_batch(self, index: int, batch: dict) -> None:
        """A skipped batch must hold the images the progress file measured (else its scores belong to others)."""
        first = sum(self._batch_sizes[:index])
        names = _image_names(batch, self.image_key, first)
        expected = self._image_names[first : first + self._batch_sizes[index]]
        if names != expected:
            raise ValueError(
                f"progress file {self.progress_file} measured images {expected} as batch {index + 1}, but the loader "
                f"gives {names}: the data changed. Delete the file to evaluate from the first batch."
            )
        images = convert_to_tensor(batch[self.image_key], track_meta=False)
        labels = convert_to_tensor(batch[self.label_key], track_meta=False)
        if index >= len(self._batch_digests) or _batch_digest(images, labels) != self._batch_digests[index]:
            raise ValueError(
                f"progress file {self.progress_file} measured other images or labels as batch {index + 1} "
                f"({expected}) than the loader gives now (same names, other content: e.g. other preprocessing). "
                "Delete the file to evaluate from the first batch."
            )

    def _noise(self, images: torch.Tensor, eps: float) -> torch.Tensor:
        noise = torch.rand(images.shape, generator=self._generator, device=images.device, dtype=images.dtype)
        bounds = clamp_bounds(images, self.single.clamp, self.single.value_range)
        return project_and_clamp(images + (2 * noise - 1) * eps, images, eps, bounds)

    def _check_runs(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """The extra attack runs the checks need: PGD with twice the steps, PGD at a very large radius, and the
        transfer attack from the surrogate."""
        pgd = self.specs["pgd", "training"]
        loss = self._loss_name("training")
        if self.check_epsilon > 0:
            longer = pgd.replace(num_steps=2 * pgd.num_steps)
            x = run_attack(self.network, images, labels, longer, self.loss_function, self.check_epsilon,
                           self._generator).images  # fmt: skip
            self._score(_Row("pgd", loss, self.check_epsilon, longer.num_steps, longer.restarts), x, labels)
        if self.masking_epsilon not in self.epsilons:
            with warnings.catch_warnings():  # the radius is meant to be too large
                warnings.filterwarnings("ignore", message="epsilon .* is at least the whole value range")
                x = run_attack(self.network, images, labels, pgd, self.loss_function, self.masking_epsilon,
                               self._generator).images  # fmt: skip
            self._score(_Row("pgd", loss, self.masking_epsilon, pgd.num_steps, pgd.restarts), x, labels)
        if self.surrogate is not None:
            self.surrogate.eval()
            plain = pgd.replace(keep_best=False)  # the surrogate's own best iterate says nothing about the target
            for eps in self.iterative_epsilons:
                x = run_attack(self.surrogate, images, labels, plain, self.loss_function, eps, self._generator).images
                self._score(_Row("transfer", loss, eps, plain.num_steps, plain.restarts), x, labels)

    def _collect_examples(self, images, labels, clean, fgsm: dict, invfgsm: dict) -> None:
        take = min(self.num_examples - self._num_images, images.shape[0])
        if take <= 0:
            return
        eps = self.example_epsilon
        columns = {"input": images, "label": labels, "prediction (clean)": clean[:, 1:].sum(1, keepdim=True)}
        for name, adversarial in (("FGSM", fgsm), ("InvFGSM", invfgsm)):
            if eps not in adversarial:
                continue
            adv = adversarial[eps]
            columns[f"{name} eps={eps:g}"] = adv
            # the signed difference scaled so that -eps..eps spans the grey range (mid grey: unchanged)
            columns[f"{name} - input (amplified)"] = ((adv - images) / (2 * eps) + 0.5).clamp(0, 1)
            pred, _ = self._postprocess(self._logits(self.network, adv), labels)
            columns[f"prediction ({name})"] = pred[:, 1:].sum(1, keepdim=True)
        for name, value in columns.items():
            self.examples.setdefault(name, []).extend(v.detach().cpu() for v in value[:take])

    # -- at the end -------------------------------------------------------------------------------------------------
    def _ensemble(self) -> dict[float, _Scores]:
        """Per epsilon and image, the scores of the listed attack with the lowest IoU."""
        out: dict[float, _Scores] = {}
        members = [r for r in self._scores if self._in_ensemble(r)]
        for eps in sorted({r.epsilon for r in members}):
            rows = [r for r in members if r.epsilon == eps]
            worst = _Scores()
            for index in range(self._batch_index):
                best_iou = None
                for row in rows:
                    scores = self._scores[row]
                    iou = _nanmean(scores.iou[index], dim=1)
                    key = torch.where(torch.isnan(iou), torch.full_like(iou, math.inf), iou)
                    if best_iou is None:
                        worst.take(scores, index, torch.ones_like(key, dtype=torch.bool))
                        best_iou = key
                    else:
                        lower = key < best_iou
                        worst.take(scores, index, lower)
                        best_iou = torch.minimum(best_iou, key)
            out[eps] = worst
        return out

    def _row_dict(self, row: _Row, scores: _Scores) -> dict[str, Any]:
        return {
            "attack": row.attack,
            "loss": row.loss,
            "epsilon": row.epsilon,
            "num_steps": row.num_steps,
            "restarts": row.restarts,
            **scores.summary(self.class_names),
        }

    def _finish(self) -> None:
        if self.state.iteration < self.restored_batches:
            raise ValueError(
                f"progress file {self.progress_file} measured {self.restored_batches} batches, but the loader gives "
                f"{self.state.iteration}: the data changed. Delete the file to evaluate from the first batch."
            )
        clean = self._scores[_Row("clean", "none", 0.0, 0, 0)]
        clean_row = clean.summary(self.class_names)
        listed = [a for a in self.attacks if a != "ensemble"]
        rows: list[dict[str, Any]] = []
        for attack in listed:
            zero = {"attack": attack, "loss": "none", "epsilon": 0.0, "num_steps": 0, "restarts": 0, **clean_row}
            if 0.0 in self.epsilons:
                rows.append(zero)
            for row, scores in self._scores.items():
                if row.attack == attack and row.epsilon in self.epsilons and not self._check_only(row):
                    rows.append(self._row_dict(row, scores))
        ensemble = self._ensemble()
        if "ensemble" in self.attacks:
            members = sorted(
                {r.attack for r in self._scores if r.attack in listed and r.attack not in _NOT_IN_ENSEMBLE}
            )
            if 0.0 in self.epsilons:
                rows.append({"attack": "ensemble", "loss": "worst of " + "+".join(members), "epsilon": 0.0,
                             "num_steps": 0, "restarts": 0, **clean_row})  # fmt: skip
            for eps, scores in ensemble.items():
                rows.append(self._row_dict(_Row("ensemble", "worst of " + "+".join(members), eps, 0, 0), scores))
        self.rows = rows
        for row in rows:
            tag = row["attack"] if row["attack"] != "apgd" else f"apgd_{row['loss']}"
            self.state.metrics[f"robust_iou/{tag}/eps_{row['epsilon']:g}"] = row["mean_iou"]
            self.state.metrics[f"robust_dice/{tag}/eps_{row['epsilon']:g}"] = row["mean_dice"]
        if self.checks_enabled:
            self.checks = self._run_checks(clean_row["mean_iou"], ensemble)
        reasons = [c["reason"] for c in self.checks.values() if c.get("passed") is False]
        summary = {
            "checkpoint": self.checkpoint,
            "num_images": self._num_images,
            "class_names": self.class_names,
            "results": rows,
            "checks": self.checks,
            "suspect_gradient_masking": bool(reasons),
            "suspect_reasons": reasons,
            "seconds": self._seconds(),
            "continued": {"batches": self.restored_batches, "seconds": self._seconds_before},
        }
        for reason in reasons:
            self.logger.warning("gradient-masking check failed: %s", reason)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        json_path = self.output_dir / "robustness.json"
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
        csv_path = self.output_dir / "robustness.csv"
        with open(csv_path, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        per_image_path = self.output_dir / "robustness_per_image.csv"
        self._write_per_image(per_image_path, rows)
        self.files = [str(json_path), str(csv_path), str(per_image_path)]
        curve = [dict(r, attack=f"apgd ({r['loss']})" if r["attack"] == "apgd" else r["attack"]) for r in rows]
        self.files.append(
            plot_robustness_curve(curve, self.output_dir / "robustness.png", f"{self._num_images} images")
        )
        if self.examples:
            self.files.append(save_example_grid(self.examples, self.output_dir / "robustness_examples.png"))
        self._add_mlflow_artifacts()
        if self.progress_file is not None:
            self.progress_file.unlink(missing_ok=True)  # complete: a new run measures again
        self.logger.info("robustness of %s on %d images: wrote %s\n%s", self.checkpoint, self._num_images,
                         self.files, format_table(rows))  # fmt: skip

    def _write_per_image(self, path: Path, rows: list[dict[str, Any]]) -> None:
        """One line per image and row of ``rows``: ``image, attack, loss, epsilon, iou, dice`` (for paired
        comparisons between checkpoints, e.g. a bootstrap over images)."""
        with open(path, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["image", "attack", "loss", "epsilon", "iou", "dice"])
            for row in rows:
                if row["epsilon"] == 0 and row["attack"] != "ensemble":
                    continue  # the clean scores are written once, as the ensemble's epsilon-0 line or below
                scores = self.per_image(row["attack"], row["epsilon"], row["loss"] if row["attack"] == "apgd" else None)
                for name, iou, dice in zip(self._image_names, scores["iou"].tolist(), scores["dice"].tolist()):
                    writer.writerow([name, row["attack"], row["loss"], f"{row['epsilon']:g}", f"{iou:.6f}",
                                     f"{dice:.6f}"])  # fmt: skip
            if not any(r["attack"] == "ensemble" for r in rows):
                scores = self.per_image("clean", 0.0)
                for name, iou, dice in zip(self._image_names, scores["iou"].tolist(), scores["dice"].tolist()):
                    writer.writerow([name, "clean", "none", "0", f"{iou:.6f}", f"{dice:.6f}"])

    def per_image(self, attack: str, epsilon: float, loss: str | None = None) -> dict[str, torch.Tensor]:
        """Each image's IoU and Dice (mean over its foreground classes present in the label; NaN when none is) under
        one attack of the last run, in the loader's order (e.g. to study which structures an attack erases).

        Args:
            attack: one of the listed attacks (``"ensemble"`` too), or ``"clean"``.
            epsilon: one of the epsilons (any for ``"clean"``).
            loss: the row's loss, to choose among the ``apgd`` rows (default: the first).

        Raises:
            KeyError: when the run measured no such row.
        """
        if attack == "clean" or epsilon == 0:
            scores = self._scores[_Row("clean", "none", 0.0, 0, 0)]
        elif attack == "ensemble":
            scores = self._ensemble()[float(epsilon)]
        else:
            found = [s for r, s in self._scores.items() if r.attack == attack and r.epsilon == float(epsilon)
                     and (loss is None or r.loss == loss) and not self._check_only(r)]  # fmt: skip
            if not found:
                raise KeyError(f"no {attack} row at epsilon {epsilon:g}{'' if loss is None else f' with loss {loss}'}.")
            scores = found[0]
        return {"iou": _nanmean(torch.cat(scores.iou), dim=1), "dice": _nanmean(torch.cat(scores.dice), dim=1)}

    def _in_ensemble(self, row: _Row) -> bool:
        """Whether the row is one of the listed attacks at one of the listed epsilons (with the common budget)."""
        return (
            row.attack in self.attacks
            and row.attack not in _NOT_IN_ENSEMBLE
            and row.epsilon in self.iterative_epsilons
            and not self._check_only(row)
        )

    def _check_only(self, row: _Row) -> bool:
        """Rows measured for the checks only (PGD with twice the steps, PGD at the large radius)."""
        pgd = self.specs.get(("pgd", "training"))
        return row.attack == "pgd" and pgd is not None and row.num_steps != pgd.num_steps

    def _mean(self, attack: str, eps: float, steps: int | None = None) -> float | None:
        values = [s for r, s in self._scores.items() if r.attack == attack and r.epsilon == eps
                  and (steps is None or r.num_steps == steps)]  # fmt: skip
        return values[0].summary(self.class_names)["mean_iou"] if values else None

    def _run_checks(self, clean_iou: float, ensemble: dict[float, _Scores]) -> dict[str, dict[str, Any]]:
        tol = CHECK_TOLERANCE
        positive = sorted(e for e in self.epsilons if e > 0)
        checks: dict[str, dict[str, Any]] = {}
        pgd = self.specs["pgd", "training"]
        # 1. IoU does not rise with epsilon (for each attack, against every smaller epsilon)
        rises = []
        curves = {(r["attack"], r["loss"]): {} for r in self.rows if r["attack"] not in ("invfgsm", "noise")}
        for r in self.rows:
            if (r["attack"], r["loss"]) in curves:
                curves[r["attack"], r["loss"]][r["epsilon"]] = r["mean_iou"]
        for (attack, loss), curve in curves.items():
            eps_sorted = sorted(curve)
            for i, high in enumerate(eps_sorted):
                lowest_before = min((curve[e] for e in eps_sorted[:i]), default=None)
                if lowest_before is not None and curve[high] > lowest_before + tol:
                    rises.append({"attack": attack, "loss": loss, "epsilon": high, "iou": curve[high],
                                  "lower_iou_at_smaller_epsilon": lowest_before})  # fmt: skip
        checks["monotone_in_epsilon"] = _listed_check(
            rises,
            "robust IoU rises with epsilon for ",
            lambda d: (
                f"{d['attack']} ({d['loss']}) at {d['epsilon']:g}: {d['iou']:.3f} > "
                f"{d['lower_iou_at_smaller_epsilon']:.3f}"
            ),
            shown=4,
        )
        # 2. more steps are not weaker
        if self.check_epsilon > 0:
            short = self._mean("pgd", self.check_epsilon, pgd.num_steps)
            long = self._mean("pgd", self.check_epsilon, 2 * pgd.num_steps)
            checks["monotone_in_steps"] = {
                "passed": bool(long <= short + tol),
                "epsilon": self.check_epsilon,
                "iou": {str(pgd.num_steps): short, str(2 * pgd.num_steps): long},
                "reason": f"PGD with {2 * pgd.num_steps} steps ({long:.3f} IoU) is weaker than with {pgd.num_steps} "
                f"({short:.3f}) at epsilon {self.check_epsilon:g}",
            }
        # 3. a very large radius breaks the prediction
        large = self._mean("pgd", self.masking_epsilon, pgd.num_steps)
        checks["large_radius"] = {
            "passed": bool(large < 0.1),
            "epsilon": self.masking_epsilon,
            "iou": large,
            "reason": f"PGD at epsilon {self.masking_epsilon:g} leaves {large:.3f} IoU (expected near 0): the "
            "gradient does not lead the attack even where the image can be replaced",
        }
        # 4. noise is much weaker than the attack
        weak = []
        for eps, scores in ensemble.items():
            attacked = scores.summary(self.class_names)["mean_iou"]
            noise = self._mean("noise", eps)
            if noise is None or clean_iou - attacked < 0.05:
                continue
            if clean_iou - noise > 0.5 * (clean_iou - attacked):
                weak.append({"epsilon": eps, "noise_iou": noise, "attack_iou": attacked})
        checks["noise_weaker"] = _listed_check(
            weak,
            "uniform noise lowers IoU at least half as much as the attacks at ",
            lambda d: f"{d['epsilon']:g} (noise {d['noise_iou']:.3f}, attacks {d['attack_iou']:.3f})",
        )
        # 5. FGSM is not stronger than PGD
        stronger = []
        for eps in positive:
            fgsm, pgd_iou = self._mean("fgsm", eps), self._mean("pgd", eps, pgd.num_steps)
            if fgsm is not None and pgd_iou is not None and fgsm < pgd_iou - tol:
                stronger.append({"epsilon": eps, "fgsm_iou": fgsm, "pgd_iou": pgd_iou})
        checks["fgsm_not_stronger"] = _listed_check(
            stronger,
            "FGSM is stronger than PGD at ",
            lambda d: f"{d['epsilon']:g} ({d['fgsm_iou']:.3f} < {d['pgd_iou']:.3f})",
        )
        # 6. a transfer attack is not stronger than the white-box attacks
        if self.surrogate is not None:
            better = []
            for eps, scores in ensemble.items():
                white = scores.summary(self.class_names)["mean_iou"]
                transfer = self._mean("transfer", eps)
                if transfer is not None and transfer < white - tol:
                    better.append({"epsilon": eps, "transfer_iou": transfer, "white_box_iou": white})
            checks["transfer_not_stronger"] = _listed_check(
                better,
                "PGD made on the surrogate model is stronger than the white-box attacks at ",
                lambda d: f"{d['epsilon']:g} ({d['transfer_iou']:.3f} < {d['white_box_iou']:.3f})",
            )
        for check in checks.values():
            if check["passed"]:
                check["reason"] = None  # a reason is the text of a failed check
        return checks

    def _add_mlflow_artifacts(self) -> None:
        from monai.handlers import MLFlowHandler

        for handler in self.handlers:
            if isinstance(handler, MLFlowHandler):
                handler.artifacts = (*[a for a in handler.artifacts if a], *self.files)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table (attack, loss, epsilon, steps, restarts, IoU, Dice, pooled IoU)."""
    header = "attack    loss          epsilon steps rst  mean_iou mean_dice  pooled"
    lines = [header]
    lines += [
        f"{r['attack']:<9} {str(r.get('loss', ''))[:12]:<12} {r['epsilon']:>8.4g} {r['num_steps']:>5d} "
        f"{r.get('restarts', 1):>3d} {r['mean_iou']:>9.4f} {r['mean_dice']:>9.4f} {r.get('pooled_iou', math.nan):>7.4f}"
        for r in rows
    ]
    return "\n".join(lines)
