"""Carry a recipe study's result into the bundle, generated, never typed.

``python -m monai_adv.study.publish --summary docs/recipes/summary.json --bundle bundles/adversarial_unet_segmentation``
applies the study's choice of default (the rule on its page) and writes its evidence into the bundle:

- the study's config, its profile's ``publish_config``: ``configs/train.json``, or the overlay that holds its data's
  defaults (``configs/hippocampus.json`` for ``hippocampus_cpu``, so a 3D study sets the 3D default and leaves the
  2D one alone): ``adv#recipe`` (and ``augment``) become the chosen arm's, so the README's command trains it;
  ``--adv#recipe paper`` still selects the paper's setting;
- ``configs/metadata.json``: ``eval_metrics`` holds the chosen arm's and its control's clean and robust scores
  (an overlay's study keeps its keys, prefixed with the overlay's name, ``hippocampus_...``, beside the others);
- ``docs/README.md``: the "Performance" section (between ``<!-- results:begin -->`` and ``<!-- results:end -->``,
  or ``<!-- results:<overlay>:begin -->`` for an overlay's study; added before "## Commands" the first time) holds
  the table of arms and the choice with its reason.

A study that is not complete (its page says what is missing: an arm, seeds) is refused unless ``--allow_incomplete`` is given: a default
should not follow a partial result by accident.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from monai_adv.engines.recipes import recipe_preset
from monai_adv.errors import SettingsError
from monai_adv.study.report import _fmt, _interval, _ratio_cell, epsilon_name
from monai_adv.study.spec import ARM_DEFAULTS

__all__ = ["BEGIN", "END", "PUBLISHABLE_KEYS", "main", "markers", "performance_section", "publish", "target_config"]

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
#: the overrides an arm may have for the bundle to take it as its default: config path of each in train.json
PUBLISHABLE_KEYS = {"adv#recipe": ("adv", "recipe"), "augment": ("augment",)}
MAIN_CONFIG = "train.json"


def target_config(about: Mapping[str, Any]) -> str:
    """The file in ``configs/`` that takes a study's default: its profile's ``publish_config`` (``train.json``
    unless the profile names the overlay that holds its data's defaults, as ``hippocampus_cpu`` does)."""
    from monai_adv.study.profiles import PROFILES

    profile = PROFILES.get(str(about.get("profile")))
    return profile.publish_config if profile is not None else MAIN_CONFIG


def _overlay_prefixes() -> set[str]:
    """The ``eval_metrics`` key prefixes of the studies published into overlays (``hippocampus_``)."""
    from monai_adv.study.profiles import PROFILES

    return {f"{Path(p.publish_config).stem}_" for p in PROFILES.values() if p.publish_config != MAIN_CONFIG}


def markers(config: str) -> tuple[str, str]:
    """The README markers around the Performance section of the study whose default goes into ``config``."""
    if config == MAIN_CONFIG:
        return BEGIN, END
    stem = Path(config).stem
    return f"<!-- results:{stem}:begin -->", f"<!-- results:{stem}:end -->"


def _gaps(about: dict[str, Any]) -> str:
    """What keeps the study from being complete, as its summary says (older summaries name no gaps)."""
    return "; ".join(about.get("gaps") or ["an arm or seed is missing"])


def _default_settings(summary: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The chosen arm and the config values it stands for.

    Raises:
        SettingsError: when the summary chose no arm, or the chosen arm needs more than one training run or
            overrides the bundle cannot take as defaults.
    """
    arm = summary["default"].get("arm")
    if arm is None:
        raise SettingsError("the study chose no default (no candidate arm has results): nothing to publish.")
    entry = summary["summary"]["arms"][arm]
    overrides = dict(entry.get("overrides", {}))
    extra = sorted(set(overrides) - set(PUBLISHABLE_KEYS))
    if extra:
        raise SettingsError(
            f"the chosen arm {arm!r} sets {extra}: the bundle can take only {sorted(PUBLISHABLE_KEYS)} as its default. "
            "Add a preset with these settings to monai_adv.engines.RECIPES and use it in the study's arm."
        )
    if "adv#recipe" not in overrides:
        raise SettingsError(f"the chosen arm {arm!r} names no adv#recipe: it cannot be the bundle's default recipe.")
    recipe_preset(overrides["adv#recipe"])  # an unknown name fails here, naming the known ones
    return arm, {key: overrides.get(key, ARM_DEFAULTS.get(key)) for key in PUBLISHABLE_KEYS}


def performance_section(summary: Mapping[str, Any], results_page: str | None = None, config: str | None = None) -> str:
    """The bundle README's "Performance" section (markers included) from a study's ``summary.json``.

    Args:
        summary: the study's ``summary.json`` content.
        results_page: the page the section points to (default ``docs/<the study's page>``).
        config: the file in ``configs/`` that takes the default (default: :func:`target_config`).

    Raises:
        KeyError: when the summary lacks the study's description or an arm's scores.
    """
    about, study, default = summary["study"], summary["summary"], summary["default"]
    results_page = results_page or f"docs/{about.get('page', 'recipes.md')}"
    config = config or target_config(about)
    begin, end = markers(config)
    heading = "## Performance" if config == MAIN_CONFIG else f"## Performance with configs/{config}"
    epsilons = study["epsilons"]
    header = ["arm", "seeds", "clean IoU", "clean Dice", *[f"robust IoU {epsilon_name(e)}" for e in epsilons],
              "vs control: clean", *[f"vs control: robust {epsilon_name(e)}" for e in epsilons],
              "time/step vs plain"]  # fmt: skip
    lines = [
        begin,
        heading,
        "",
        (
            f"Generated by `python -m monai_adv.study.publish` from `{about['command']}` (code `{about['version']}`); do "
            f"not edit by hand. {about['title']}: mean ± std over seeds on the test split; robust IoU is the per-image "
            "worst case over the `run robustness` ensemble; *vs control* is the paired difference against the arm's "
            "compute-matched plain UNet, in IoU points with a 95% bootstrap interval. The rule, the plots, the verdicts "
            f"and the cost of each arm are in the repository's `{results_page}`."
        ),
        "",
    ]
    if not about.get("complete", False):
        lines += [(f"**The study is not complete** ({_gaps(about)}): the numbers and the default are "
                  "provisional."), ""]  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, entry in study["arms"].items():
        vs = entry.get("vs_control", {})
        cells = [f"{entry['label']} (`{name}`)", str(len(entry["seeds"])), _fmt(entry["clean_iou"]),
                 _fmt(entry["clean_dice"]), *[_fmt(entry["robust_iou"][f"{e:g}"]) for e in epsilons],
                 _interval(vs.get("clean_iou")), *[_interval(vs.get(f"robust_iou@{e:g}")) for e in epsilons],
                 _ratio_cell(entry)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if default.get("arm"):
        arm = default["arm"]
        recipe = study["arms"][arm]["overrides"].get("adv#recipe")
        target = "meets" if default.get("meets_target") else "does not meet"
        lines += [
            "",
            (
                f"**Default recipe: `{recipe}`** (arm `{arm}`, `adv#recipe` in `configs/{config}`): {default['reason']}. "
                f"It {target} the target (within 1 clean IoU point of its reference, its control or the plain arm where "
                "that scores higher, and at least twice its control's robust IoU). "
                "`--adv#recipe paper` trains the paper's setting (FGSM copies at 0.1, appended)."
            ),
        ]
    lines += ["", end]
    return "\n".join(lines)


def _replace_section(readme: str, section: str, readme_path: Path, begin: str = BEGIN, end: str = END) -> str:
    if begin in readme:
        if end not in readme:
            raise ValueError(f"{readme_path} has {begin} but no {end}.")
        before, rest = readme.split(begin, 1)
        return before + section + rest.split(end, 1)[1]
    if "## Commands" in readme:
        before, rest = readme.split("## Commands", 1)
        return before + section + "\n\n## Commands" + rest
    raise ValueError(f"{readme_path} has no '## Commands' section to put the Performance section before.")


def _set_default(config: dict[str, Any], key: str, value: Any) -> None:
    """Write ``key`` (``adv#recipe``) into a config: nested where the config nests it (train.json's
    ``adv: {recipe}``), else as the flat ``adv#recipe`` that an overlay uses."""
    *parents, leaf = PUBLISHABLE_KEYS[key]
    node = config
    for part in parents:
        if key in config or not isinstance(node.get(part), dict):
            config[key] = value
            return
        node = node[part]
    node[leaf] = value


def publish(
    summary_path: str | os.PathLike, bundle_dir: str | os.PathLike, allow_incomplete: bool = False
) -> dict[str, Any]:
    """Set the bundle's default recipe to the study's choice and write the study's numbers into the bundle.

    Args:
        summary_path: ``summary.json`` written by ``python -m monai_adv.study`` (``OUT/<name>/summary.json``).
        bundle_dir: the bundle folder (``configs/train.json`` or the study's overlay, ``configs/metadata.json``,
            ``docs/README.md``).
        allow_incomplete: publish a study with arms or seeds missing (the section says it is provisional).

    Returns:
        the values written into the study's config, :func:`target_config` (``{"adv#recipe": ..., "augment": ...}``).

    Raises:
        FileNotFoundError: when the summary or a bundle file is missing.
        SettingsError: (a ``ValueError``) for an incomplete study without ``allow_incomplete``, or a chosen arm the
            bundle cannot take as its default.
        ValueError: when the README has a begin marker without an end marker, or no "## Commands" section.
    """
    summary_path = Path(summary_path)
    summary = json.loads(summary_path.read_text())
    if "study" not in summary:
        raise SettingsError(f"{summary_path} has no 'study' entry: write it again with python -m monai_adv.study.")
    about = summary["study"]
    if not about.get("complete", False) and not allow_incomplete:
        raise SettingsError(
            f"{summary_path}: study {about['name']!r} is not complete ({_gaps(about)}); finish it, or pass "
            "--allow_incomplete to publish a provisional default."
        )
    bundle = Path(bundle_dir)
    config_name = target_config(about)
    config_path = bundle / "configs" / config_name
    metadata_path, readme_path = bundle / "configs" / "metadata.json", bundle / "docs" / "README.md"
    for path in (config_path, metadata_path, readme_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: --bundle must be the bundle folder.")
    arm, values = _default_settings(summary)
    section = performance_section(summary, config=config_name)
    readme = _replace_section(readme_path.read_text(), section, readme_path, *markers(config_name))

    config = json.loads(config_path.read_text())
    for key, value in values.items():
        _set_default(config, key, value)

    entries = summary["summary"]["arms"]
    control = entries[arm].get("control")
    # the main config's study owns every key but the overlays' studies' keys, which start with the overlay's name
    own = "" if config_name == MAIN_CONFIG else f"{Path(config_name).stem}_"
    prefix = about.get("dataset", "kvasir_seg") if not own else own.rstrip("_")
    metrics: dict[str, Any] = {f"{own}default_recipe": values["adv#recipe"], f"{own}default_arm": arm}
    for name in dict.fromkeys([arm, control, summary["summary"].get("plain_arm")]):
        if name is None or name not in entries:
            continue
        entry = entries[name]
        metrics[f"{prefix}_test_mean_iou_{name}"] = float(np.mean(entry["clean_iou"]))
        metrics[f"{prefix}_test_mean_dice_{name}"] = float(np.mean(entry["clean_dice"]))
        for eps in summary["summary"]["epsilons"]:
            label = epsilon_name(eps).replace("/", "_")
            metrics[f"{prefix}_test_ensemble_iou_{label}_{name}"] = float(np.mean(entry["robust_iou"][f"{eps:g}"]))
    heading = "Performance" if config_name == MAIN_CONFIG else f"Performance with configs/{config_name}"
    metrics[f"{own}source"] = f"docs/README.md, {heading}: {about['command']} (code {about['version']})"
    metadata = json.loads(metadata_path.read_text())
    # keep what the other studies published (the overlays' studies; for an overlay's study, all the others)
    previous = metadata.get("eval_metrics", {})
    if own:
        kept = {k: v for k, v in previous.items() if not k.startswith(own)}
    else:
        kept = {k: v for k, v in previous.items() if any(k.startswith(p) for p in _overlay_prefixes())}
    metadata["eval_metrics"] = {**kept, **metrics}

    # every file is computed before the first is written: a failure above changes nothing
    config_path.write_text(json.dumps(config, indent=4, ensure_ascii=False) + "\n")
    metadata_path.write_text(json.dumps(metadata, indent=4) + "\n")
    readme_path.write_text(readme)
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_adv.study.publish", description=__doc__.splitlines()[0])
    parser.add_argument("--summary", default="docs/recipes/summary.json", help="summary.json of a recipe study")
    parser.add_argument("--bundle", default="bundles/adversarial_unet_segmentation", help="the bundle folder")
    parser.add_argument(
        "--allow_incomplete", action="store_true", help="publish a study with arms or seeds missing (provisional)"
    )
    args = parser.parse_args(argv)
    try:
        values = publish(args.summary, args.bundle, allow_incomplete=args.allow_incomplete)
    except (SettingsError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"python -m monai_adv.study.publish: {err}") from None
    settings = ", ".join(f"{k} {v}" for k, v in values.items())
    config = target_config(json.loads(Path(args.summary).read_text())["study"])
    print(f"updated {args.bundle}: configs/{config} ({settings}), configs/metadata.json and docs/README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
