"""The paper's offline protocol (Fig. 1): write adversarial copies of a training set, plus a datalist that doubles it.

Train, then :class:`AdversarialDatasetWriter` (``run augment``) writes one FGSM and/or Inverse FGSM copy of every
training item with the trained network, and a Decathlon datalist (originals + copies for ``training``, the
validation items unchanged) that ``run training --datalist_file`` takes. The online
:class:`~monai_adv.handlers.AdversarialAugmentationHandler` is the other way to the same augmentation.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_adv.attacks.gradient_sign import ClampMode, LossFunction
from monai_adv.attacks.sweep import gradient_sign_sweep
from monai_adv.bundle.locks import FolderLock
from monai_adv.errors import SettingsError
from monai_adv.evaluation.robustness import load_network_weights

__all__ = ["NORMALIZED_KEY", "AdversarialDatasetWriter", "save_normalized_volume", "save_scaled_image"]

_DIRECTION = {"fgsm": "ascend", "invfgsm": "descend"}


def _stem(path: str) -> str:
    name = Path(str(path)).name
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


#: the datalist key of copies already in the preprocessing's normalised units (volume_preprocessing skips them)
NORMALIZED_KEY = "normalized"


def save_normalized_volume(
    array: torch.Tensor, path: str | os.PathLike, is_mask: bool = False, affine: Any = None
) -> str:
    """Write a preprocessed ``(C, *spatial)`` volume as it is (float32 NIfTI; masks uint8) with ``affine``, the
    affine of the preprocessed grid (MONAI's MetaTensor keeps it through orientation and padding, so the copy lies
    where its original lies in world coordinates).

    Returns:
        The path written (``.nii.gz`` added).
    """
    from monai.data import NibabelWriter

    data = torch.as_tensor(array).detach().float().cpu()
    out = Path(path).parent / (Path(path).name + ".nii.gz")
    writer = NibabelWriter(output_dtype=np.uint8 if is_mask else np.float32)
    writer.set_data_array((data.round().to(torch.uint8) if is_mask else data).numpy(), channel_dim=0)
    affine = None if affine is None else torch.as_tensor(affine).cpu().numpy()
    writer.set_metadata({"affine": affine, "original_affine": affine} if affine is not None else None)
    writer.write(out, verbose=False)
    return str(out)


def save_scaled_image(
    array: torch.Tensor,
    path: str | os.PathLike,
    intensity_range: Sequence[float] = (0.0, 255.0),
    is_mask: bool = False,
    affine: Any = None,
) -> str:
    """Write a preprocessed ``(C, *spatial)`` image (scaled to [0, 1]) or {0, 1} mask so that the bundle reloads it.

    With ``intensity_range=(0, 255)``: an 8-bit PNG (``round(255 * x)``; masks {0, 255}) through MONAI's
    ``PILWriter``, the inverse of the ``PILReader`` that ``LoadImaged`` uses, so axes come back in the same order.
    Otherwise: NIfTI through ``NibabelWriter``, images as float32 in the original units
    (``low + x * (high - low)``), masks as uint8.

    Args:
        array: the image or mask.
        path: the file path without suffix (``.png`` or ``.nii.gz`` is added).
        intensity_range: ``(low, high)`` of the fixed scaling the bundle's preprocessing applies.
        is_mask: write a mask.
        affine: the NIfTI affine, or None.

    Returns:
        The path written.
    """
    from monai.data import NibabelWriter, PILWriter

    low, high = (float(v) for v in intensity_range)
    data = torch.as_tensor(array).detach().float().cpu()
    path = Path(path)
    if (low, high) == (0.0, 255.0):
        values = (data * 255.0).round().clamp(0, 255).to(torch.uint8)
        writer = PILWriter(output_dtype=np.uint8, scale=None)
        writer.set_data_array(values.numpy(), channel_dim=0)
        out = path.parent / (path.name + ".png")
        writer.write(out, verbose=False)
        return str(out)
    out = path.parent / (path.name + ".nii.gz")
    if is_mask:
        writer, values = NibabelWriter(output_dtype=np.uint8), data.to(torch.uint8)
    else:
        writer, values = NibabelWriter(output_dtype=np.float32), low + data * (high - low)
    writer.set_data_array(values.numpy(), channel_dim=0)
    affine = None if affine is None else torch.as_tensor(affine).cpu().numpy()
    writer.set_metadata({"affine": affine, "original_affine": affine} if affine is not None else None)
    writer.write(out, verbose=False)
    return str(out)


class AdversarialDatasetWriter:
    """Write adversarial copies of a training set and the doubled datalist.

    Each copy is written at the preprocessed spatial size. With ``intensity_range=(0, 255)`` (the bundle's
    2D default: a fixed scaling to [0, 1]) it is an 8-bit PNG ``round(255 * x_adv)``, which the bundle's
    preprocessing reads back within 1/255 (half a level of rounding) of ``x_adv``. With another fixed range
    (e.g. CT in Hounsfield units) it is a float32 NIfTI in the original units. The mask goes alongside at the
    same size ({0, 255} PNG, or uint8 NIfTI). Per-image min/max scaling (``intensity_range=None``) would
    rescale the perturbation on reload, so it is refused.

    Files: ``output_dir/images/<id>_<method>.<ext>``, ``output_dir/masks/<id>_<method>.<ext>``, and
    ``output_dir/datalist.json`` (all methods) plus ``output_dir/datalist_<method>.json`` per method.

    Args:
        network: the trained network.
        loss_function: the training loss (the attack's objective).
        data_loader: loader over the preprocessed training items, not shuffled, in the order of ``training``.
        training: the training items (dicts with ``image`` and ``label`` paths) the loader reads.
        validation: the validation items, copied into the datalists unchanged.
        output_dir: where to write.
        methods: ``"fgsm"`` and/or ``"invfgsm"``.
        epsilon: the perturbation size, in the scaled [0, 1] units.
        intensity_range: ``(a_min, a_max)`` of the fixed scaling the preprocessing applies, or None.
        checkpoint: weights to load into ``network`` first, or None.
        device: the network's device.
        clamp, value_range: value bounds of the adversarial images (see the core).
        amp: attack under ``torch.autocast``.
        image_key, label_key: keys of the batch and items.
        normalized_copies: write each copy as it is, in the preprocessing's normalised units (z-scored volumes),
            as a float32 NIfTI on the preprocessed grid with its affine, and flag it ``"normalized": true`` in the
            datalists, so that :func:`~monai_adv.data.volume_preprocessing` does not normalise it again (it then
            reloads as the adversarial volume itself). Needed when ``intensity_range`` is None.

    Raises:
        ValueError: for unknown methods, a negative epsilon, ``intensity_range=None`` without ``normalized_copies``,
            or a loader whose length
            differs from ``training``.
        FileNotFoundError: for a missing checkpoint.
    """

    def __init__(
        self,
        network: nn.Module,
        loss_function: LossFunction,
        data_loader: Any,
        training: Sequence[dict],
        validation: Sequence[dict],
        output_dir: str | os.PathLike,
        methods: Sequence[str] = ("fgsm",),
        epsilon: float = 0.1,
        intensity_range: Sequence[float] | None = (0.0, 255.0),
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        clamp: ClampMode = "range",
        value_range: Sequence[float] = (0.0, 1.0),
        amp: bool = False,
        image_key: str = "image",
        label_key: str = "label",
        normalized_copies: bool = False,
    ) -> None:
        methods = [methods] if isinstance(methods, str) else list(methods)
        unknown = [m for m in methods if m not in _DIRECTION]
        if unknown or not methods:
            raise ValueError(f"unknown augment method(s) {unknown or methods!r}: choose from {list(_DIRECTION)}.")
        if not float(epsilon) >= 0:
            raise ValueError(f"epsilon must be non-negative, got {epsilon!r}.")
        self.normalized_copies = bool(normalized_copies)
        if intensity_range is None and not self.normalized_copies:
            raise SettingsError(
                "run augment needs a fixed intensity scaling (intensity_range, e.g. [0, 255]): with per-image "
                "scaling (intensity_range null) reloading a saved copy rescales it and changes the perturbation. "
                "For volumes whose preprocessing skips the normalisation of flagged items "
                "(monai_adv.data.volume_preprocessing, configs/hippocampus.json), write normalized copies "
                "(normalized_copies=True)."
            )
        self.low, self.high = (0.0, 1.0) if intensity_range is None else (float(v) for v in intensity_range)
        if not self.low < self.high:
            raise ValueError(f"intensity_range must be (low, high) with low < high, got {list(intensity_range)}.")
        self.png = (self.low, self.high) == (0.0, 255.0)
        self.network, self.device = network, torch.device(device)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        if self.checkpoint is not None:
            load_network_weights(network, self.checkpoint, map_location=self.device)
        self.loss_function, self.data_loader = loss_function, data_loader
        self.training, self.validation = list(training), list(validation)
        self.output_dir = Path(output_dir)
        self.methods, self.epsilon = methods, float(epsilon)
        self.clamp, self.value_range, self.amp = clamp, tuple(value_range), amp
        self.image_key, self.label_key = image_key, label_key
        self.logger = logging.getLogger("AdversarialDatasetWriter")
        self.result: dict[str, Any] | None = None

    def _write(self, array: torch.Tensor, path: Path, is_mask: bool, affine: torch.Tensor | None = None) -> str:
        if self.normalized_copies:  # float32 NIfTI in the normalised units, on the preprocessed grid
            return save_normalized_volume(array, path, is_mask=is_mask, affine=affine)
        return save_scaled_image(array, path, (self.low, self.high), is_mask=is_mask, affine=affine)

    def run(self) -> dict[str, Any]:
        """Write the copies and the datalists, holding ``output_dir/augment.lock`` meanwhile.

        Returns:
            ``{"datalist": path, "datalists": {method: path}, "num_written": n}``.

        Raises:
            LockError: when another augmentation is writing into ``output_dir``.
        """
        lock = FolderLock(
            self.output_dir,
            "augment.lock",
            "augmentation",
            "write into another folder (--augment_dir DIR)",
            info={"checkpoint": self.checkpoint, "methods": ",".join(self.methods), "epsilon": self.epsilon},
        )
        with lock:
            previous = self.output_dir / "datalist.json"
            if previous.is_file():
                self.logger.warning("replacing the adversarial copies and datalists in %s", self.output_dir)
            self.result = self._run()
            return self.result

    def require_written(self) -> dict[str, Any]:
        """The bundle's ``run augment`` finalize step: fail when :meth:`run` never ran.

        ``augment`` is both the workflow's id and the training setting ``--augment``: on the command line of
        ``run augment``, ``--augment standard`` replaces the workflow's run list, and MONAI would then finish
        without writing anything.

        Raises:
            SettingsError: when nothing was written, saying why and what to do.
        """
        if self.result is None:
            raise SettingsError(
                f"run augment wrote no adversarial copies into {self.output_dir}: its run list was replaced, most "
                "likely by --augment on the command line (augment is also the name of this workflow). Leave "
                "--augment out of run augment: the copies are made of the training images without the random "
                "training augmentation."
            )
        return self.result

    def _run(self) -> dict[str, Any]:
        from monai.utils import optional_import

        tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
        for folder in ("images", "masks"):
            (self.output_dir / folder).mkdir(parents=True, exist_ok=True)
        copies: dict[str, list[dict]] = {m: [] for m in self.methods}
        index = 0
        batches = tqdm(self.data_loader, desc="augment") if has_tqdm else self.data_loader
        for batch in batches:
            images = batch[self.image_key].to(self.device)
            labels = batch[self.label_key].to(self.device)
            swept = gradient_sign_sweep(
                self.network,
                self.loss_function,
                torch.as_tensor(images),
                torch.as_tensor(labels),
                [self.epsilon],
                [_DIRECTION[m] for m in self.methods],
                clamp=self.clamp,
                value_range=self.value_range,
                amp=self.amp,
            )
            batch_affine = getattr(images, "affine", None)  # MetaTensor batches carry (B, 4, 4) affines
            if batch_affine is None or batch_affine.ndim != 3:
                affines = [batch_affine] * images.shape[0]
            else:
                affines = list(batch_affine)
            for b in range(images.shape[0]):
                if index >= len(self.training):
                    raise ValueError(f"the data loader yields more items than the {len(self.training)} training items.")
                item = self.training[index]
                stem = str(item.get("id") or _stem(item[self.image_key]))
                for method in self.methods:
                    adv = swept[_DIRECTION[method]][0][b]
                    name = f"{stem}_{method}"
                    image_path = self._write(adv, self.output_dir / "images" / name, False, affines[b])
                    mask_path = self._write(labels[b], self.output_dir / "masks" / name, True, affines[b])
                    copy = {"image": image_path, "label": mask_path, "id": name}
                    if self.normalized_copies:
                        copy[NORMALIZED_KEY] = True  # the preprocessing must not normalise it again
                    copies[method].append(copy)
                index += 1
        if index != len(self.training):
            raise ValueError(f"the data loader yielded {index} items for {len(self.training)} training items.")
        originals = [{k: v for k, v in item.items() if isinstance(v, (str, int, float))} for item in self.training]
        validation = [{k: v for k, v in item.items() if isinstance(v, (str, int, float))} for item in self.validation]
        datalists = {}
        for method in self.methods:
            datalists[method] = self._write_datalist(f"datalist_{method}.json", originals + copies[method], validation)
        everything = originals + [c for m in self.methods for c in copies[m]]
        path = self._write_datalist("datalist.json", everything, validation)
        self.logger.info("wrote %d adversarial copies and %s", index * len(self.methods), path)
        return {"datalist": path, "datalists": datalists, "num_written": index * len(self.methods)}

    def _write_datalist(self, name: str, training: list[dict], validation: list[dict]) -> str:
        path = self.output_dir / name
        payload = {
            "description": f"originals + adversarial copies ({', '.join(self.methods)}, epsilon {self.epsilon:g})",
            "checkpoint": self.checkpoint,
            "training": training,
            "validation": validation,
        }
        path.write_text(json.dumps(payload, indent=2) + "\n")
        return str(path)
