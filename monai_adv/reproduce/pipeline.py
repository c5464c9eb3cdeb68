"""The reproduction of the paper's protocol as one study (:func:`paper_study`), run by the study runner.

The runner drives the bundle workflows for every arm and seed (each a ``monai.bundle.run`` call in this process,
its command line logged) and collects what their files say.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_adv.reproduce.profiles import PROFILES, Profile
from monai_adv.study.runner import StudyRunner
from monai_adv.study.spec import StudySpec, load_study

__all__ = ["ARMS", "Reproduction", "paper_epochs", "paper_study"]

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


def paper_study(profile: Profile, max_epochs: int | None = None) -> StudySpec:
    """The paper's protocol as a study: its five arms (UNet; FGSM and InvFGSM online; the same two offline, with
    copies made by the UNet arm's model), at the profile's epsilon, length and robustness budget."""
    epsilon = profile.adv_epsilon
    # the paper's FGSM whatever the bundle's default recipe is: no random start, appended copies
    online = {"adv#recipe": "paper", "adv#epsilon": epsilon, "adv#mode": "append"}
    offline = lambda method: {"from": "unet", "method": method, "epsilon": epsilon}
    arms = [
        {"name": "unet", "label": ARM_LABELS["unet"], "overrides": {"adv#method": "none"}},
        {"name": "fgsm_online", "label": ARM_LABELS["fgsm_online"], "overrides": {"adv#method": "fgsm", **online},
         "control": "unet"},
        {"name": "invfgsm_online", "label": ARM_LABELS["invfgsm_online"],
         "overrides": {"adv#method": "invfgsm", **online}, "control": "unet"},
        {"name": "fgsm_offline", "label": ARM_LABELS["fgsm_offline"], "overrides": {"adv#method": "none"},
         "offline": offline("fgsm"), "control": "unet"},
        {"name": "invfgsm_offline", "label": ARM_LABELS["invfgsm_offline"], "overrides": {"adv#method": "none"},
         "offline": offline("invfgsm"), "control": "unet"},
    ]  # fmt: skip
    return load_study({
        "name": "paper", "title": "Reproduction of the paper's protocol", "profile": profile.name,
        "overrides": {"max_epochs": int(max_epochs or profile.max_epochs)}, "plain_arm": "unet",
        "robustness": {"epsilons": list(profile.robust_epsilons), "iterative_epsilons": list(profile.iterative_epsilons),
                       "num_steps": profile.attack_steps, "num_examples": 4, "example_epsilon": epsilon},
        "arms": arms,
    })  # fmt: skip


class Reproduction(StudyRunner):
    """The reproduction: the paper's five arms for every seed as one study (:func:`paper_study`), run by the study
    runner (resumable), and the default robustness budget measured once.

    Args:
        dataset_dir: ``images/`` + ``masks/`` (+ ``split.json`` with ``train``/``validation``/``test`` ids).
        profile: the :class:`Profile`.
        seeds: training seeds.
        work_dir: where bundle roots, prepared data and logs go.
        max_epochs: override the profile's training length.
        bundle_dir: the bundle whose configs run (default :func:`~monai_adv.study.find_bundle_dir`).
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        profile: Profile,
        seeds: Sequence[int],
        work_dir: str | os.PathLike,
        max_epochs: int | None = None,
        bundle_dir: str | os.PathLike | None = None,
    ) -> None:
        if profile.name not in PROFILES or PROFILES[profile.name] != profile:
            raise ValueError(f"profile {profile.name!r} is not one of the reproduction's profiles {sorted(PROFILES)}.")
        epochs = int(max_epochs or profile.max_epochs)
        # every arm trains for the same length: the study runner's max_epochs applies it to each
        super().__init__(paper_study(profile, epochs), dataset_dir, seeds, work_dir, bundle_dir=bundle_dir,
                         max_epochs=epochs)  # fmt: skip

    def run(self) -> dict[str, Any]:
        """Train every arm for every seed, write the offline copies, evaluate robustness on the test split, and
        measure the default robustness budget.

        Returns:
            the raw results (also written to ``work_dir/raw_results.json``).
        """
        results = super().run()
        results["default_budget"] = self.default_budget(self.datalists["test"])
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
        root = self.root(seed, "unet")
        out = root / "robustness_default"
        defaults = json.loads((self.configs / "robustness.json").read_text())
        # the defaults written out, so that the command on the page says what ran and a changed default runs again
        budget = {key: defaults[key] for key in ("attacks", "epsilons", "num_steps", "restarts")}
        settings = {**self.profile.overrides, "seed": seed, "datalist_file": str(test_datalist),
                    "output_dir": str(out), "num_examples": 0, **budget}  # fmt: skip
        elapsed = self.step(out / "done.json", "robustness", ["robustness.json"], root, False, settings)
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
