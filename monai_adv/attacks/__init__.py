"""The pure core: signed-gradient perturbations in torch, with no MONAI or Ignite dependency."""

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
from monai_adv.attacks.network_state import NetworkMode, preserved_network_state, unwrap_network
from monai_adv.attacks.sweep import check_epsilons, gradient_sign_sweep, sweep_from_gradient

__all__ = [
    "AttackResult",
    "ClampMode",
    "Direction",
    "LossFunction",
    "NetworkMode",
    "NonFiniteLossError",
    "ZeroGradientAction",
    "ZeroInputGradientError",
    "check_epsilons",
    "clamp_bounds",
    "gradient_sign_attack",
    "gradient_sign_sweep",
    "input_gradient",
    "preserved_network_state",
    "project_and_clamp",
    "signed_gradient_step",
    "sweep_from_gradient",
    "unwrap_network",
]
