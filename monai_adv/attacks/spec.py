"""One attack specification, validated once when it is built.

:class:`AttackSpec` holds every option of an attack (direction, steps, schedule, loss, radius schedule, restarts,
clamping, network mode, AMP). The core (:func:`~monai_adv.attacks.attack.run_attack`), the MONAI transforms, the
training handler, the robustness evaluator and the bundle configs all take one, so an option is written, documented
and checked in one place, and a bad option fails when the spec (or the transform holding it) is constructed,
naming the option, not at the first call.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "ATTACK_LOSSES",
    "CLAMP_MODES",
    "DIRECTIONS",
    "NETWORK_MODES",
    "SCHEDULES",
    "ZERO_GRADIENT_ACTIONS",
    "AttackSpec",
    "check_value_range",
]

#: ``"ascend"`` (FGSM: raise the loss) or ``"descend"`` (Inverse FGSM: lower it).
DIRECTIONS = ("ascend", "descend")
#: ``"range"`` (a fixed value range), ``"image"`` (each image's own min/max) or ``"none"``.
CLAMP_MODES = ("range", "image", "none")
#: Network mode while attacking.
NETWORK_MODES = ("eval", "train", "unchanged")
#: What to do when the input gradient is zero everywhere.
ZERO_GRADIENT_ACTIONS = ("raise", "warn", "ignore")
#: ``"sign"``: signed-gradient steps of a fixed size (FGSM, I-FGSM, PGD); ``"apgd"``: Auto-PGD (Croce & Hein 2020)
#: with momentum, checkpoints and step halving.
SCHEDULES = ("sign", "apgd")
#: Per-pixel attack losses of :mod:`monai_adv.attacks.losses`; None (in a spec) means the loss function given
#: to the attack, e.g. the training loss.
ATTACK_LOSSES = ("ce", "dice", "segpgd", "cospgd", "js", "masked_ce", "balanced_ce")


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise ValueError(f"attack option {name}={value!r} is not one of {list(choices)}.")
    return value.strip().lower()


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"attack option {name} must be a positive integer, got {value!r}.")
    return int(value)


def _positive_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"attack option {name} must be a positive number, got {value!r}.")
    return float(value)


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"attack option {name} must be true or false, got {value!r}.")


def _epsilon(value: Any) -> float | tuple[float, float]:
    """A number, or a ``(low, high)`` range sampled per call by the transforms."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        low = high = float(value)
        single = True
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        try:
            low, high = (float(v) for v in value)
        except (TypeError, ValueError):
            raise TypeError(f"attack option epsilon must be a number or a (low, high) pair, got {value!r}.") from None
        single = False
    else:
        raise TypeError(f"attack option epsilon must be a number or a (low, high) pair, got {value!r}.")
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or low > high:
        raise ValueError(f"attack option epsilon must be finite and non-negative with low <= high, got {value!r}.")
    return low if single else (low, high)


