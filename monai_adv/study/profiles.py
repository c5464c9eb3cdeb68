"""The profiles of the reproduction and the studies: how big a run is (images, network, epochs), not what it measures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PROFILES", "Profile"]


@dataclass(frozen=True)
class Profile:
    """Settings of one reproduction profile.

    Attributes:
        name: ``smoke``, ``cpu``, ``hippocampus_cpu`` or ``paper``.
        description: one line for the results page.
        overrides: bundle overrides for every workflow (image size, network, optimiser, loss...).
        training_overrides: overrides of the training workflow only (e.g. a cheaper inferer for the validation
            that picks the checkpoint); the test scores and attacks run without them, as the bundle evaluates.
        max_epochs: training length; the paper's epochs 0/10/20/30 are scaled to it.
        extra_configs: overlays added after ``train.json`` (e.g. ``paper.json``).
        adv_epsilon: epsilon of the augmentation (online and offline), the paper's 0.1.
        attack_steps: steps of every iterative attack of the robustness evaluation (PGD, SegPGD, CosPGD, APGD).
        robust_epsilons: the epsilons of the robustness evaluation: the paper's, and 2/255 and 4/255 for the
            ensemble.
        iterative_epsilons: where the iterative attacks and the ensemble run (FGSM and InvFGSM run at all).
        limits: at most this many items of ``train``/``validation``/``test`` (None: all).
        offline: whether the data can go through ``run augment`` (not z-scored volumes: its copies would be
            normalised again on reload).
        publish_config: the file in the bundle's ``configs/`` whose default recipe a study on this profile chooses
            (``python -m monai_adv.study.publish``): ``train.json``, or the overlay that holds the data's own
            defaults (``hippocampus.json``), so that 3D evidence sets the 3D default and leaves the 2D one alone.
    """

    name: str
    description: str
    overrides: dict[str, Any]
    max_epochs: int
    training_overrides: dict[str, Any] = field(default_factory=dict)
    extra_configs: tuple[str, ...] = ()
    adv_epsilon: float = 0.1
    attack_steps: int = 10
    robust_epsilons: tuple[float, ...] = (0.0, 2 / 255, 4 / 255, 0.0118, 0.1176)
    iterative_epsilons: tuple[float, ...] = (2 / 255, 4 / 255)
    limits: dict[str, int | None] = field(default_factory=lambda: {"train": None, "validation": None, "test": None})
    offline: bool = True
    publish_config: str = "train.json"


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        description="tiny check that the pipeline runs end to end (32x32 images, BasicUNet 8-32, 3 epochs, "
        "16/8/8 images); its numbers mean nothing",
        overrides={"image_size": 32, "features": [8, 8, 16, 16, 32, 8], "batch_size": 8, "learning_rate": 1e-3},
        max_epochs=3,
        attack_steps=3,
        limits={"train": 16, "validation": 8, "test": 8},
    ),
    "cpu": Profile(
        name="cpu",
        description="sized for a 2-core CPU (about 45 minutes for 3 seeds): 64x64 images, BasicUNet 16-128 features, "
        "Dice+CE loss, Adam 1e-3, batch 16, 12 epochs, iterative attacks with 5 steps (smaller and shorter than the "
        "paper's setup)",
        # adv#track_loss off: the handler's extra forward pass only logs the loss on the copies (saves ~10%)
        overrides={
            "image_size": 64,
            "features": [16, 16, 32, 64, 128, 16],
            "batch_size": 16,
            "learning_rate": 1e-3,
            "adv#track_loss": False,
        },
        max_epochs=12,
        attack_steps=5,
    ),
    "hippocampus_cpu": Profile(
        name="hippocampus_cpu",
        description="MSD Task04 Hippocampus volumes (configs/hippocampus.json: RAS, per-volume z-scoring, 48x64x48 "
        "padding, 32^3 training patches) sized for a 2-core CPU: 3D BasicUNet 8-64 features, Dice+CE, Adam 1e-3, "
        "batch 4 volumes x 2 patches, 30 epochs, in float32 (bfloat16 autocast takes 0.41x the time of a 3D step on "
        "a CPU with AVX-512 BF16/AMX but 30x on one without, where it is emulated: float32 keeps every arm and "
        "seed comparable on whichever machine runs it); test scores and attacks through the bundle's own "
        "SlidingWindowInferer (twelve 32^3 windows, the training patches, overlap 0.25); the training's validation, "
        "which picks the checkpoint, through one 48x64x48 window (the padded volume: 0.4x the time of the twelve "
        "windows); iterative attacks with 10 steps; epsilons in units of each volume's intensity standard deviation",
        overrides={
            "features": [8, 8, 16, 32, 64, 8],
            "batch_size": 4,
            "learning_rate": 1e-3,
            "adv#track_loss": False,
            "amp": False,  # explicit: the bundle's default is amp on CUDA
        },
        # one window holds a padded volume. Only for picking the checkpoint: a model trained on 32^3 patches scores
        # up to 5 Dice points lower through it than through the training patches' windows, and adversarially
        # trained ones lose more (docs/results_3d.md, before it scored through the bundle's windows)
        training_overrides={"validate#inferer#roi_size": [48, 64, 48]},
        max_epochs=30,
        extra_configs=("hippocampus.json",),
        attack_steps=10,
        robust_epsilons=(0.0, 2 / 255, 4 / 255),
        offline=False,
        publish_config="hippocampus.json",
    ),
    "paper": Profile(
        name="paper",
        description="the paper's setup (configs/paper.json): 128x128 images, BasicUNet 32-256, SGD lr 0.1 momentum "
        "0.99, categorical cross-entropy, batch 16, 30 epochs; for a GPU",
        overrides={},
        max_epochs=30,
        extra_configs=("paper.json",),
        attack_steps=10,
    ),
}
