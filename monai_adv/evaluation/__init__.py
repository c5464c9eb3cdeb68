"""Shells over the attack core for evaluation and the offline protocol: robustness curves, adversarial copies, figures."""

from monai_adv.evaluation.augment import AdversarialDatasetWriter, save_scaled_image
from monai_adv.evaluation.figures import plot_robustness_curve, save_example_grid
from monai_adv.evaluation.inferer import InfererNetwork
from monai_adv.evaluation.robustness import (
    ATTACKS,
    DEFAULT_EPSILONS,
    RobustnessEvaluator,
    format_table,
    load_network_weights,
)

__all__ = [
    "ATTACKS",
    "DEFAULT_EPSILONS",
    "AdversarialDatasetWriter",
    "InfererNetwork",
    "RobustnessEvaluator",
    "format_table",
    "load_network_weights",
    "plot_robustness_curve",
    "save_example_grid",
    "save_scaled_image",
]
