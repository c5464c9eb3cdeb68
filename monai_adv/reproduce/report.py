"""The results page: tables (mean ± std over seeds), one sentence per claim of the paper, plots.

Every number on the page is read from the raw results that :class:`~monai_adv.reproduce.pipeline.Reproduction`
collected from the bundle runs; nothing is typed by hand.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_adv.reproduce.pipeline import ARM_LABELS, ARMS, paper_epochs
from monai_adv.study.report import mean_std, plot_validation_curves

__all__ = ["fmt", "judge", "robustness_value", "test_score", "write_report"]

ATTACK_LABELS = {"fgsm": "FGSM", "invfgsm": "InvFGSM", "pgd": "PGD", "ensemble": "ensemble"}
#: The radii at which the page quotes the ensemble (images in [0, 1]).
ENSEMBLE_EPSILONS = (2 / 255, 4 / 255)


def fmt(values: Sequence[float]) -> str:
    """``mean ± std`` with 4 decimals (just the value for one seed)."""
    mean, std = mean_std(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ± {std:.4f}"


def robustness_value(result: dict, attack: str, epsilon: float, key: str = "mean_iou") -> float:
    """One robustness number of one arm and seed."""
    for row in result["robustness"]:
        if row["attack"] == attack and abs(row["epsilon"] - epsilon) < 1e-12:
            return float(row[key])
    raise KeyError(f"no robustness row for {attack} at epsilon {epsilon}.")


def test_score(result: dict, key: str = "mean_iou") -> float:
    """Clean test score of the best checkpoint: the epsilon-0 row of the robustness run on the test split."""
    return robustness_value(result, "fgsm", 0.0, key)


def _has(result: dict, attack: str, epsilon: float) -> bool:
    """Whether the attack ran at that epsilon (iterative attacks may run at fewer epsilons than FGSM)."""
    return any(r["attack"] == attack and abs(r["epsilon"] - epsilon) < 1e-12 for r in result["robustness"])


def _cell(results: Sequence[dict] | Any, attack: str, epsilon: float) -> str:
    """``fmt`` of one robustness number over seeds, or "–" where the attack did not run at that epsilon."""
    try:
        return fmt([robustness_value(r, attack, epsilon) for r in results])
    except KeyError:
        return "–"


def judge(differences: Sequence[float], claimed: str) -> str:
    """A plain verdict on a paired difference (arm minus baseline, one per seed)."""
    mean, std = mean_std(differences)
    points = f"{100 * mean:+.1f} IoU points (± {100 * std:.1f} over {len(differences)} seed(s); paper: {claimed})"
    if len(differences) < 2:
        return f"**unclear (one seed)**: {points}."
    if mean - std > 0:
        return f"**held** in direction: {points}."
    if mean + std < 0:
        return f"**did not hold**: {points}."
    return f"**unclear (spread too large)**: {points}."


def _plot_val_curves(results: dict, path: Path) -> None:
    arms = [(ARM_LABELS[arm], results["arms"][arm]) for arm in ARMS]
    plot_validation_curves(arms, path, figsize=(5.5, 3.5), legend_size=7)


def _plot_robustness(results: dict, epsilons: list[float], path: Path) -> None:
    from monai_adv.evaluation.figures import agg_pyplot

    plt = agg_pyplot()
    attacks = list(ATTACK_LABELS)
    fig, axes = plt.subplots(1, len(attacks), figsize=(4 * len(attacks), 3.4), sharey=True)
    for ax, attack in zip(axes, attacks):
        for arm in ARMS:
            seeds = list(results["arms"][arm].values())
            measured = [e for e in epsilons if _has(seeds[0], attack, e)]
            ax.plot(measured, [np.mean([robustness_value(s, attack, e) for s in seeds]) for e in measured],
                    marker="o", label=ARM_LABELS[arm])  # fmt: skip
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_title(f"test IoU under {ATTACK_LABELS[attack]}")
        ax.set_xlabel("epsilon")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean foreground IoU")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, output: Path, context: dict[str, Any]) -> Path:
    """Write ``output/results.md`` and ``output/results/*.png`` from the raw results.

    Args:
        results: from :meth:`Reproduction.run`.
        output: the output folder.
        context: ``command``, ``version``, ``machine``, ``wall_time_s``, ``profile`` (a Profile), ``max_epochs``,
            ``timings``, ``counts``, ``dataset_dir``, ``source`` (the dataset's citation text or None).
    """
    figures = output / "results"
    figures.mkdir(parents=True, exist_ok=True)
    arms, seeds = results["arms"], results["seeds"]
    profile, max_epochs = context["profile"], context["max_epochs"]
    epochs = paper_epochs(max_epochs)
    epsilons = sorted({row["epsilon"] for row in next(iter(arms["unet"].values()))["robustness"]})
    positive = [e for e in epsilons if e > 0]

    lines = [
        "# Results: adversarial augmentation on Kvasir-SEG"
        if "kvasir" in str(context["dataset_dir"]).lower()
        else "# Results: adversarial augmentation",
        "",
        (
            "Generated by `python -m monai_adv.reproduce`; every number below was measured by the run described at the "
            "end of this page. Do not edit by hand."
        ),
        "",
        f"- Profile **{profile.name}**: {profile.description}.",
        (
            f"- Seeds: {', '.join(map(str, seeds))}; images: {context['counts']['train']} train, "
            f"{context['counts']['validation']} validation, {context['counts']['test']} test."
        ),
        (
            f"- Augmentation epsilon {profile.adv_epsilon:g} (images scaled to [0, 1]); online arms append one "
            "adversarial copy per image to every batch from epoch 1; offline arms (the paper's Fig. 1) train on the "
            "training set plus one copy per image written by `run augment` from the UNet arm's best checkpoint "
            "(same seed), for the same number of epochs."
        ),
        (
            f"- The paper's epochs 0/10/20/30 of 30 are read as epochs "
            f"{'/'.join(str(v) for v in epochs.values())} of {max_epochs} (epoch 0 = after the first epoch)."
        ),
        (
            "- Test scores are those of each arm's best checkpoint (`models/model.pt`, best validation IoU) on the "
            "test split; the robustness table is measured on the same test images (white box: the training loss and "
            "the true labels). InvFGSM at test time uses the true label, so it is the paper's measurement, not a "
            "threat model."
        ),
        "",
    ]
    if context.get("source"):
        lines += ["**Data.** " + context["source"], ""]

    lines += ["## Validation IoU at the paper's epochs (Table 1)", ""]
    header = "| arm | " + " | ".join(f"paper epoch {p} (epoch {e})" for p, e in epochs.items()) + " |"
    lines += [header, "|---" * (len(epochs) + 1) + "|"]
    for arm in ARMS:
        cells = [fmt([s["val_iou"][str(e)] for s in arms[arm].values()]) for e in epochs.values()]
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
    lines += ["", "Validation Dice at the same epochs:", "", header, "|---" * (len(epochs) + 1) + "|"]
    for arm in ARMS:
        cells = [fmt([s["val_dice"][str(e)] for s in arms[arm].values()]) for e in epochs.values()]
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")

    lines += ["", "## Test split, best checkpoint", "", "| arm | test IoU | test Dice | best validation IoU |",
              "|---|---|---|---|"]  # fmt: skip
    for arm in ARMS:
        seeds_ = list(arms[arm].values())
        lines.append(
            f"| {ARM_LABELS[arm]} | {fmt([test_score(s) for s in seeds_])} | "
            f"{fmt([test_score(s, 'mean_dice') for s in seeds_])} | {fmt([max(s['val_iou'].values()) for s in seeds_])} |"
        )

    lines += ["", "## Robustness on the test split (Table 2): IoU under attack", ""]
    lines += ["| arm | attack | " + " | ".join(f"ε={e:g}" for e in epsilons) + " |", "|---" * (len(epsilons) + 2) + "|"]
    for arm in ARMS:
        for attack, attack_label in ATTACK_LABELS.items():
            cells = [_cell(arms[arm].values(), attack, e) for e in epsilons]
            lines.append(f"| {ARM_LABELS[arm]} | {attack_label} | " + " | ".join(cells) + " |")

    quoted = [e for e in ENSEMBLE_EPSILONS if any(abs(e - x) < 1e-12 for x in epsilons)]
    if quoted:
        first = next(iter(arms["unet"].values()))
        members = next((r["loss"] for r in first["robustness"] if r["attack"] == "ensemble"), "")
        steps = max((r["num_steps"] for r in first["robustness"] if r["attack"] == "pgd"), default=0)
        lines += ["", "## Robust IoU you can quote: the per-image worst case (ensemble)", "",
                  (f"Per test image, the lowest IoU over FGSM, PGD, SegPGD, CosPGD and APGD on SEA's three losses "
                   f"({members.replace('worst of ', '')}; {steps} steps each, the best iterate per image), as in "
                   "SEA (Croce et al., ECCV 2024). PGD alone is today's number; the ensemble is the one to quote. "
                   "Gradient-masking checks: see [robustness](robustness.md)."), "",
                  "| arm | clean test IoU | " + " | ".join(f"PGD ε={e * 255:g}/255 | ensemble ε={e * 255:g}/255"
                                                        for e in quoted) + " | ensemble below PGD | checks failed |",
                  "|---" * (4 + 2 * len(quoted)) + "|"]  # fmt: skip
        for arm in ARMS:
            seeds_ = list(arms[arm].values())
            cells = [fmt([test_score(s) for s in seeds_])]
            gaps = []
            for eps in quoted:
                pgd = [robustness_value(s, "pgd", eps) for s in seeds_]
                ensemble = [robustness_value(s, "ensemble", eps) for s in seeds_]
                cells += [fmt(pgd), fmt(ensemble)]
                gaps.append(f"{100 * float(np.mean(np.subtract(pgd, ensemble))):.1f}")
            fired: dict[str, int] = {}
            for s in seeds_:
                for name, check in s.get("checks", {}).items():
                    if check.get("passed") is False:
                        fired[name] = fired.get(name, 0) + 1
            checks = ", ".join(f"{name} ({count}/{len(seeds_)} seeds)" for name, count in sorted(fired.items()))
            cells += [" / ".join(gaps) + " points", checks or "none"]
            lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
        lines += ["", ("*ensemble below PGD*: mean over seeds of PGD's IoU minus the ensemble's, in IoU points, at "
                       + " / ".join(f"{e * 255:g}/255" for e in quoted) + ". A failed check means the robust IoU of "
                       "that arm may be overstated (see the checks in docs/robustness.md)."), ""]  # fmt: skip

    budget = results.get("default_budget")
    if budget:
        eps_cells = sorted(budget["ensemble"], key=float)
        lines += ["", "## The default robustness budget", "",
                  (f"`run robustness` with the bundle's defaults (every attack at {len(eps_cells)} epsilons, "
                   f"{budget['num_steps']} steps, {budget['restarts']} restart(s), the checks) on the "
                   f"{budget['num_images']} test images, UNet arm, seed {seeds[0]}: "
                   f"**{budget['seconds'] / 60:.1f} min** on this machine. Checks failed: "
                   f"{', '.join(budget['checks_failed']) or 'none'}."), "",
                  "| | " + " | ".join(f"ε={float(e):.4g}" for e in eps_cells) + " |",
                  "|---" * (len(eps_cells) + 1) + "|",
                  "| PGD | " + " | ".join(f"{budget['pgd'][e]:.4f}" for e in eps_cells) + " |",
                  "| ensemble | " + " | ".join(f"{budget['ensemble'][e]:.4f}" for e in eps_cells) + " |", ""]  # fmt: skip

    # claims: paired differences against the UNet arm of the same seed
    def diffs(arm: str, value) -> list[float]:
        return [value(arms[arm][str(s)]) - value(arms["unet"][str(s)]) for s in seeds]

    lines += ["", "## The paper's claims", ""]
    claims = [
        ("FGSM augmentation raises IoU (paper: about +3 points)", ("fgsm_online", "fgsm_offline"), "+3"),
        ("Inverse FGSM augmentation raises IoU (paper: about +6 to +9 points)", ("invfgsm_online", "invfgsm_offline"),
         "+6 to +9"),
    ]  # fmt: skip
    for text, claim_arms, claimed in claims:
        lines.append(f"- {text}, test IoU of the best checkpoint against UNet:")
        for arm in claim_arms:
            lines.append(f"  - {ARM_LABELS[arm]}: {judge(diffs(arm, test_score), claimed)}")
    lines.append("- Inverse FGSM helps more than FGSM (paper: yes), test IoU, InvFGSM arm minus FGSM arm:")
    for mode in ("online", "offline"):
        d = [test_score(arms[f"invfgsm_{mode}"][str(s)]) - test_score(arms[f"fgsm_{mode}"][str(s)]) for s in seeds]
        lines.append(f"  - {mode}: {judge(d, 'InvFGSM ahead by 3 to 6')}")
    eps_claim = [e for e in positive if e <= 0.12] or positive
    for attack in ("fgsm", "invfgsm"):
        lines.append(
            f"- Adversarial augmentation makes the model more robust to {ATTACK_LABELS[attack]} (paper: +8 to +26 points "
            f"at ε 0.0012-0.1176), test IoU under {ATTACK_LABELS[attack]} against UNet:"
        )
        for arm in ("fgsm_online", "invfgsm_online", "fgsm_offline", "invfgsm_offline"):
            for eps in eps_claim[-2:]:
                d = diffs(arm, lambda r, a=attack, e=eps: robustness_value(r, a, e))
                lines.append(f"  - {ARM_LABELS[arm]}, ε={eps:g}: {judge(d, 'higher')}")
    lines += [
        "",
        (
            "Verdicts: *held* when the mean paired difference (arm minus UNet, same seed) is more than one standard "
            "deviation above zero, *did not hold* when more than one below, else *unclear*. Three seeds are few; "
            "read these as indications, not tests."
        ),
        "",
    ]

    _plot_val_curves(results, figures / "val_iou_by_epoch.png")
    _plot_robustness(results, epsilons, figures / "robustness_by_arm.png")
    example_arm, example_seed = "invfgsm_offline", str(seeds[0])
    example = Path(arms[example_arm][example_seed]["root"]) / "robustness_test" / "robustness_examples.png"
    lines += ["## Figures", "", "![validation IoU per epoch](results/val_iou_by_epoch.png)", "",
              "![test IoU against epsilon](results/robustness_by_arm.png)", ""]  # fmt: skip
    if example.is_file():
        shutil.copyfile(example, figures / "examples.png")
        lines += [(f"Examples (test images, {ARM_LABELS[example_arm]}, seed {example_seed}, ε={profile.adv_epsilon:g}; "
                  "like the paper's Figs. 2-4):"), "", "![examples](results/examples.png)", ""]  # fmt: skip

    lines += ["## How this page was made", "", "```", context["command"], "```", "",
              f"- Code version: `{context['version']}`", f"- Machine: {context['machine']}",
              (f"- Wall time: {context['wall_time_s'] / 60:.1f} min in total for this command; by step (a step "
              "that had already run, and was resumed, counts the time it took then):")]  # fmt: skip
    lines += [f"  - {name}: {seconds / 60:.1f} min" for name, seconds in context["timings"].items()]
    if context.get("resumed"):
        lines += [(f"- Resumed: {len(context['resumed'])} step(s) had completed with the same settings in an earlier "
                  "run of this command on the same `--work_dir` and were not run again.")]  # fmt: skip
    lines += ["", "Bundle commands run (one per step; the first seed's shown):", "", "```"]
    lines += [c for c in context.get("commands", []) if "seed" not in c or " --seed " + str(seeds[0]) + " " in c + " "]
    lines += ["```", ""]
    path = output / "results.md"
    path.write_text("\n".join(lines))
    _write_summary(results, epsilons, context, figures / "summary.json")
    return path


def _write_summary(results: dict, epsilons: list[float], context: dict[str, Any], path: Path) -> None:
    """Headline numbers (mean and std over seeds) as JSON, e.g. for a bundle's ``metadata.json`` ``eval_metrics``."""
    arms = results["arms"]

    def stats(values: Sequence[float]) -> dict[str, float]:
        mean, std = mean_std(values)
        return {"mean": round(mean, 4), "std": round(std, 4)}

    summary: dict[str, Any] = {
        "profile": context["profile"].name,
        "seeds": results["seeds"],
        "command": context["command"],
        "version": context["version"],
        "split": "test",
        "arms": {},
    }
    for arm, seeds in arms.items():
        values = list(seeds.values())
        summary["arms"][arm] = {
            "test_mean_iou": stats([test_score(s) for s in values]),
            "test_mean_dice": stats([test_score(s, "mean_dice") for s in values]),
            "best_val_mean_iou": stats([max(s["val_iou"].values()) for s in values]),
            "robustness_mean_iou": {
                attack: {
                    f"{e:g}": stats([robustness_value(s, attack, e) for s in values])
                    for e in epsilons
                    if _has(values[0], attack, e)
                }
                for attack in ATTACK_LABELS
            },
            "checks_failed": sorted(
                {name for s in values for name, c in s.get("checks", {}).items() if c.get("passed") is False}
            ),
        }
    path.write_text(json.dumps(summary, indent=1) + "\n")
