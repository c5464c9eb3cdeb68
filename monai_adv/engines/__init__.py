"""The adversarial training step (an ``iteration_update`` for MONAI trainers) and its recipes."""

from monai_adv.engines.adversarial_step import (
    AdversarialMethod,
    AdversarialTrainingStep,
    StepPlan,
    concatenate_batch,
    consistency_kl,
)
from monai_adv.engines.recipes import (
    PRESET_DEFAULTS,
    RECIPES,
    STEP_MODES,
    TrainingRecipe,
    epsilon_factor,
    recipe_preset,
)

__all__ = [
    "PRESET_DEFAULTS",
    "RECIPES",
    "STEP_MODES",
    "AdversarialMethod",
    "AdversarialTrainingStep",
    "StepPlan",
    "TrainingRecipe",
    "concatenate_batch",
    "consistency_kl",
    "epsilon_factor",
    "recipe_preset",
]
