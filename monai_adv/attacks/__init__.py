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

__all__ = [
    "AttackResult",
    "ClampMode",
    "Direction",
    "LossFunction",
    "NetworkMode",
    "NonFiniteLossError",
    "ZeroGradientAction",
    "ZeroInputGradientError",
    "clamp_bounds",
    "gradient_sign_attack",
    "input_gradient",
    "preserved_network_state",
    "project_and_clamp",
    "signed_gradient_step",
    "unwrap_network",
]
