"""The pure core: signed-gradient perturbations in torch, with no MONAI or Ignite dependency."""

from monai_adv.attacks.attack import apgd_checkpoints, run_attack
from monai_adv.attacks.gradient_sign import (
    AttackResult,
    ClampMode,
    Direction,
    LossFunction,
    NonFiniteLossError,
    ZeroGradientAction,
    ZeroInputGradientError,
    clamp_bounds,
    gradient_sign_attack,
    input_gradient,
    project_and_clamp,
    signed_gradient_step,
)
from monai_adv.attacks.losses import attack_loss, per_image_iou
from monai_adv.attacks.network_state import NetworkMode, preserved_network_state, unwrap_network
from monai_adv.attacks.spec import ATTACK_LOSSES, SCHEDULES, AttackSpec, check_value_range
from monai_adv.attacks.sweep import check_epsilons, gradient_sign_sweep, sweep_from_gradient

__all__ = [
    "ATTACK_LOSSES",
    "SCHEDULES",
    "AttackResult",
    "AttackSpec",
    "ClampMode",
    "Direction",
    "LossFunction",
    "NetworkMode",
    "NonFiniteLossError",
    "ZeroGradientAction",
    "ZeroInputGradientError",
    "apgd_checkpoints",
    "attack_loss",
    "check_epsilons",
    "check_value_range",
    "clamp_bounds",
    "gradient_sign_attack",
    "gradient_sign_sweep",
    "input_gradient",
    "per_image_iou",
    "preserved_network_state",
    "project_and_clamp",
    "run_attack",
    "signed_gradient_step",
    "sweep_from_gradient",
    "unwrap_network",
]
