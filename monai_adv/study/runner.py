"""Run a study: for every seed and arm, the bundle workflows, each once (resume), and collect what their files say.

Each step is a ``monai.bundle.run`` call in this process (the same workflow as ``python -m monai.bundle run``,
without paying the import time for every step); the equivalent command line of every step is logged and kept.
A step writes a marker (its settings and seconds) only when it completed, so a study stopped at any point runs
again from the first step that did not complete, and a step whose settings changed runs again.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_adv.engines.recipes import recipe_preset
from monai_adv.errors import SettingsError
from monai_adv.hardware import machine_summary
from monai_adv.study.profiles import PROFILES, Profile
from monai_adv.study.spec import ARM_DEFAULTS, Arm, StudySpec

__all__ = ["StudyRunner", "find_bundle_dir"]

BUNDLE_NAME = "adversarial_unet_segmentation"
logger = logging.getLogger("monai_adv.study")


def find_bundle_dir(bundle_dir: str | os.PathLike | None = None) -> Path:
    """The bundle to run: ``bundle_dir``, else ``$MONAI_ADV_BUNDLE_DIR``, else ``bundles/<name>`` under the current
    folder or next to this source checkout.

    Raises:
        FileNotFoundError: when none holds ``configs/train.json``, saying to pass ``--bundle_dir``.
    """
    candidates = [Path(bundle_dir)] if bundle_dir else []
    if not bundle_dir:
        if os.environ.get("MONAI_ADV_BUNDLE_DIR"):
            candidates.append(Path(os.environ["MONAI_ADV_BUNDLE_DIR"]))
        candidates += [
            Path.cwd() / "bundles" / BUNDLE_NAME,
            Path(__file__).resolve().parents[2] / "bundles" / BUNDLE_NAME,
        ]
    for candidate in candidates:
        if (candidate / "configs" / "train.json").is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"no bundle found (looked for configs/train.json in {[str(c) for c in candidates]}): pass --bundle_dir "
        f"PATH/TO/{BUNDLE_NAME} (or set MONAI_ADV_BUNDLE_DIR)."
    )


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


#: settings that name places on this machine, not what is trained or measured
_PLACES = ("datalist_file", "init_ckpt", "augment_dir", "output_dir")

#: training settings that an evaluation of the trained model drops: every arm is scored alike, in float32 (amp off)
#: and without the training's augmentation, checkpoint or resume
_TRAINING_ONLY = ("augment", "init_ckpt", "resume", "amp")


def _without_arm_defaults(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` less the keys at their :data:`ARM_DEFAULTS` value, which is what the bundle trained before they
    were pinned: results and step markers written then still match."""
    return {k: v for k, v in settings.items() if not (k in ARM_DEFAULTS and v == ARM_DEFAULTS[k])}


def _fingerprint(steps: Sequence[tuple]) -> list[dict[str, Any]]:
    """What an arm's steps do, without the paths of this machine's work folder (results move between machines).

    A named recipe is recorded with the settings it stands for: a preset changed in
    :data:`monai_adv.engines.RECIPES` changes the fingerprint, so the arms that use it run again.
    """
    prints = []
    for step in steps:
        settings = {k: v for k, v in _without_arm_defaults(_json_ready(step[-1])).items() if k not in _PLACES}
        if "adv#recipe" in settings:
            preset = recipe_preset(settings["adv#recipe"])
            settings["adv#preset"] = _json_ready({k: v for k, v in preset.items() if k != "recipe"})
        prints.append({"step": step[0], **settings})
    return prints


