"""Drive the bundle workflows for every arm and seed, and collect what they measured.

Each step is a ``monai.bundle.run`` call in this process (the same workflow as ``python -m monai.bundle run``,
without paying the import time 30 times); the equivalent command line of every step is logged.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_adv.reproduce.profiles import Profile

__all__ = ["ARMS", "BUNDLE_DIR", "Reproduction", "paper_epochs"]

BUNDLE_DIR = Path(__file__).resolve().parents[2] / "bundles" / "adversarial_unet_segmentation"
# arm -> (online adversarial method or "none", offline method or None)
ARMS: dict[str, tuple[str, str | None]] = {
    "unet": ("none", None),
    "fgsm_online": ("fgsm", None),
    "invfgsm_online": ("invfgsm", None),
    "fgsm_offline": ("none", "fgsm"),
    "invfgsm_offline": ("none", "invfgsm"),
}
ARM_LABELS = {
    "unet": "UNet",
    "fgsm_online": "UNet + FGSM (online)",
    "invfgsm_online": "UNet + InvFGSM (online)",
    "fgsm_offline": "UNet + FGSM (offline, Fig. 1)",
    "invfgsm_offline": "UNet + InvFGSM (offline, Fig. 1)",
}
PAPER_EPOCHS = (0, 10, 20, 30)
logger = logging.getLogger("monai_adv.reproduce")


def paper_epochs(max_epochs: int) -> dict[int, int]:
    """The paper's epochs 0/10/20/30 (of 30) mapped to 1-based epochs of a run of ``max_epochs``.

    The paper's "epoch 0" is read as the first completed epoch (there is no validation before training here).
    """
    return {p: min(max_epochs, max(1, round(p * max_epochs / 30))) for p in PAPER_EPOCHS}


def _plain(item: dict) -> dict:
    return {k: v for k, v in item.items() if isinstance(v, (str, int, float))}


class Reproduction:
    """One reproduction run: data preparation, the five arms for every seed, robustness, and the raw results.

    Args:
        dataset_dir: ``images/`` + ``masks/`` (+ ``split.json`` with ``train``/``validation``/``test`` ids).
        profile: the :class:`Profile`.
        seeds: training seeds.
        work_dir: where bundle roots, prepared data and logs go.
        max_epochs: override the profile's training length.
        bundle_dir: the bundle whose configs run.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        profile: Profile,
        seeds: Sequence[int],
        work_dir: str | os.PathLike,
        max_epochs: int | None = None,
        bundle_dir: str | os.PathLike = BUNDLE_DIR,
    ) -> None:
        self.dataset_dir = Path(dataset_dir)
        if not (self.dataset_dir / "images").is_dir() or not (self.dataset_dir / "masks").is_dir():
            raise FileNotFoundError(f"dataset_dir {self.dataset_dir} must hold images/ and masks/.")
        if not seeds:
            raise ValueError("give at least one seed.")
        self.profile, self.seeds = profile, [int(s) for s in seeds]
        self.max_epochs = int(max_epochs or profile.max_epochs)
        self.work_dir = Path(work_dir)
        self.configs = Path(bundle_dir) / "configs"
        self.timings: dict[str, float] = {}
        self.commands: list[str] = []
        #: bundle roots of the steps skipped because they had already run (resume)
        self.resumed: list[str] = []

    # -- bundle calls -------------------------------------------------------------------------------------------
    def _config_files(self, *overlays: str) -> list[str]:
        names = ["train.json", *self.profile.extra_configs, *overlays]
        return [str(self.configs / n) for n in names]

    def _bundle(self, run_id: str, overlays: Sequence[str], root: Path, tracking: bool, **overrides: Any) -> float:
        from monai.bundle import run

        settings = {**self.profile.overrides, **overrides}
        files = self._config_files(*overlays)
        cli = self._command(run_id, overlays, root, tracking, overrides)
        self.commands.append(cli)
        logger.info("running: %s", cli)
        start = time.perf_counter()
        run(
            run_id=run_id, config_file=files, bundle_root=str(root), tracking="mlflow" if tracking else None, **settings
        )
        return time.perf_counter() - start

    def _command(
        self, run_id: str, overlays: Sequence[str], root: Path, tracking: bool, overrides: dict[str, Any]
    ) -> str:
        """The step as a shell command, for the log and the results page."""
        settings = {**self.profile.overrides, **overrides}
        listed = "[" + ",".join(f"'{f}'" for f in self._config_files(*overlays)) + "]"
        cli = f'python -m monai.bundle run {run_id} --config_file "{listed}" --bundle_root {shlex.quote(str(root))}'
        cli += " --tracking mlflow" if tracking else ""
        for key, value in settings.items():
            text = json.dumps(value, separators=(",", ":")) if isinstance(value, (list, tuple)) else str(value)
            cli += f" --{key} {shlex.quote(text)}"
        return cli

    # -- data -----------------------------------------------------------------------------------------------------
    def split(self) -> dict[str, list[dict]]:
        """Train/validation/test items: ``split.json``'s lists when it has a ``test`` list, else a seeded 80/10/10."""
        from monai_adv.data import datalist_from_folders, split_datalist

        items = datalist_from_folders(self.dataset_dir)
        split_file = self.dataset_dir / "split.json"
        if split_file.is_file() and "test" in json.loads(split_file.read_text()):
            split = json.loads(split_file.read_text())
            by_id = {item["id"]: item for item in items}
            parts = {}
            for part, keys in (
                ("train", ("train", "training")),
                ("validation", ("validation", "val")),
                ("test", ("test",)),
            ):
                key = next(k for k in keys if k in split)
                missing = [i for i in split[key] if i not in by_id]
                if missing:
                    raise ValueError(f"{split_file} lists ids without an image/mask pair under {key!r}: {missing[:5]}.")
                parts[part] = [by_id[i] for i in split[key]]
        else:
            rest, test = split_datalist(items, 0.1, seed=0)
            train, validation = split_datalist(rest, 1 / 9, seed=1)
            parts = {"train": train, "validation": validation, "test": test}
        return {k: v[: self.profile.limits.get(k)] for k, v in parts.items()}

    def prepare(self) -> dict[str, Path]:
        """Write every used image once through the bundle's own preprocessing (load, binarise the mask, fixed
        [0, 255] scaling, area resize to ``image_size``) as 8-bit PNG, so that the ~20 bundle runs do not each
        decode the full-size JPEGs again. The bundle still loads and resizes these files (the resize is then the
        identity); the only change is 8-bit rounding after the resize (at most 0.5/255).

        Returns:
            ``{"validation": datalist path, "test": datalist path}``.
        """
        from monai.bundle import ConfigParser

        from monai_adv.evaluation import save_scaled_image

        start = time.perf_counter()
        parts = self.split()
        parser = ConfigParser()
        parser.read_config(self._config_files())
        parser.update({"bundle_root": str(self.work_dir), **self.profile.overrides})
        preprocess = parser.get_parsed_content("train#preprocessing")
        intensity_range = parser.get_parsed_content("intensity_range")
        if intensity_range is None:
            raise ValueError("the reproduction needs a fixed intensity scaling (intensity_range) to prepare the data.")
        size = parser.get_parsed_content("image_size")
        out = self.work_dir / "data" / f"prepared_{size}"
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "masks").mkdir(parents=True, exist_ok=True)
        prepared: dict[str, list[dict]] = {}
        for part, items in parts.items():
            prepared[part] = []
            for item in items:
                stem = item["id"]
                image, mask = out / "images" / stem, out / "masks" / stem
                if not (image.with_suffix(".png").is_file() and mask.with_suffix(".png").is_file()):
                    data = preprocess({"image": item["image"], "label": item["label"]})
                    save_scaled_image(data["image"], image, intensity_range)
                    save_scaled_image(data["label"], mask, intensity_range, is_mask=True)
                prepared[part].append({"image": f"{image}.png", "label": f"{mask}.png", "id": stem})
        datalists = {}
        for name, evaluate_on in (("validation", "validation"), ("test", "test")):
            path = self.work_dir / "data" / f"datalist_{name}.json"
            path.write_text(json.dumps({"training": prepared["train"], "validation": prepared[evaluate_on]}, indent=1))
            datalists[name] = path
        self.counts = {k: len(v) for k, v in prepared.items()}
        self.timings["prepare data"] = time.perf_counter() - start
        return datalists

    # -- the protocol ------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train every arm for every seed, write the offline copies, evaluate robustness on the test split.

        Returns:
            the raw results (also written to ``work_dir/raw_results.json``).
        """
        datalists = self.prepare()
        common = {"max_epochs": self.max_epochs, "val_interval": 1, "adv#epsilon": self.profile.adv_epsilon,
                  "adv#mode": "append", "num_workers": 0}  # fmt: skip
        results: dict[str, Any] = {"arms": {}, "seeds": self.seeds}
        for seed in self.seeds:
            seed_dir = self.work_dir / "runs" / f"seed{seed}"
            for arm, (online, offline) in ARMS.items():
                root = seed_dir / arm
                datalist = datalists["validation"]
                if offline is not None:
                    augment_dir = seed_dir / "offline_data"
                    if not (augment_dir / f"datalist_{offline}.json").is_file():
                        elapsed = self._bundle(
                            "augment", ["augment.json"], seed_dir / "unet", False, seed=seed,
                            datalist_file=str(datalist), augment_dir=str(augment_dir), **{"adv#method": "both"},
                            **{k: v for k, v in common.items() if k != "adv#mode"},
                        )  # fmt: skip
                        self.timings["offline augment (both methods)"] = (
                            self.timings.get("offline augment (both methods)", 0) + elapsed
                        )
                    datalist = augment_dir / f"datalist_{offline}.json"
                train_settings = {"seed": seed, "datalist_file": str(datalist), **common, "adv#method": online}
                elapsed = self._step(root / "training_done.json", "training", [], root, True, train_settings)
                self.timings[f"train {arm}"] = self.timings.get(f"train {arm}", 0) + elapsed
                robust_settings = {"seed": seed, "datalist_file": str(datalists["test"]),
                                   "output_dir": str(root / "robustness_test"), "num_steps": self.profile.attack_steps,
                                   "epsilons": list(self.profile.robust_epsilons),
                                   "iterative_epsilons": list(self.profile.iterative_epsilons),
                                   "num_examples": 4, "example_epsilon": self.profile.adv_epsilon}  # fmt: skip
                elapsed = self._step(
                    root / "robustness_test" / "done.json", "robustness", ["robustness.json"], root, False,
                    robust_settings,
                )  # fmt: skip
                self.timings["robustness (test split)"] = self.timings.get("robustness (test split)", 0) + elapsed
                results["arms"].setdefault(arm, {})[str(seed)] = self.collect(root)
        results["default_budget"] = self.default_budget(datalists["test"])
        results["counts"] = self.counts
        (self.work_dir / "raw_results.json").write_text(json.dumps(results, indent=1))
        return results

    def default_budget(self, test_datalist: Path) -> dict[str, Any]:
        """``run robustness`` with the bundle's default attacks, epsilons, steps and restarts on the test split, for
        the first seed's UNet arm: how long the default evaluation takes on this machine, and what it measures.

        Returns:
            ``{"seconds", "num_images", "num_steps", "restarts", "ensemble": {epsilon: IoU}, "checks", "suspect"}``.
        """
        seed = self.seeds[0]
        root = self.work_dir / "runs" / f"seed{seed}" / "unet"
        out = root / "robustness_default"
        defaults = json.loads((self.configs / "robustness.json").read_text())
        # the defaults written out, so that the command on the page says what ran and a changed default runs again
        budget = {key: defaults[key] for key in ("attacks", "epsilons", "num_steps", "restarts")}
        settings = {"seed": seed, "datalist_file": str(test_datalist), "output_dir": str(out), "num_examples": 0,
                    **budget}  # fmt: skip
        elapsed = self._step(out / "done.json", "robustness", ["robustness.json"], root, False, settings)
        self.timings["robustness with the default budget (UNet, first seed)"] = elapsed
        measured = json.loads((out / "robustness.json").read_text())
        rows = measured["results"]
        return {
            "seconds": elapsed,
            "num_images": measured["num_images"],
            "num_steps": max(r["num_steps"] for r in rows if r["attack"] == "pgd"),
            "restarts": max(r["restarts"] for r in rows if r["attack"] == "pgd"),
            "ensemble": {f"{r['epsilon']:g}": r["mean_iou"] for r in rows if r["attack"] == "ensemble"},
            "pgd": {f"{r['epsilon']:g}": r["mean_iou"] for r in rows if r["attack"] == "pgd"},
            "checks_failed": sorted(k for k, c in measured["checks"].items() if c.get("passed") is False),
            "suspect_gradient_masking": measured["suspect_gradient_masking"],
        }

    def _step(
        self, marker: Path, run_id: str, overlays: Sequence[str], root: Path, tracking: bool, settings: dict[str, Any]
    ) -> float:
        """Run a bundle workflow unless ``marker`` says it already ran with the same ``settings`` (resume).

        Returns:
            the step's seconds (those of the earlier run when it is skipped).

        The marker is written only after the step completed, so a step that was stopped is run again.
        """
        recorded = json.loads(json.dumps(settings, default=str))
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("settings") == recorded:
                self.commands.append(self._command(run_id, overlays, root, tracking, settings))
                self.resumed.append(str(marker.parent))
                logger.info("skipping a step that already ran (%s)", marker)
                return float(done["seconds"])
        elapsed = self._bundle(run_id, overlays, root, tracking, **settings)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"settings": recorded, "seconds": elapsed}, indent=1))
        return elapsed

    @staticmethod
    def collect(root: Path) -> dict[str, Any]:
        """What one arm's runs measured: validation IoU/Dice per epoch (from its MLflow store) and the test
        robustness rows (from ``robustness.json``; the epsilon-0 row is the clean test score of ``model.pt``)."""
        from mlflow.tracking import MlflowClient
        from monai.utils import path_to_sqlite_uri

        client = MlflowClient(path_to_sqlite_uri(str(root / "eval" / "mlruns.db")))
        history: dict[str, dict[int, float]] = {"val_mean_iou": {}, "val_mean_dice": {}}
        for experiment in client.search_experiments():
            for mlflow_run in client.search_runs([experiment.experiment_id]):
                for key, steps in history.items():
                    for metric in client.get_metric_history(mlflow_run.info.run_id, key):
                        steps[int(metric.step)] = float(metric.value)
        if not history["val_mean_iou"]:
            raise ValueError(f"no val_mean_iou was logged in {root / 'eval' / 'mlruns.db'}: did training validate?")
        robustness = json.loads((root / "robustness_test" / "robustness.json").read_text())
        return {
            "val_iou": {str(k): v for k, v in sorted(history["val_mean_iou"].items())},
            "val_dice": {str(k): v for k, v in sorted(history["val_mean_dice"].items())},
            "robustness": robustness["results"],
            "checks": robustness.get("checks", {}),
            "suspect_reasons": robustness.get("suspect_reasons", []),
            "num_test_images": robustness["num_images"],
            "root": str(root),
        }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0
