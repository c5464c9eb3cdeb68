"""Robustness of a segmentation checkpoint: IoU and Dice on clean and attacked images, for several epsilons.

:class:`RobustnessEvaluator` is an Ignite engine over a validation loader (one iteration per batch), so
that MONAI's handlers (``ProgressBar``, ``MLFlowHandler`` added by ``--tracking mlflow``) attach to it as to
any evaluator. The attacks come from the core: FGSM and Inverse FGSM share one input gradient per batch
(:func:`monai_adv.attacks.sweep.gradient_sign_sweep`), PGD is :func:`~monai_adv.attacks.gradient_sign_attack`
with ``num_steps`` steps and a random start.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot
from monai.utils import convert_to_tensor
from torch import nn

from monai_adv.attacks.gradient_sign import ClampMode, LossFunction, gradient_sign_attack
from monai_adv.attacks.sweep import check_epsilons, gradient_sign_sweep
from monai_adv.evaluation.figures import plot_robustness_curve, save_example_grid

__all__ = ["ATTACKS", "DEFAULT_EPSILONS", "RobustnessEvaluator", "format_table", "load_network_weights"]

ATTACKS = ("fgsm", "invfgsm", "pgd")
DEFAULT_EPSILONS = (0.0, 0.0012, 0.0118, 0.1176, 0.2)
_DIRECTION = {"fgsm": "ascend", "invfgsm": "descend"}
_NAMES = {"fgsm": "FGSM", "invfgsm": "InvFGSM", "pgd": "PGD"}


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


class RobustnessEvaluator(Engine):
    """Evaluate a network on clean and adversarial versions of a validation set.

    Every batch is attacked with the ground-truth labels and the training loss (white box, as in
    Pervin et al.). Metrics are those of the bundle's validation: softmax, argmax, one-hot, then the mean over
    images of foreground IoU (``MeanIoU(include_background=False)``) and Dice, so the epsilon-0 row equals
    ``run evaluating`` on the same checkpoint. Inverse FGSM lowers the loss using the true label: it is the
    paper's measurement, not a threat model.

    When the run completes it writes, under ``output_dir``: ``robustness.json``
    (``{"checkpoint", "num_images", "results": [{"attack", "epsilon", "num_steps", "mean_iou", "mean_dice"}]}``),
    ``robustness.csv``, ``robustness.png`` (IoU against epsilon) and, with ``num_examples > 0``,
    ``robustness_examples.png`` (input, FGSM and InvFGSM images, amplified difference, label, predictions).
    It also puts ``robust_iou/<attack>/eps_<e>`` into ``state.metrics`` and adds the files to the artifacts of
    any attached ``MLFlowHandler``.

    Args:
        network: the segmentation network (weights already loaded, or see ``checkpoint``).
        loss_function: the training loss, used for the attacks.
        data_loader: validation loader of dicts with ``image_key`` and ``label_key`` (labels ``(B, 1, ...)``, {0, 1}).
        output_dir: where the files go (created).
        device: the network's device.
        checkpoint: path of the weights to load into ``network`` first (recorded in the JSON), or None.
        attacks: any of ``"fgsm"``, ``"invfgsm"``, ``"pgd"``.
        epsilons: L-infinity sizes in the scaled image units; 0 is the clean score.
        pgd_steps: PGD steps (step size ``2.5 * epsilon / pgd_steps``).
        pgd_random_start: start PGD at a random point of the epsilon ball.
        num_classes: output channels of the network.
        clamp: value bounds of the attacked images (``"range"``, ``"image"`` or ``"none"``).
        value_range: bounds for ``clamp="range"``.
        num_examples: rows of the example grid (0: no grid).
        example_epsilon: epsilon of the example grid (default: the largest of ``epsilons``).
        handlers: Ignite/MONAI handlers to attach (e.g. ``MLFlowHandler``, ``ProgressBar``).
        seed: seed of the PGD random starts.
        amp: attack and predict under ``torch.autocast``.
        image_key, label_key: keys of the batch.

    Raises:
        ValueError: for an unknown attack, bad epsilons or PGD steps.
        FileNotFoundError: for a missing checkpoint.
    """

    def __init__(
        self,
        network: nn.Module,
        loss_function: LossFunction,
        data_loader: Any,
        output_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        checkpoint: str | os.PathLike | None = None,
        attacks: Sequence[str] = ATTACKS,
        epsilons: Sequence[float] = DEFAULT_EPSILONS,
        pgd_steps: int = 10,
        pgd_random_start: bool = True,
        num_classes: int = 2,
        clamp: ClampMode = "range",
        value_range: Sequence[float] = (0.0, 1.0),
        num_examples: int = 4,
        example_epsilon: float | None = None,
        handlers: Sequence[Any] = (),
        seed: int = 0,
        amp: bool = False,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        attacks = [attacks] if isinstance(attacks, str) else list(attacks)
        unknown = [a for a in attacks if str(a).lower() not in ATTACKS]
        if unknown or not attacks:
            raise ValueError(f"unknown attack(s) {unknown or attacks!r}: choose from {list(ATTACKS)}.")
        self.attacks = [str(a).lower() for a in attacks]
        self.epsilons = check_epsilons(epsilons)
        if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
            raise ValueError(f"pgd_steps must be a positive integer, got {pgd_steps!r}.")
        self.network = network
        self.device = torch.device(device)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        if self.checkpoint is not None:
            load_network_weights(network, self.checkpoint, map_location=self.device)
        super().__init__(self._iteration)
        self.loss_function = loss_function
        self.data_loader = data_loader
        self.output_dir = Path(output_dir)
        self.pgd_steps = pgd_steps
        self.pgd_random_start = pgd_random_start
        self.num_classes = num_classes
        self.clamp = clamp
        self.value_range = tuple(value_range)
        self.num_examples = int(num_examples)
        self.example_epsilon = max(self.epsilons) if example_epsilon is None else float(example_epsilon)
        self.seed = seed
        self.amp = amp
        self.image_key, self.label_key = image_key, label_key
        self.logger = logging.getLogger("RobustnessEvaluator")
        self.rows: list[dict[str, Any]] = []
        self.files: list[str] = []
        self._generator = torch.Generator(device=self.device)
        self._metrics: dict[tuple[str, float], tuple[MeanIoU, DiceMetric]] = {}
        self._examples: dict[str, list[torch.Tensor]] = {}
        self._num_images = 0
        # Registered before any handler attaches, so that the files exist when MLFlowHandler logs artifacts.
        self.add_event_handler(Events.STARTED, self._reset)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._finish)
        self.handlers = list(handlers or ())
        for handler in self.handlers:
            handler.attach(self)

    def run(self, data: Any = None, max_epochs: int = 1, **kwargs: Any):
        return super().run(self.data_loader if data is None else data, max_epochs=max_epochs, **kwargs)

    def _reset(self) -> None:
        self._generator.manual_seed(self.seed)
        self._metrics = {
            (attack, eps): (MeanIoU(include_background=False), DiceMetric(include_background=False))
            for attack in self.attacks
            for eps in self.epsilons
        }
        self._examples, self._num_images, self.rows = {}, 0, []

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        """One-hot prediction as in the bundle's validation postprocessing (softmax, argmax, one-hot)."""
        with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=self.amp):
            logits = self.network(images)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return one_hot(torch.softmax(logits.float(), dim=1).argmax(dim=1, keepdim=True), self.num_classes)

    def _adversarial(self, images: torch.Tensor, labels: torch.Tensor) -> dict[tuple[str, float], torch.Tensor]:
        out: dict[tuple[str, float], torch.Tensor] = {}
        positive = [e for e in self.epsilons if e > 0]
        single = [a for a in self.attacks if a in _DIRECTION]
        if positive and single:
            swept = gradient_sign_sweep(
                self.network,
                self.loss_function,
                images,
                labels,
                positive,
                [_DIRECTION[a] for a in single],
                clamp=self.clamp,
                value_range=self.value_range,
                amp=self.amp,
            )
            for attack in single:
                out.update({(attack, e): x for e, x in zip(positive, swept[_DIRECTION[attack]])})
        if "pgd" in self.attacks:
            for eps in positive:
                out["pgd", eps] = gradient_sign_attack(
                    self.network,
                    self.loss_function,
                    images,
                    labels,
                    eps,
                    "ascend",
                    num_steps=self.pgd_steps,
                    random_start=self.pgd_random_start,
                    clamp=self.clamp,
                    value_range=self.value_range,
                    amp=self.amp,
                    generator=self._generator,
                ).images
        return out

    def _iteration(self, engine: Engine, batch: dict) -> dict:
        # plain tensors: metadata tracking would only slow the many forward passes down
        images = convert_to_tensor(batch[self.image_key], track_meta=False).to(self.device)
        labels = convert_to_tensor(batch[self.label_key], track_meta=False).to(self.device)
        self.network.eval()
        target = one_hot(labels.round().long(), self.num_classes)
        clean = self._predict(images)
        adversarial = self._adversarial(images, labels)
        predictions: dict[tuple[str, float], torch.Tensor] = {}
        for (attack, eps), (iou, dice) in self._metrics.items():
            pred = clean if eps == 0 else predictions.setdefault((attack, eps), self._predict(adversarial[attack, eps]))
            iou(y_pred=pred, y=target)
            dice(y_pred=pred, y=target)
        self._collect_examples(images, labels, clean, adversarial)
        self._num_images += images.shape[0]
        return {}

    def _collect_examples(self, images, labels, clean, adversarial) -> None:
        take = min(self.num_examples - self._num_images, images.shape[0])
        if take <= 0:
            return
        eps = self.example_epsilon
        columns = {"input": images, "label": labels, "prediction (clean)": clean[:, 1:]}
        for attack in ("fgsm", "invfgsm"):
            if (attack, eps) not in adversarial and eps > 0:
                continue
            adv = images if eps == 0 else adversarial[attack, eps]
            name = _NAMES[attack]
            columns[f"{name} eps={eps:g}"] = adv
            # the signed difference scaled so that -eps..eps spans the grey range (mid grey: unchanged)
            columns[f"{name} - input (amplified)"] = ((adv - images) / (2 * eps) + 0.5).clamp(0, 1) if eps > 0 else adv
            columns[f"prediction ({name})"] = self._predict(adv)[:, 1:]
        for name, value in columns.items():
            self._examples.setdefault(name, []).extend(v.detach().cpu() for v in value[:take])

    def _finish(self) -> None:
        for (attack, eps), (iou, dice) in self._metrics.items():
            steps = self.pgd_steps if attack == "pgd" and eps > 0 else (0 if eps == 0 else 1)
            row = {
                "attack": attack,
                "epsilon": eps,
                "num_steps": steps,
                "mean_iou": float(iou.aggregate().item()),
                "mean_dice": float(dice.aggregate().item()),
            }
            self.rows.append(row)
            self.state.metrics[f"robust_iou/{attack}/eps_{eps:g}"] = row["mean_iou"]
            self.state.metrics[f"robust_dice/{attack}/eps_{eps:g}"] = row["mean_dice"]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summary = {"checkpoint": self.checkpoint, "num_images": self._num_images, "results": self.rows}
        json_path = self.output_dir / "robustness.json"
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
        csv_path = self.output_dir / "robustness.csv"
        with open(csv_path, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        self.files = [str(json_path), str(csv_path)]
        self.files.append(
            plot_robustness_curve(self.rows, self.output_dir / "robustness.png", f"{self._num_images} images")
        )
        if self._examples:
            self.files.append(save_example_grid(self._examples, self.output_dir / "robustness_examples.png"))
        self._add_mlflow_artifacts()
        table = format_table(self.rows)
        self.logger.info("robustness of %s on %d images: wrote %s", self.checkpoint, self._num_images, self.files)
        print(table, flush=True)

    def _add_mlflow_artifacts(self) -> None:
        from monai.handlers import MLFlowHandler

        for handler in self.handlers:
            if isinstance(handler, MLFlowHandler):
                handler.artifacts = (*[a for a in handler.artifacts if a], *self.files)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table (attack, epsilon, steps, IoU, Dice)."""
    lines = [f"{'attack':<8} {'epsilon':>8} {'steps':>5} {'mean_iou':>9} {'mean_dice':>9}"]
    lines += [
        f"{r['attack']:<8} {r['epsilon']:>8g} {r['num_steps']:>5d} {r['mean_iou']:>9.4f} {r['mean_dice']:>9.4f}"
        for r in rows
    ]
    return "\n".join(lines)
