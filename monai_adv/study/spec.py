"""A study: named arms (bundle overrides, optional offline copies or a starting checkpoint), seeds, one evaluation.

A study file is JSON::

    {
      "name": "kvasir_recipes",
      "title": "Recipes for accurate and robust polyp segmentation",
      "profile": "cpu",
      "overrides": {"max_epochs": 12},
      "plain_arm": "unet",
      "robustness": {"epsilons": [0, 0.00784, 0.01569], "iterative_epsilons": [0.00784, 0.01569]},
      "arms": [
        {"name": "unet", "label": "UNet", "overrides": {"adv#method": "none"}},
        {"name": "unet_x2", "label": "UNet, 24 epochs", "overrides": {"adv#method": "none", "max_epochs": 24}},
        {"name": "nfgsm", "overrides": {"adv#recipe": "nfgsm"}, "control": "unet_x2", "candidate": true},
        {"name": "fgsm_offline", "offline": {"from": "unet", "method": "fgsm"}, "control": "unet_x2"},
        {"name": "finetune", "init_from": "unet", "overrides": {"adv#recipe": "finetune"}, "control": "unet_x2"}
      ]
    }

Every arm trains with the profile's overrides, then the study's, then its own. ``offline`` trains on the training
set plus copies that ``run augment`` writes with the final model of the ``from`` arm of the same seed; ``init_from``
starts from that arm's ``model.pt`` (``init_ckpt``). ``control`` names the compute-matched arm the page compares it
with. ``candidate`` arms compete for the default recipe.

An arm does not depend on the bundle's current default recipe, which ``python -m monai_adv.study.publish`` changes:
every arm names ``adv#recipe`` or ``adv#method`` (itself or through the study's overrides), and the settings that the
publisher writes train as :data:`ARM_DEFAULTS` where an arm leaves them alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_adv.errors import SettingsError

__all__ = ["ARM_DEFAULTS", "STUDIES_DIR", "Arm", "StudySpec", "load_study"]

STUDIES_DIR = Path(__file__).resolve().parent / "studies"
#: what an arm trains with for a setting that the publisher may make the bundle's default, when the arm leaves it
#: alone: a published ``--augment standard`` must not turn a study's plain control into an augmented one
ARM_DEFAULTS: dict[str, Any] = {"augment": "none"}
_STUDY_KEYS = {"name", "title", "description", "profile", "overrides", "plain_arm", "robustness", "arms", "page",
               "dataset_dir", "clean_evaluations", "reference", "required_seeds"}  # fmt: skip
_ARM_KEYS = {"name", "label", "overrides", "offline", "init_from", "control", "candidate", "description"}
_OFFLINE_KEYS = {"from", "method", "epsilon", "recipe"}
_ROBUSTNESS_KEYS = {"attacks", "epsilons", "iterative_epsilons", "num_steps", "restarts", "checks", "num_examples",
                    "example_epsilon", "quoted_epsilons"}  # fmt: skip


@dataclass(frozen=True)
class Arm:
    """One arm of a study (see the module)."""

    name: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    offline: dict[str, Any] | None = None
    init_from: str | None = None
    control: str | None = None
    candidate: bool = False
    description: str = ""

    @property
    def depends_on(self) -> list[str]:
        """The arms whose model this arm needs (same seed)."""
        return [a for a in ((self.offline or {}).get("from"), self.init_from) if a]


@dataclass(frozen=True)
class StudySpec:
    """A checked study file.

    Attributes:
        name: short name (folder names, the summary file).
        title: the page's title.
        description: a paragraph for the page.
        profile: the reproduction profile whose overrides and data limits every arm uses.
        overrides: bundle overrides for every arm (after the profile's).
        plain_arm: the arm whose time per optimiser step is the "plain step" of the cost column.
        robustness: ``run robustness`` settings for every arm (``quoted_epsilons``: where the page quotes the
            ensemble, default the iterative epsilons).
        arms: the arms, in the order they run for each seed.
        page: the page's file name under ``--output`` (default ``<name>.md``).
        dataset_dir: the data the study is about (``--dataset_dir`` overrides it), as written in the file.
        clean_evaluations: extra clean ``run evaluating`` passes over the test split, ``{name: {"label": text,
            "overrides": {...}}}`` (e.g. the single window that the 3D profile's training validates with): each
            trained model is scored again with those overrides. They measure, they do not change what is trained or
            attacked, so adding one runs it for the results there are without running them again.
        reference: published clean Dice per class to measure the arms against, ``{"label": "nnU-Net-class
            models", "dice": {"anterior": 0.89, ...}}`` (class names as in the results' ``dice_<class>``); the
            page gives each arm's distance to it.
        required_seeds: when the study is complete, ``{"each": N, "best": M, "arms": {ARM: K}}``: every arm has
            at least ``each`` seeds (or its own ``K``: a check of a design decision rather than a recipe) and the
            two best candidates by the rule at least ``best`` (default ``each``). Without it, a study is complete
            when every arm has every seed that any arm has.
        source: the study file.
    """

    name: str
    title: str
    arms: list[Arm]
    description: str = ""
    profile: str = "cpu"
    overrides: dict[str, Any] = field(default_factory=dict)
    plain_arm: str | None = None
    robustness: dict[str, Any] = field(default_factory=dict)
    page: str | None = None
    dataset_dir: str | None = None
    clean_evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference: dict[str, Any] | None = None
    required_seeds: dict[str, Any] | None = None
    source: str = ""

    def arm(self, name: str) -> Arm:
        """The arm called ``name``.

        Raises:
            KeyError: naming the arms there are.
        """
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(f"no arm {name!r} in study {self.name!r}; its arms: {[a.name for a in self.arms]}.")

    def select(self, names: list[str] | None) -> list[Arm]:
        """The arms to run for ``--arms names`` (all when None), with the arms they depend on, in study order.

        Raises:
            SettingsError: for a name that is not an arm.
        """
        if not names:
            return list(self.arms)
        unknown = [n for n in names if n not in {a.name for a in self.arms}]
        if unknown:
            raise SettingsError(
                f"--arms {unknown} are not arms of {self.source or self.name}: {[a.name for a in self.arms]}."
            )
        wanted = set(names)
        for arm in reversed(self.arms):  # dependencies come earlier in the list
            if arm.name in wanted:
                wanted |= set(arm.depends_on)
        return [a for a in self.arms if a.name in wanted]

    @property
    def quoted_epsilons(self) -> list[float]:
        """Where the page quotes the ensemble."""
        quoted = self.robustness.get("quoted_epsilons") or self.robustness.get("iterative_epsilons") or []
        return [float(e) for e in quoted]


def _unknown(keys: set[str], allowed: set[str], where: str) -> None:
    extra = sorted(keys - allowed)
    if extra:
        raise SettingsError(f"{where}: unknown keys {extra}; allowed: {sorted(allowed)}.")


def load_study(source: str | os.PathLike | dict[str, Any]) -> StudySpec:
    """Read and check a study: a JSON file, the name of a study shipped in ``monai_adv/study/studies``, or a dict.

    Raises:
        FileNotFoundError: when the file does not exist (naming the shipped studies).
        SettingsError: (a ``ValueError``) for unknown keys, missing names, arms that depend on or are controlled by
            arms not defined before them, duplicate names, or bad robustness settings, naming the file and key.
    """
    if isinstance(source, dict):
        raw, where = source, str(source.get("name", "study"))
    else:
        path = Path(source)
        if not path.is_file() and (STUDIES_DIR / f"{source}.json").is_file():
            path = STUDIES_DIR / f"{source}.json"
        if not path.is_file():
            shipped = sorted(p.stem for p in STUDIES_DIR.glob("*.json"))
            raise FileNotFoundError(f"no study file {path} (studies shipped with monai_adv: {shipped}).")
        where = str(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SettingsError(f"{path} is not valid JSON: {err}.") from err
    if not isinstance(raw, dict):
        raise SettingsError(f"{where}: a study is a JSON object, got {type(raw).__name__}.")
    _unknown(set(raw), _STUDY_KEYS, where)
    for key in ("name", "arms"):
        if key not in raw:
            raise SettingsError(f"{where}: the study needs {key!r}.")
    if not isinstance(raw["arms"], list) or not raw["arms"]:
        raise SettingsError(f"{where}: 'arms' must be a non-empty list of arms.")
    arms: list[Arm] = []
    for index, item in enumerate(raw["arms"]):
        here = f"{where}: arms[{index}]"
        if not isinstance(item, dict) or "name" not in item:
            raise SettingsError(f"{here}: each arm is an object with a 'name'.")
        _unknown(set(item), _ARM_KEYS, f"{here} ({item['name']})")
        name = str(item["name"])
        if not name.replace("_", "").replace("-", "").isalnum():
            raise SettingsError(f"{here}: arm names are folder names (letters, digits, _ and -), got {name!r}.")
        known = {a.name for a in arms}
        if name in known:
            raise SettingsError(f"{here}: a second arm called {name!r}.")
        offline = item.get("offline")
        if offline is not None:
            if not isinstance(offline, dict) or "from" not in offline or "method" not in offline:
                raise SettingsError(f"{here} ({name}): offline is {{'from': ARM, 'method': 'fgsm'|'invfgsm'}}.")
            _unknown(set(offline), _OFFLINE_KEYS, f"{here} ({name}) offline")
        for key, other in (("offline.from", (offline or {}).get("from")), ("init_from", item.get("init_from")),
                           ("control", item.get("control"))):  # fmt: skip
            if other is not None and other not in known:
                raise SettingsError(
                    f"{here} ({name}): {key} {other!r} must name an arm listed before it; arms before: {sorted(known)}."
                )
        overrides = item.get("overrides", {})
        if not isinstance(overrides, dict):
            raise SettingsError(f"{here} ({name}): overrides must be an object of bundle settings.")
        if not {"adv#recipe", "adv#method"} & {*overrides, *raw.get("overrides", {})}:
            raise SettingsError(
                f"{here} ({name}): names neither 'adv#recipe' nor 'adv#method' in its overrides, so the bundle's "
                "default recipe (which python -m monai_adv.study.publish changes) would decide what it trains; "
                "add {'adv#method': 'none'} for plain training or the recipe it is about."
            )
        arms.append(Arm(name=name, label=str(item.get("label", name)), overrides=dict(overrides), offline=offline,
                        init_from=item.get("init_from"), control=item.get("control"),
                        candidate=bool(item.get("candidate", False)),
                        description=str(item.get("description", ""))))  # fmt: skip
    robustness = dict(raw.get("robustness", {}))
    _unknown(set(robustness), _ROBUSTNESS_KEYS, f"{where}: robustness")
    evaluations = raw.get("clean_evaluations", {})
    if not isinstance(evaluations, dict):
        raise SettingsError(f"{where}: clean_evaluations is {{name: {{'label': ..., 'overrides': {{...}}}}}}.")
    for key, item in evaluations.items():
        if not str(key).replace("_", "").isalnum() or not isinstance(item, dict):
            raise SettingsError(
                f"{where}: clean_evaluations[{key!r}] must be an object, under a name of letters, digits and _."
            )
        _unknown(set(item), {"label", "overrides"}, f"{where}: clean_evaluations[{key!r}]")
        if not isinstance(item.get("overrides", {}), dict):
            raise SettingsError(f"{where}: clean_evaluations[{key!r}].overrides must be an object of bundle settings.")
    reference = _reference(raw.get("reference"), where)
    required_seeds = _required_seeds(raw.get("required_seeds"), where, [a.name for a in arms])
    plain = raw.get("plain_arm")
    if plain is not None and plain not in {a.name for a in arms}:
        raise SettingsError(f"{where}: plain_arm {plain!r} is not an arm.")
    profile = str(raw.get("profile", "cpu"))
    from monai_adv.study.profiles import PROFILES

    if profile not in PROFILES:
        raise SettingsError(f"{where}: profile {profile!r} is not one of {sorted(PROFILES)}.")
    return StudySpec(
        name=str(raw["name"]), title=str(raw.get("title", raw["name"])), arms=arms,
        description=str(raw.get("description", "")), profile=profile, overrides=dict(raw.get("overrides", {})),
        plain_arm=plain, robustness=robustness, page=raw.get("page"), dataset_dir=raw.get("dataset_dir"),
        clean_evaluations={str(k): dict(v) for k, v in evaluations.items()}, reference=reference,
        required_seeds=required_seeds, source=where,
    )  # fmt: skip


def _required_seeds(raw: Any, where: str, arm_names: Sequence[str]) -> dict[str, Any] | None:
    """The checked ``required_seeds`` of a study file: ``{"each": N, "best": M, "arms": {ARM: K}}``, whole numbers
    with M >= N >= 1 and K >= 1 (``best`` defaults to N, ``arms`` to none).

    Raises:
        SettingsError: for another form, an unknown key or arm, or numbers out of order, naming the file and the
            value.
    """
    if raw is None:
        return None
    form = ("{'each': N, 'best': M, 'arms': {ARM: K}} (seeds every arm needs, the two best candidates, and arms "
            "that need another number; whole numbers, M >= N >= 1, K >= 1)")  # fmt: skip
    if not isinstance(raw, dict) or "each" not in raw:
        raise SettingsError(f"{where}: required_seeds must be {form}, got {raw!r}.")
    _unknown(set(raw), {"each", "best", "arms"}, f"{where}: required_seeds")
    values = {"each": raw["each"], "best": raw.get("best", raw["each"])}
    per_arm = raw.get("arms", {})

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if not all(whole(v) for v in values.values()) or not values["best"] >= values["each"]:
        raise SettingsError(f"{where}: required_seeds must be {form}, got {raw!r}.")
    if not isinstance(per_arm, dict) or not all(whole(v) for v in per_arm.values()):
        raise SettingsError(f"{where}: required_seeds.arms must be {{ARM: K}} with whole K >= 1, got {per_arm!r}.")
    unknown = sorted(set(per_arm) - set(arm_names))
    if unknown:
        raise SettingsError(f"{where}: required_seeds.arms names {unknown}, which are not arms of the study.")
    return {**values, "arms": dict(per_arm)}


def _reference(raw: Any, where: str) -> dict[str, Any] | None:
    """The checked ``reference`` of a study file: a label and Dice scores in (0, 1] per class."""
    if raw is None:
        return None
    form = "{'label': TEXT, 'dice': {CLASS: DICE, ...}} with each Dice in (0, 1]"
    if not isinstance(raw, dict) or not isinstance(raw.get("dice"), dict) or not raw["dice"]:
        raise SettingsError(f"{where}: reference must be {form}, got {raw!r}.")
    _unknown(set(raw), {"label", "dice"}, f"{where}: reference")
    scores = {}
    for name, value in raw["dice"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise SettingsError(f"{where}: reference.dice[{name!r}] must be a Dice in (0, 1], got {value!r}.")
        scores[str(name)] = float(value)
    return {"label": str(raw.get("label", "the reference")), "dice": scores}