class StudyRunner:
    """The workflows of one study on one dataset, and the raw results they wrote.

    Args:
        spec: the study.
        dataset_dir: ``images/`` + ``masks/`` (+ ``split.json`` with ``train``/``validation``/``test`` ids).
        seeds: training seeds; every arm runs for each.
        work_dir: bundle roots (``runs/seed<s>/<arm>``), prepared data and markers.
        bundle_dir: the bundle (default :func:`find_bundle_dir`).
        arms: run only these arms (and those they depend on); default all.
        tracking: ``--tracking mlflow`` for the trainings (a store per bundle root, in ``eval/mlruns.db``).
        max_epochs: override every arm's training length (for a quick look; arms that set their own keep theirs).
        results_file: the collected results, read to resume and written after every arm (default
            ``work_dir/raw_results.json``).
        code_version: recorded with each arm and seed this call runs (a study can span code versions).

    Raises:
        FileNotFoundError: when ``dataset_dir`` lacks ``images/`` or ``masks/``, or there is no bundle.
        SettingsError: for no seeds or unknown arms.
    """

    def __init__(
        self,
        spec: StudySpec,
        dataset_dir: str | os.PathLike,
        seeds: Sequence[int],
        work_dir: str | os.PathLike,
        bundle_dir: str | os.PathLike | None = None,
        arms: Sequence[str] | None = None,
        tracking: bool = True,
        max_epochs: int | None = None,
        results_file: str | os.PathLike | None = None,
        code_version: str | None = None,
    ) -> None:
        self.spec = spec
        self.code_version = code_version
        # absolute: the datalists name files by these paths, and the bundle reads them from other folders
        self.dataset_dir = Path(dataset_dir).resolve()
        has_folders = (self.dataset_dir / "images").is_dir() and (self.dataset_dir / "masks").is_dir()
        if not has_folders and not (self.dataset_dir / "dataset.json").is_file():
            raise FileNotFoundError(
                f"dataset_dir {self.dataset_dir} must hold images/ and masks/, or a Decathlon dataset.json."
            )
        if not seeds:
            raise SettingsError("give at least one seed (--seeds 0 1 2).")
        self.seeds = [int(s) for s in seeds]
        self.profile: Profile = PROFILES[spec.profile]
        self.work_dir = Path(work_dir).resolve()
        self.bundle_dir = find_bundle_dir(bundle_dir)
        self.configs = self.bundle_dir / "configs"
        self.arms = spec.select(list(arms) if arms else None)
        self.tracking = tracking
        self.max_epochs = max_epochs
        self.timings: dict[str, float] = {}
        self.commands: list[str] = []
        #: bundle roots of the steps skipped because they had already run (resume)
        self.resumed: list[str] = []
        #: the steps that ran in this call (not skipped)
        self.ran: list[str] = []
        self.counts: dict[str, int] = {}
        self.results_file = Path(results_file) if results_file else self.work_dir / "raw_results.json"
        self.results: dict[str, Any] = {}
        self.datalists: dict[str, Path] = {}

    # -- bundle calls -------------------------------------------------------------------------------------------
    def _config_files(self, *overlays: str) -> list[str]:
        names = ["train.json", *self.profile.extra_configs, *overlays]
        return [str(self.configs / n) for n in names]

    def _bundle(self, run_id: str, overlays: Sequence[str], root: Path, tracking: bool, settings: dict) -> float:
        from monai.bundle import run

        cli = self.command(run_id, overlays, root, tracking, settings)
        self.commands.append(cli)
        logger.info("running: %s", cli)
        start = time.perf_counter()
        run(run_id=run_id, config_file=self._config_files(*overlays), bundle_root=str(root),
            tracking="mlflow" if tracking else None, **settings)  # fmt: skip
        return time.perf_counter() - start

    def command(self, run_id: str, overlays: Sequence[str], root: Path, tracking: bool, settings: dict) -> str:
        """The step as a shell command, for the log and the results page."""
        listed = "[" + ",".join(f"'{f}'" for f in self._config_files(*overlays)) + "]"
        cli = f'python -m monai.bundle run {run_id} --config_file "{listed}" --bundle_root {shlex.quote(str(root))}'
        cli += " --tracking mlflow" if tracking else ""
        for key, value in settings.items():
            text = json.dumps(value, separators=(",", ":")) if isinstance(value, (list, tuple)) else str(value)
            cli += f" --{key} {shlex.quote(text)}"
        return cli

    def step(self, marker: Path, run_id: str, overlays: Sequence[str], root: Path, tracking: bool,
             settings: dict[str, Any]) -> float:  # fmt: skip
        """Run a bundle workflow unless ``marker`` says it already ran with the same ``settings`` (resume).

        A training (``run_id`` ``"training"``) stopped part way with the same settings continues from its latest
        readable checkpoint (the bundle's ``--resume true``); its seconds then add those its training history had
        recorded before the stop (the part of an epoch after the last checkpoint is not counted).

        Returns:
            the step's seconds (those of the earlier run when it is skipped).
        """
        recorded = _json_ready(settings)
        if marker.is_file():
            done = json.loads(marker.read_text())
            if _without_arm_defaults(done.get("settings", {})) == _without_arm_defaults(recorded):
                self.commands.append(self.command(run_id, overlays, root, tracking, settings))
                self.resumed.append(str(marker.parent))
                logger.info("skipping a step that already ran (%s)", marker)
                return float(done["seconds"])
            logger.info("running again with other settings (%s)", marker)
        earlier: float | None = None  # seconds of a stopped training that this step continues
        started = marker.with_name(marker.stem.replace("_done", "") + "_started.json")
        if run_id == "training":
            earlier = self._stopped_training_seconds(started, root, recorded)
            if earlier is not None:
                settings = {**settings, "resume": True}
            else:  # a fresh start: its checkpoints are the ones newer than this marker
                started.parent.mkdir(parents=True, exist_ok=True)
                started.write_text(json.dumps({"settings": recorded}, indent=1))
        elapsed = self._bundle(run_id, overlays, root, tracking, settings) + (earlier or 0.0)
        if run_id == "robustness":  # a run continued from its progress file: add the stopped runs' seconds
            elapsed += self._continued_robustness_seconds(marker.parent / "robustness.json")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"settings": recorded, "seconds": elapsed,
                                      **({"resumed": True} if earlier is not None else {})}, indent=1))  # fmt: skip
        started.unlink(missing_ok=True)
        self.ran.append(str(marker))
        return elapsed

    @staticmethod
    def _continued_robustness_seconds(path: Path) -> float:
        """The seconds that stopped runs had measured before ``run robustness`` continued from its progress file
        (``robustness.json``'s ``continued``; 0 for a run that did not continue, or an older file)."""
        try:
            continued = json.loads(path.read_text()).get("continued") or {}
            return float(continued.get("seconds", 0.0)) if isinstance(continued, dict) else 0.0
        except (OSError, ValueError, TypeError):
            return 0.0

    @staticmethod
    def _stopped_training_seconds(started: Path, root: Path, recorded: Mapping[str, Any]) -> float | None:
        """The seconds a stopped training of the same settings had recorded, when it can be continued (a readable
        checkpoint written after its ``started`` marker: an older one belongs to an earlier training, which the
        bundle moves aside only once the new one has started); else None (train from the start)."""
        from monai_adv.bundle.checkpoints import latest_checkpoint
        from monai_adv.bundle.training_run import CHECKPOINT_PATTERN

        if not started.is_file():
            return None
        try:
            same = _without_arm_defaults(json.loads(started.read_text()).get("settings", {}))
        except (OSError, ValueError):
            return None
        if same != _without_arm_defaults(recorded):
            return None
        try:
            checkpoint = latest_checkpoint(root / "models", CHECKPOINT_PATTERN)
        except (OSError, ValueError):  # no checkpoint written before the stop (or none readable)
            return None
        if Path(checkpoint).stat().st_mtime < started.stat().st_mtime:
            logger.info("%s is older than %s: it belongs to an earlier training, which is not continued",
                        checkpoint, started)  # fmt: skip
            return None
        history = root / "models" / "training_history.json"
        try:
            seconds = float(json.loads(history.read_text())["total"]["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            seconds = 0.0
        logger.info("continuing a stopped training from %s (%.0f s recorded before the stop)", checkpoint, seconds)
        return seconds

    # -- data -----------------------------------------------------------------------------------------------------
    def split(self) -> dict[str, list[dict]]:
        """Train/validation/test items: ``split.json``'s lists when it has a ``test`` list, else a seeded 80/10/10,
        cut to the profile's limits.

        Raises:
            ValueError: for a ``split.json`` that :func:`~monai_adv.data.split_by_file` refuses (naming the key).
        """
        from monai_adv.data import dataset_items, split_by_file, split_datalist

        items = dataset_items(self.dataset_dir)
        split_file = self.dataset_dir / "split.json"
        train, validation, test = split_by_file(items, split_file) if split_file.is_file() else (None, None, None)
        if test is None:
            # no fixed test list: a seeded 80/10/10 of every item
            rest, test = split_datalist(items, 0.1, seed=0)
            train, validation = split_datalist(rest, 1 / 9, seed=1)
        parts = {"train": train, "validation": validation, "test": test}
        return {k: v[: self.profile.limits.get(k)] for k, v in parts.items()}

    def prepare(self) -> dict[str, Path]:
        """Write every used 2D image once through the bundle's own preprocessing (load, binarise the mask, fixed
        [0, 255] scaling, area resize to ``image_size``) as 8-bit PNG, so that the bundle runs do not each decode
        the full-size JPEGs again. The bundle still loads and resizes these files (the resize is then the
        identity); the only change is 8-bit rounding after the resize (at most 0.5/255). Volumes (3D, or a
        per-image intensity scaling) are not prepared: the datalists name the original files.

        Returns:
            ``{"validation": datalist path, "test": datalist path}`` (training items in both).
        """
        from monai.bundle import ConfigParser
        from monai.transforms import Compose

        from monai_adv.evaluation import save_scaled_image

        start = time.perf_counter()
        parts = self.split()
        parser = ConfigParser()
        parser.read_config(self._config_files())
        parser.update({"bundle_root": str(self.work_dir), **self.profile.overrides, **self._data_settings()})
        intensity_range = parser.get_parsed_content("intensity_range")
        if intensity_range is None or parser.get_parsed_content("spatial_dims") != 2:
            # volumes (z-scored per volume): the bundle reads the original files, each workflow preprocesses them
            return self._datalists({part: [dict(item) for item in items] for part, items in parts.items()}, start)
        preprocess = Compose(parser.get_parsed_content("preprocessing"))  # the shared part: no random augmentation
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
        return self._datalists(prepared, start)

    def _datalists(self, prepared: dict[str, list[dict]], start: float) -> dict[str, Path]:
        (self.work_dir / "data").mkdir(parents=True, exist_ok=True)
        # a Decathlon dataset.json's class names go with the datalists: the bundle keys its per-class scores by them
        decathlon = self.dataset_dir / "dataset.json"
        labels = json.loads(decathlon.read_text()).get("labels") if decathlon.is_file() else None
        datalists = {}
        for name in ("validation", "test"):
            path = self.work_dir / "data" / f"datalist_{name}.json"
            listed = {
                "training": prepared["train"],
                "validation": prepared[name],
                **({"labels": labels} if labels else {}),
            }
            path.write_text(json.dumps(listed, indent=1))
            datalists[name] = path
        self.counts = {k: len(v) for k, v in prepared.items()}
        self.timings["prepare data"] = time.perf_counter() - start
        return datalists

    def _data_settings(self) -> dict[str, Any]:
        """The study's overrides that shape the data (image size, intensity range)."""
        return {k: v for k, v in self.spec.overrides.items() if k in ("image_size", "intensity_range")}

    # -- the study ---------------------------------------------------------------------------------------------
    def root(self, seed: int, arm: str) -> Path:
        """The bundle root of one arm and seed."""
        return self.work_dir / "runs" / f"seed{seed}" / arm

    def training_settings(self, arm: Arm, seed: int, datalist: Path) -> dict[str, Any]:
        """Every override of one arm's training: :data:`ARM_DEFAULTS`, the profile's, the study's, the arm's, then
        seed and data."""
        settings = {**ARM_DEFAULTS, **self.profile.overrides, "val_interval": 1, "num_workers": 0,
                    **self.spec.overrides}  # fmt: skip
        if self.max_epochs is not None:
            settings["max_epochs"] = self.max_epochs
        settings.update(arm.overrides)
        settings.update({"seed": seed, "datalist_file": str(datalist)})
        return settings

    def run(self) -> dict[str, Any]:
        """Train, (offline) augment and evaluate every selected arm for every seed, skipping what already ran.

        An arm and seed is skipped when ``results_file`` holds its results with the same settings (a study can be
        continued from the committed results alone, without the bundle roots), or else step by step when its
        bundle root holds the markers of completed steps with the same settings. An arm that builds on another's
        model (``offline``, ``init_from``) whose ``model.pt`` is no longer there trains that arm again first.

        Returns:
            the raw results (also in ``results_file``): ``{"arms": {arm: {seed: collected}}, "seeds", "counts",
            "study"}``.
        """
        self.datalists = self.prepare()
        self.results = json.loads(self.results_file.read_text()) if self.results_file.is_file() else {}
        self.results.setdefault("arms", {})
        for seed in self.seeds:
            for arm in self.arms:
                self._arm_results(arm, seed)
        return self.results

    def current_results(self, results: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The results that the study as specified now would produce: an arm and seed whose fingerprint differs
        from its current plan (another length, recipe or robustness setting) is left out, so that a page never
        compares runs of different settings. Arms not in the study are left out too.

        Returns:
            ``(results without the stale entries, ["arm (seed s, why)", ...] left out)``.
        """
        if not self.datalists:
            # the fingerprint leaves paths out: placeholders plan the same steps without preparing the data
            self.datalists = {"validation": self.work_dir / "validation.json", "test": self.work_dir / "test.json"}
        current: dict[str, Any] = {**results, "arms": {}}
        stale = []
        for name, runs in results.get("arms", {}).items():
            arm = next((a for a in self.spec.arms if a.name == name), None)
            for seed, result in runs.items():
                if arm is not None and result.get("fingerprint") == _fingerprint(self.plan(arm, int(seed))):
                    current["arms"].setdefault(name, {})[seed] = result
                elif arm is None:
                    stale.append(f"{name} (seed {seed}, no longer an arm of the study)")
                else:
                    stale.append(f"{name} (seed {seed}, run with other settings than the study's: it runs again)")
        current["seeds"] = sorted({int(s) for runs in current["arms"].values() for s in runs})
        return current, stale

    def _arm_results(self, arm: Arm, seed: int, force: bool = False) -> dict[str, Any]:
        steps = self.plan(arm, seed)
        fingerprint = _fingerprint(steps)
        known = self.results["arms"].get(arm.name, {}).get(str(seed))
        if not force and known is not None and known.get("fingerprint") == fingerprint:
            logger.info("results of %s, seed %d, are in %s: not run again", arm.name, seed, self.results_file)
            self.resumed.append(f"{arm.name} (seed {seed}): results file")
            if self._clean_evaluations(arm, seed, known):
                self._save_results()
            return known
        for other in arm.depends_on:
            if not (self.root(seed, other) / "models" / "model.pt").is_file():
                logger.info("%s builds on %s, whose model.pt is gone: training %s again", arm.name, other, other)
                self._arm_results(self.spec.arm(other), seed, force=True)
        seconds = {}
        for name, marker, run_id, overlays, root, tracking, settings in steps:
            seconds[name] = self.step(marker, run_id, overlays, root, tracking, settings)
            self.timings[f"{name} {arm.name}"] = self.timings.get(f"{name} {arm.name}", 0.0) + seconds[name]
        collected = self.collect(self.root(seed, arm.name))
        collected["cost"]["offline_seconds"] = seconds.get("offline", 0.0)
        collected["cost"]["wall_seconds"] = seconds["train"]
        collected["robustness_seconds"] = seconds["robustness"]
        collected["fingerprint"] = fingerprint
        collected["code"] = self.code_version
        collected["machine"] = machine_summary()  # the seconds and step ratios hold on this machine
        self._clean_evaluations(arm, seed, collected)
        self.results["arms"].setdefault(arm.name, {})[str(seed)] = collected
        self.results.update({"counts": self.counts, "study": self.spec.name})
        self._save_results()
        return collected

    def _save_results(self) -> None:
        self.results["seeds"] = sorted({int(s) for runs in self.results["arms"].values() for s in runs})
        self.results_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.results_file.with_name(self.results_file.name + ".partial")
        partial.write_text(json.dumps(self.results, indent=1))
        os.replace(partial, self.results_file)

    def _clean_evaluations(self, arm: Arm, seed: int, result: dict[str, Any]) -> bool:
        """Score the arm's model again on the test split for each of the study's ``clean_evaluations`` that
        ``result`` lacks (``run evaluating`` with its overrides); the scores go into
        ``result["clean_evaluations"][name]`` as the workflow's ``metrics.csv`` gives them.

        Returns:
            whether any ran.
        """
        done = result.setdefault("clean_evaluations", {})
        root = self.root(seed, arm.name)
        ran = False
        for name, item in self.spec.clean_evaluations.items():
            wanted = _json_ready(item.get("overrides", {}))
            if done.get(name, {}).get("settings") == wanted:
                continue
            if not (root / "models" / "model.pt").is_file():
                logger.warning("%s (seed %d) has no model.pt here: its clean evaluation %r cannot run", arm.name,
                               seed, name)  # fmt: skip
                continue
            settings = {k: v for k, v in self.training_settings(arm, seed, self.datalists["validation"]).items()
                        if k not in _TRAINING_ONLY}  # fmt: skip
            output = root / f"clean_{name}"
            settings.update({"datalist_file": str(self.datalists["test"]), "output_dir": str(output),
                             **item.get("overrides", {})})  # fmt: skip
            seconds = self.step(output / "done.json", "evaluating", ["evaluate.json"], root, False, settings)
            with open(output / "metrics.csv", newline="") as stream:
                metrics = {row[0]: float(row[1]) for row in csv.reader(stream) if len(row) == 2}
            done[name] = {"metrics": metrics, "seconds": seconds, "settings": wanted}
            ran = True
        return ran

    def plan(self, arm: Arm, seed: int) -> list[tuple]:
        """The workflows of one arm and seed: its offline copies (if any), its training, its robustness on the test
        split; each ``(name, marker, run_id, overlays, bundle_root, tracking, settings)``."""
        datalists = self.datalists
        root = self.root(seed, arm.name)
        datalist = datalists["validation"]
        steps: list[tuple] = []
        if arm.offline is not None:
            source = self.spec.arm(arm.offline["from"])
            augment_dir = root / "offline_data"
            method = str(arm.offline["method"])
            # the source's network settings, without its adversarial or training-only keys
            settings = {k: v for k, v in self.training_settings(source, seed, datalist).items()
                        if not k.startswith("adv#") and k not in ("augment", "init_ckpt", "max_epochs", "resume")}  # fmt: skip
            # the copies' attack: the paper's plain signed-gradient step unless the arm names a recipe (the
            # bundle's default recipe may add a random start or other options)
            settings.update({"augment_dir": str(augment_dir), "adv#recipe": arm.offline.get("recipe", "paper"),
                             "adv#method": method,
                             "adv#epsilon": arm.offline.get("epsilon", self.profile.adv_epsilon)})  # fmt: skip
            steps.append(("offline", augment_dir / "done.json", "augment", ["augment.json"],
                          self.root(seed, source.name), False, settings))  # fmt: skip
            datalist = augment_dir / f"datalist_{method}.json"
        settings = self.training_settings(arm, seed, datalist)
        if arm.init_from is not None:
            settings["init_ckpt"] = str(self.root(seed, arm.init_from) / "models" / "model.pt")
        # the profile's training-only overrides (the validation that picks the checkpoint) stay out of the test
        # scores and attacks, which run as the bundle evaluates
        steps.append(("train", root / "training_done.json", "training", [], root, self.tracking,
                      {**settings, **self.profile.training_overrides}))  # fmt: skip
        robust = {k: v for k, v in settings.items() if k not in (*_TRAINING_ONLY, "datalist_file")}
        robust.update({"datalist_file": str(datalists["test"]), "output_dir": str(root / "robustness_test"),
                       "num_examples": 0, **self._robustness_settings()})  # fmt: skip
        steps.append(("robustness", root / "robustness_test" / "done.json", "robustness", ["robustness.json"], root,
                      False, robust))  # fmt: skip
        return steps

    def _robustness_settings(self) -> dict[str, Any]:
        settings = {k: v for k, v in self.spec.robustness.items() if k != "quoted_epsilons"}
        return settings

    @staticmethod
    def collect(root: Path) -> dict[str, Any]:
        """What one arm's workflows wrote: validation IoU/Dice per epoch and the training's cost (from
        ``models/training_history.json``), the test robustness rows (``robustness_test/robustness.json``; the
        epsilon-0 row is the clean test score of ``model.pt``) and each test image's scores (its
        ``robustness_per_image.csv``).

        Raises:
            FileNotFoundError: naming the missing file.
        """
        history_path = root / "models" / "training_history.json"
        robustness_path = root / "robustness_test" / "robustness.json"
        per_image_path = root / "robustness_test" / "robustness_per_image.csv"
        for path in (history_path, robustness_path, per_image_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the workflow that writes it did not complete.")
        history = json.loads(history_path.read_text())
        robustness = json.loads(robustness_path.read_text())
        epochs = history["epochs"]
        per_image: dict[str, dict[str, float]] = {}
        with open(per_image_path, newline="") as stream:
            for line in csv.DictReader(stream):
                if line["attack"] in ("ensemble", "clean"):
                    key = "clean" if float(line["epsilon"]) == 0 else f"ensemble@{float(line['epsilon']):g}"
                    per_image.setdefault(key, {})[line["image"]] = float(line["iou"])
                    if key == "clean":
                        per_image.setdefault("clean_dice", {})[line["image"]] = float(line["dice"])
        total = history["total"]
        return {
            "val_iou": {str(e["epoch"]): e["val_mean_iou"] for e in epochs if "val_mean_iou" in e},
            "val_dice": {str(e["epoch"]): e["val_mean_dice"] for e in epochs if "val_mean_dice" in e},
            "robustness": robustness["results"],
            "checks": robustness.get("checks", {}),
            "suspect_reasons": robustness.get("suspect_reasons", []),
            "num_test_images": robustness["num_images"],
            "per_image": per_image,
            "cost": {
                "train_seconds": total["seconds"],
                **({"train_cpu_seconds": total["cpu_seconds"]} if "cpu_seconds" in total else {}),
                "iterations": total["iterations"],
                "images": total["images"],
                "epochs": len(epochs),
            },
            "root": str(root),
        }