def create_dataclass(cls: type, source: Any, options: Mapping[str, Any], what: str, expected: str) -> Any:
    """``cls`` built from another instance of it or a mapping of its fields (or None), with ``options`` replacing
    fields; the constructor validates them. Shared by :class:`AttackSpec` and the training recipes.

    Args:
        cls: the dataclass.
        source: an instance, a mapping of fields, or None.
        options: fields that replace the source's.
        what: the options' name in messages (``"attack"``: "unknown attack option(s)").
        expected: the message for a source of another kind, without its ending (", got <type>.").

    Raises:
        TypeError: for a source of another kind, or an unknown option name (listing the valid ones).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    base: dict[str, Any] = {}
    if isinstance(source, cls):
        base = {name: getattr(source, name) for name in names}
    elif isinstance(source, Mapping):
        base = dict(source)
    elif source is not None:
        raise TypeError(f"{expected}, got {type(source).__name__}.")
    base.update(options)
    unknown = sorted(set(base) - names)
    if unknown:
        raise TypeError(f"unknown {what} option(s) {unknown}: the options are {sorted(names)}.")
    return cls(**base)


def check_value_range(value_range: Any, owner: str = "value_range") -> tuple[float, float]:
    """The ``(low, high)`` of a value range, checked once for every owner (attacks, clamps, training augmentation).

    Args:
        value_range: two numbers, ``low < high``, both finite.
        owner: what the message names (``"attack option value_range"``, ...).

    Returns:
        ``(low, high)`` as floats.

    Raises:
        ValueError: naming ``owner`` and the value, when it is not two finite numbers with ``low < high``.
    """
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"{owner} must be finite (low, high) with low < high, got {value_range!r}.") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{owner} must be finite (low, high) with low < high, got {(low, high)}.")
    return low, high


@dataclass(frozen=True)
class AttackSpec:
    """What an attack does, checked when it is built (every field is validated in ``__post_init__``).

    With the defaults it is FGSM: one signed-gradient step of size ``epsilon`` that raises the given loss.
    ``direction="descend"`` is Inverse FGSM. ``num_steps > 1`` is I-FGSM, and with ``random_start`` PGD.
    ``schedule="apgd"`` is Auto-PGD. ``loss`` picks one of the per-pixel segmentation attack losses
    (:mod:`monai_adv.attacks.losses`) instead of the given loss function. ``radii`` shrinks the radius over the
    steps (SEA's 2ε → 1.5ε → ε is ``(2.0, 1.5, 1.0)``). ``restarts`` repeats the attack from random starts and
    keeps, per image, the worst result. ``keep_best`` returns, per image, the iterate with the lowest IoU instead
    of the last one.

    Attributes:
        epsilon: L-infinity radius in image units, or a ``(low, high)`` range that the transforms sample per call.
        direction: ``"ascend"`` (raise the loss: FGSM, PGD) or ``"descend"`` (lower it: Inverse FGSM).
        num_steps: gradient steps (1: the single-step method). With ``radii`` they are split over the stages.
        step_size: size of a ``"sign"`` step; default ``epsilon`` for one step, else ``2.5 * epsilon / num_steps``.
            APGD chooses its own (``2 * epsilon``, halved when progress stalls).
        random_start: start from a uniform random point of the epsilon ball (of ``start_radius * epsilon``).
        start_radius: the random start's radius as a multiple of ``epsilon``; above 1 (N-FGSM's noise
            U(-2ε, 2ε) is 2.0) it needs ``project=False``, else the start would be projected back.
        relative_step: a ``"sign"`` step of ``relative_step * epsilon`` (FGSM-RS's 1.25, N-FGSM's 1.0); it follows
            a per-sample or scheduled epsilon, unlike ``step_size``. At most one of the two.
        project: project the iterates onto the epsilon ball (PGD). False keeps only the value bounds: N-FGSM's
            perturbation (noise plus one step) may reach ``(start_radius + relative_step) * epsilon``.
        schedule: ``"sign"`` or ``"apgd"``.
        loss: None (the loss function given to the attack) or one of ``ce``, ``dice``, ``segpgd``, ``cospgd``,
            ``js``, ``masked_ce``, ``balanced_ce``.
        radii: radius multipliers of ``epsilon`` per stage, decreasing, the last 1.0. Only the last stage's
            iterates (inside the epsilon ball) are returned.
        restarts: runs of the attack (the first from the clean image unless ``random_start``, the others from
            random starts); the worst per image is kept.
        keep_best: return each image's lowest-IoU iterate (needs labels of the prediction's classes).
        clamp: ``"range"`` (``value_range``), ``"image"`` (each image's own min/max) or ``"none"``.
        value_range: ``(low, high)`` bounds for ``clamp="range"``.
        network_mode: ``"eval"``, ``"train"`` or ``"unchanged"`` while attacking.
        amp: forward passes under ``torch.autocast``.
        on_zero_gradient: ``"raise"``, ``"warn"`` or ``"ignore"`` when the first input gradient is zero everywhere.

    Raises:
        ValueError: for any option out of its range, naming it (e.g. ``clamp='bogus'``, ``num_steps=0``).
        TypeError: for an epsilon that is neither a number nor a ``(low, high)`` pair.
    """

    epsilon: float | tuple[float, float] = 0.1
    direction: Literal["ascend", "descend"] = "ascend"
    num_steps: int = 1
    step_size: float | None = None
    random_start: bool = False
    start_radius: float = 1.0
    relative_step: float | None = None
    project: bool = True
    schedule: Literal["sign", "apgd"] = "sign"
    loss: str | None = None
    radii: tuple[float, ...] = (1.0,)
    restarts: int = 1
    keep_best: bool = False
    clamp: Literal["range", "image", "none"] = "range"
    value_range: tuple[float, float] = (0.0, 1.0)
    network_mode: Literal["eval", "train", "unchanged"] = "eval"
    amp: bool = False
    on_zero_gradient: Literal["raise", "warn", "ignore"] = "raise"

    def __post_init__(self) -> None:
        put = object.__setattr__  # a frozen dataclass normalises its own fields here only
        put(self, "epsilon", _epsilon(self.epsilon))
        put(self, "direction", _choice("direction", self.direction, DIRECTIONS))
        put(self, "num_steps", _positive_int("num_steps", self.num_steps))
        if self.step_size is not None:
            if isinstance(self.step_size, bool) or not isinstance(self.step_size, numbers.Real):
                raise ValueError(f"attack option step_size must be a positive number or None, got {self.step_size!r}.")
            if not (math.isfinite(float(self.step_size)) and float(self.step_size) > 0):
                raise ValueError(f"attack option step_size must be a positive number or None, got {self.step_size!r}.")
            put(self, "step_size", float(self.step_size))
        put(self, "random_start", _as_bool("random_start", self.random_start))
        put(self, "start_radius", _positive_real("start_radius", self.start_radius))
        if self.relative_step is not None:
            put(self, "relative_step", _positive_real("relative_step", self.relative_step))
            if self.step_size is not None:
                raise ValueError(
                    f"attack options step_size={self.step_size!r} and relative_step={self.relative_step!r} both set "
                    "the step: give one."
                )
        put(self, "project", _as_bool("project", self.project))
        if self.start_radius > 1.0 and self.project:
            raise ValueError(
                f"attack option start_radius={self.start_radius:g} is outside the epsilon ball, and project=True "
                "would project the start back onto it: set project=False (N-FGSM) or start_radius <= 1."
            )
        put(self, "schedule", _choice("schedule", self.schedule, SCHEDULES))
        if self.loss is not None:
            put(self, "loss", _choice("loss", self.loss, ATTACK_LOSSES))
        radii = (self.radii,) if isinstance(self.radii, numbers.Real) else self.radii
        try:
            radii = tuple(float(r) for r in radii)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"attack option radii must be a sequence of numbers, got {self.radii!r}.") from None
        if not radii or radii[-1] != 1.0 or any(not math.isfinite(r) or r < 1.0 for r in radii):
            raise ValueError(f"attack option radii must be multipliers >= 1 of epsilon ending with 1.0, got {radii}.")
        if any(a < b for a, b in itertools.pairwise(radii)):
            raise ValueError(f"attack option radii must not increase (a shrinking radius), got {radii}.")
        if len(radii) > self.num_steps:
            raise ValueError(f"attack option radii has {len(radii)} stages but num_steps is {self.num_steps}.")
        put(self, "radii", radii)
        put(self, "restarts", _positive_int("restarts", self.restarts))
        put(self, "keep_best", _as_bool("keep_best", self.keep_best))
        put(self, "clamp", _choice("clamp", self.clamp, CLAMP_MODES))
        put(self, "value_range", check_value_range(self.value_range, "attack option value_range"))
        put(self, "network_mode", _choice("network_mode", self.network_mode, NETWORK_MODES))
        put(self, "amp", _as_bool("amp", self.amp))
        put(self, "on_zero_gradient", _choice("on_zero_gradient", self.on_zero_gradient, ZERO_GRADIENT_ACTIONS))
        if self.schedule == "apgd" and not self.project:
            raise ValueError("attack option project=False is for signed steps (N-FGSM); APGD works in the ball.")
        if self.schedule == "apgd" and self.loss is None:
            raise ValueError(
                "attack option schedule='apgd' needs a per-image loss: give loss (e.g. 'ce', 'js', 'masked_ce')."
            )
        if self.direction == "descend" and (self.keep_best or self.restarts > 1):
            raise ValueError(
                "attack options keep_best and restarts keep each image's lowest-IoU result: they are for attacks "
                "(direction='ascend'), not for Inverse FGSM."
            )
        if self.direction == "descend" and self.loss not in (None, "ce", "dice"):
            raise ValueError(
                f"attack option loss={self.loss!r} is an attack loss (it weights pixels to break the prediction); "
                "direction='descend' (Inverse FGSM) lowers the given loss, or 'ce'/'dice'."
            )

    @classmethod
    def create(cls, spec: AttackSpec | Mapping[str, Any] | None = None, **options: Any) -> AttackSpec:
        """A spec from another spec or a mapping of options, with ``options`` replacing fields.

        Raises:
            TypeError: for an unknown option name, listing the valid ones.
            ValueError: for a bad option value (see the class).
        """
        return create_dataclass(
            cls, spec, options, "attack", "spec must be an AttackSpec, a mapping of its options or None"
        )

    def replace(self, **options: Any) -> AttackSpec:
        """A copy with ``options`` replaced (and validated)."""
        return AttackSpec.create(self, **options)

    def as_dict(self) -> dict[str, Any]:
        """The options as plain values (for logs, JSON and MLflow parameters)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def single_step(self) -> bool:
        """One signed step from the clean image: all it needs is the input gradient there (the fused training
        step can take it from its own backward pass)."""
        return (
            self.num_steps == 1
            and not self.random_start
            and self.schedule == "sign"
            and self.restarts == 1
            and not self.keep_best
            and self.loss is None
        )

    def step_for(self, epsilon: float) -> float:
        """The ``"sign"`` step size at this epsilon (see ``step_size``)."""
        if self.step_size is not None:
            return self.step_size
        if self.relative_step is not None:
            return self.relative_step * epsilon
        return epsilon if self.num_steps == 1 else 2.5 * epsilon / self.num_steps
