"""Adversarial training recipes: how the training step uses the attack, and named presets of them.

A :class:`TrainingRecipe` says what the training step does with adversarial images (append them, replace part
of the batch, carry a perturbation over epochs), how the losses are weighted, whether a TRADES-style consistency
term is added, and how epsilon is scheduled. The attack itself is an :class:`~monai_adv.attacks.AttackSpec`.
:data:`RECIPES` names the presets that the bundle's ``--adv#recipe NAME`` selects; :func:`recipe_preset` gives
one as the flat settings the bundle's ``adv`` block reads, each of which a raw override (``--adv#epsilon``)
still replaces.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from monai_adv.attacks.spec import AttackSpec, create_dataclass
from monai_adv.errors import SettingsError

__all__ = ["PRESET_DEFAULTS", "RECIPES", "STEP_MODES", "TrainingRecipe", "epsilon_factor", "recipe_preset"]

#: ``"append"``: train on the batch and its copies; ``"replace"``: a fraction of the batch is replaced by its
#: copies; ``"free"``: each image's perturbation is kept across epochs and updated with the gradient of the
#: training step itself (Shafahi et al. 2019; per sample, ATTA, Zheng et al. 2020), one pass per step.
STEP_MODES = ("append", "replace", "free")


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"recipe option {name} must be a finite number >= 0, got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class TrainingRecipe:
    """What the adversarial training step does with the attack, validated when it is built.

    The training loss of a step is ``clean_weight * L(x) + adversarial_weight * mean_k L(x_adv_k) +
    consistency_weight * KL(p(x) || p(x_adv))``, over the samples that each term covers. With the weights left
    None, every sample counts once, as in a step on the concatenated batch (the paper's "data doubled": in append
    mode with ``k`` copies, ``1 / (1 + k)`` each).

    Attributes:
        mode: ``"append"``, ``"replace"`` or ``"free"`` (see :data:`STEP_MODES`).
        replace_fraction: share of each batch replaced in ``"replace"`` mode (1.0: adversarial-only batches).
        clean_weight: weight of the clean loss, or None (the share of clean samples).
        adversarial_weight: weight of the loss on the adversarial images, or None (their share).
        consistency_weight: β of the TRADES-style term ``KL(prediction on clean || prediction on adversarial)``,
            averaged over pixels (Zhang et al. 2019); 0 leaves it out.
        epsilon_warmup_epochs: epsilon grows linearly from ``epsilon / N`` at the first augmented epoch to
            ``epsilon`` at the ``N``-th; 0 is no warm-up.
        random_epsilon: each sample's epsilon is drawn from U(0, epsilon) at every step.
        start_epoch: the first epoch (from 1) that is augmented; earlier ones train on clean data.

    Raises:
        ValueError: for any option out of its range, naming it.
    """

    mode: Literal["append", "replace", "free"] = "append"
    replace_fraction: float = 0.5
    clean_weight: float | None = None
    adversarial_weight: float | None = None
    consistency_weight: float = 0.0
    epsilon_warmup_epochs: int = 0
    random_epsilon: bool = False
    start_epoch: int = 1

    def __post_init__(self) -> None:
        put = object.__setattr__
        if not isinstance(self.mode, str) or self.mode.strip().lower() not in STEP_MODES:
            raise ValueError(f"recipe option mode={self.mode!r} is not one of {list(STEP_MODES)}.")
        put(self, "mode", self.mode.strip().lower())
        fraction = self.replace_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"recipe option replace_fraction must be in (0, 1], got {fraction!r}.")
        put(self, "replace_fraction", float(fraction))
        for name in ("clean_weight", "adversarial_weight"):
            if getattr(self, name) is not None:
                put(self, name, _non_negative(name, getattr(self, name)))
        put(self, "consistency_weight", _non_negative("consistency_weight", self.consistency_weight))
        for name, low in (("epsilon_warmup_epochs", 0), ("start_epoch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"recipe option {name} must be an integer >= {low}, got {value!r}.")
            put(self, name, int(value))
        if not isinstance(self.random_epsilon, bool):
            raise TypeError(f"recipe option random_epsilon must be true or false, got {self.random_epsilon!r}.")
        if self.mode == "free" and (self.consistency_weight or self.clean_weight or self.adversarial_weight):
            raise ValueError(
                "recipe mode 'free' trains on x + delta only (one pass per step): clean_weight, adversarial_weight "
                "and consistency_weight do not apply to it."
            )
        if self.clean_weight == 0.0 and self.adversarial_weight == 0.0 and not self.consistency_weight:
            raise ValueError("recipe weights are all zero: the step would train on nothing.")

    @classmethod
    def create(cls, recipe: TrainingRecipe | Mapping[str, Any] | None = None, **options: Any) -> TrainingRecipe:
        """A recipe from another one or a mapping, with ``options`` replacing fields.

        Raises:
            TypeError: for an unknown option, listing the valid ones.
            ValueError: for a bad value (see the class).
        """
        return create_dataclass(cls, recipe, options, "recipe", "recipe must be a TrainingRecipe, a mapping or None")

    def as_dict(self) -> dict[str, Any]:
        """The options as plain values (for logs and MLflow parameters)."""
        return dataclasses.asdict(self)


def epsilon_factor(recipe: TrainingRecipe, epoch: int) -> float:
    """The share of epsilon used at ``epoch`` (from 1): 0 before ``start_epoch``, then the warm-up's ramp.

    Raises:
        ValueError: for an epoch below 1.
    """
    if epoch < 1:
        raise ValueError(f"epochs count from 1, got {epoch}.")
    if epoch < recipe.start_epoch:
        return 0.0
    if recipe.epsilon_warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch - recipe.start_epoch + 1) / recipe.epsilon_warmup_epochs)


_ROBUST_EPSILON = 4 / 255
#: N-FGSM's attack: noise U(-2e, 2e), one step of e, no projection, adversarial-only batches (its variants below
#: change the radius or the replaced fraction)
_NFGSM: dict[str, Any] = {
    "epsilon": _ROBUST_EPSILON,
    "random_start": True,
    "start_radius": 2.0,
    "relative_step": 1.0,
    "project": False,
    "mode": "replace",
    "replace_fraction": 1.0,
}
#: The named recipes: each a set of bundle ``adv`` settings (``method``, the attack's and the recipe's options).
#: Robust-training recipes use epsilon 4/255 on images in [0, 1]; ``paper`` keeps the paper's 0.1.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {
        "_desc_": "the paper: FGSM copies at a fixed epsilon of 0.1, appended (the batch doubled)",
        "method": "fgsm",
        "epsilon": 0.1,
    },
    "nfgsm": {
        "_desc_": "N-FGSM (de Jorge et al. 2022): noise U(-2e, 2e), one step of e, no projection, adversarial-only",
        **_NFGSM,
    },
    "nfgsm_eps2": {
        "_desc_": "N-FGSM at epsilon 2/255 (noise U(-4/255, 4/255), one step of 2/255), adversarial-only",
        **_NFGSM,
        "epsilon": 2 / 255,
    },
    "nfgsm_mixed": {
        "_desc_": "N-FGSM at 4/255 on half of each batch, the other half clean (the images of plain training)",
        **_NFGSM,
        "replace_fraction": 0.5,
    },
    "nfgsm_eps2_mixed": {
        "_desc_": "N-FGSM at 2/255 on half of each batch, the other half clean: less robustness bought for less "
        "clean IoU",
        **_NFGSM,
        "epsilon": 2 / 255,
        "replace_fraction": 0.5,
    },
    "nfgsm_eps1_mixed": {
        "_desc_": "N-FGSM at 1/255 on half of each batch, the other half clean: the mildest robust recipe",
        **_NFGSM,
        "epsilon": 1 / 255,
        "replace_fraction": 0.5,
    },
    "nfgsm_eps1_quarter": {
        "_desc_": "N-FGSM at 1/255 on a quarter of each batch, the rest clean: a smaller adversarial share",
        **_NFGSM,
        "epsilon": 1 / 255,
        "replace_fraction": 0.25,
    },
    "nfgsm_eps1_eighth": {
        "_desc_": "N-FGSM at 1/255 on an eighth of each batch (2 of 16 images), the rest clean",
        **_NFGSM,
        "epsilon": 1 / 255,
        "replace_fraction": 0.125,
    },
    "fgsm_rs": {
        "_desc_": "FGSM with a random start and a step of 1.25e, projected (Wong et al. 2020), adversarial-only",
        "epsilon": _ROBUST_EPSILON,
        "random_start": True,
        "relative_step": 1.25,
        "mode": "replace",
        "replace_fraction": 1.0,
    },
    "pgd": {
        "_desc_": "PGD-3 adversarial training (Madry et al. 2018): random start, 3 steps of e/2, adversarial-only",
        "epsilon": _ROBUST_EPSILON,
        "num_steps": 3,
        "random_start": True,
        "relative_step": 0.5,
        "mode": "replace",
        "replace_fraction": 1.0,
    },
    "trades": {
        "_desc_": "TRADES-style: the clean loss plus 6 * KL(clean || FGSM copy) (Zhang et al. 2019)",
        "epsilon": _ROBUST_EPSILON,
        "clean_weight": 1.0,
        "adversarial_weight": 0.0,
        "consistency_weight": 6.0,
    },
    "finetune": {
        "_desc_": "the authors' code: continue a clean training (--init_ckpt its model.pt) on FGSM copies at 0.1 only",
        "method": "fgsm",
        "epsilon": 0.1,
        "mode": "replace",
        "replace_fraction": 1.0,
    },
    "free": {
        "_desc_": "free adversarial training: a per-image perturbation carried over epochs, one pass per step",
        "epsilon": _ROBUST_EPSILON,
        "mode": "free",
    },
}

#: Every setting a preset may give, with its default (the bundle's ``adv`` block reads each).
_PRESET_ATTACK_OPTIONS = ("epsilon", "num_steps", "random_start", "start_radius", "relative_step", "project")
PRESET_DEFAULTS: dict[str, Any] = {
    "method": "fgsm",
    **{f.name: f.default for f in dataclasses.fields(AttackSpec) if f.name in _PRESET_ATTACK_OPTIONS},
    **{f.name: f.default for f in dataclasses.fields(TrainingRecipe)},
}


def recipe_preset(name: str) -> dict[str, Any]:
    """The settings of the named recipe, every key of :data:`PRESET_DEFAULTS` present.

    Raises:
        SettingsError: (a ``ValueError``) for an unknown name, listing the known ones.
    """
    key = str(name).strip().lower()
    if key not in RECIPES:
        raise SettingsError(f"--adv#recipe must be one of {', '.join(RECIPES)}; got {name!r}.")
    preset = {k: v for k, v in RECIPES[key].items() if not k.startswith("_")}
    return {**PRESET_DEFAULTS, **preset, "recipe": key}
