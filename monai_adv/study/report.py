"""The study's page: every arm's scores over seeds, paired differences against its compute-matched control with
bootstrap intervals, cost, a Pareto plot, the default chosen by the stated rule, and the commands that ran.

Every number on the page is computed here from the raw results that :class:`~monai_adv.study.StudyRunner`
collected from the workflows' files; nothing is typed by hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_adv.study.spec import StudySpec

__all__ = [
    "arm_cost",
    "choose_default",
    "epsilon_name",
    "mean_std",
    "paired_bootstrap",
    "plateau_epoch",
    "step_ratio",
    "study_compute",
    "summarize",
    "write_study_report",
]

#: the rule's tolerance on clean IoU against the compute-matched control (1 IoU point)
CLEAN_TOLERANCE = 0.01
#: the target: at least this multiple of the control's robust IoU at the first quoted epsilon
ROBUST_FACTOR = 2.0
#: the seeds a candidate needs for the rule to count it (fewer when no candidate has this many)
MIN_SEEDS = 3
BOOTSTRAP_SAMPLES = 2000


def epsilon_name(epsilon: float) -> str:
    """An epsilon on the 8-bit scale the pages quote: ``2/255``."""
    return f"{255 * float(epsilon):.0f}/255"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def _fmt(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    if not values:
        return "–"
    mean, std = mean_std([scale * v for v in values])
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def robust_key(epsilon: float) -> str:
    """The per-image key of the ensemble at ``epsilon``."""
    return f"ensemble@{epsilon:g}"


def _row_value(result: Mapping[str, Any], attack: str, epsilon: float, key: str) -> float:
    for row in result["robustness"]:
        if row["attack"] == attack and math.isclose(row["epsilon"], epsilon, rel_tol=1e-6, abs_tol=1e-12):
            return float(row[key])
    raise KeyError(f"no {attack} row at epsilon {epsilon:g} in {result.get('root')}.")


def clean_score(result: Mapping[str, Any], key: str = "mean_iou") -> float:
    """Clean test score of the arm's best checkpoint (the epsilon-0 row of its robustness run)."""
    for row in result["robustness"]:
        if row["epsilon"] == 0:
            return float(row[key])
    raise KeyError(f"no clean (epsilon 0) row in {result.get('root')}.")


def robust_score(result: Mapping[str, Any], epsilon: float) -> float:
    """Mean IoU under the ensemble at ``epsilon``."""
    return _row_value(result, "ensemble", epsilon, "mean_iou")


def paired_bootstrap(
    arm: Mapping[str, Mapping[str, float]],
    control: Mapping[str, Mapping[str, float]],
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """The mean paired difference (arm minus control) of a per-image score, with a 95% percentile interval from a
    bootstrap over seeds and test images.

    Seeds are paired by number, images by name; each bootstrap sample draws seeds with replacement, then images
    with replacement (the same images for every drawn seed, as the test set is shared), and averages the
    differences. Images with a NaN score (no foreground) are left out.

    Args:
        arm, control: ``{seed: {image: score}}``.
        samples: bootstrap samples.
        seed: of the bootstrap's generator (the page is reproducible).

    Returns:
        ``{"mean", "low", "high", "seeds", "images"}``; ``mean`` is None when no seed is shared.
    """
    seeds = sorted(set(arm) & set(control), key=int)
    if not seeds:
        return {"mean": None, "low": None, "high": None, "seeds": 0, "images": 0}
    images = sorted(set.intersection(*(set(arm[s]) & set(control[s]) for s in seeds)))
    diff = np.array([[arm[s][i] - control[s][i] for i in images] for s in seeds], dtype=float)
    keep = ~np.isnan(diff).any(axis=0)
    diff = diff[:, keep]
    if diff.size == 0:
        return {"mean": None, "low": None, "high": None, "seeds": len(seeds), "images": 0}
    rng = np.random.default_rng(seed)
    n_seeds, n_images = diff.shape
    seed_draw = rng.integers(0, n_seeds, size=(samples, n_seeds))
    image_draw = rng.integers(0, n_images, size=(samples, n_images))
    means = np.array([diff[np.ix_(s, i)].mean() for s, i in zip(seed_draw, image_draw)])
    return {"mean": float(diff.mean()), "low": float(np.percentile(means, 2.5)),
            "high": float(np.percentile(means, 97.5)), "seeds": n_seeds, "images": n_images}  # fmt: skip


def arm_cost(results: Mapping[str, Any], spec: StudySpec, arm: str, seed: str) -> dict[str, float]:
    """One arm's training cost for one seed, with what it builds on (the arm it starts from, the arm whose model
    made its offline copies, and writing those copies).

    Returns:
        ``{"iterations", "images", "seconds", "own_seconds"}`` (seconds: training wall time, validation excluded,
        plus the offline writing; the time per step against the plain arm is :func:`step_ratio`).
    """
    result = results["arms"][arm][seed]
    cost = result["cost"]
    total = {"iterations": float(cost["iterations"]), "images": float(cost["images"]),
             "seconds": float(cost["train_seconds"]) + float(cost.get("offline_seconds", 0.0))}  # fmt: skip
    for other in spec.arm(arm).depends_on:
        if seed in results["arms"].get(other, {}):
            below = arm_cost(results, spec, other, seed)
            for key in ("iterations", "images", "seconds"):
                total[key] += below[key]
    return {**total, "own_seconds": float(cost["train_seconds"])}


def study_compute(results: Mapping[str, Any]) -> dict[str, float]:
    """The wall time behind a study's results: every arm-seed's own steps, each counted once (what an arm builds on
    is its own arm-seed, so unlike :func:`arm_cost` nothing is counted twice).

    Results recorded before a step's time was kept count that step as 0 s.

    Returns:
        ``{"runs", "train_seconds", "offline_seconds", "robustness_seconds", "evaluation_seconds",
        "total_seconds"}`` (training: the whole training step, validation included).
    """
    total = {"runs": 0.0, "train_seconds": 0.0, "offline_seconds": 0.0, "robustness_seconds": 0.0,
             "evaluation_seconds": 0.0}  # fmt: skip
    for runs in results.get("arms", {}).values():
        for result in runs.values():
            cost = result.get("cost", {})
            total["runs"] += 1
            total["train_seconds"] += float(cost.get("wall_seconds", cost.get("train_seconds", 0.0)))
            total["offline_seconds"] += float(cost.get("offline_seconds", 0.0))
            total["robustness_seconds"] += float(result.get("robustness_seconds", 0.0))
            total["evaluation_seconds"] += sum(
                float(e.get("seconds", 0.0)) for e in result.get("clean_evaluations", {}).values()
            )
    total["total_seconds"] = sum(v for k, v in total.items() if k.endswith("_seconds"))
    return total


def _compute_line(results: Mapping[str, Any]) -> str:
    compute = study_compute(results)

    def duration(key: str) -> str:  # hours, minutes or seconds: a clean evaluation of a few seconds is not "0.0 h"
        seconds = compute[key]
        if seconds >= 3600:
            return f"{seconds / 3600:.1f} h"
        return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"

    parts = [f"training {duration('train_seconds')}"]
    parts += [f"offline copies {duration('offline_seconds')}"] * (compute["offline_seconds"] > 0)
    parts += [f"robustness {duration('robustness_seconds')}"]
    parts += [f"clean evaluations {duration('evaluation_seconds')}"] * (compute["evaluation_seconds"] > 0)
    return (f"- compute behind this page: {compute['runs']:.0f} arm-seed runs, {duration('total_seconds')} of wall time "
            f"({', '.join(parts)}; each run's own steps, on the machines above)")  # fmt: skip


def step_ratio(cost: Mapping[str, Any], plain_cost: Mapping[str, Any]) -> tuple[float, str]:
    """An arm's time per optimiser step as a multiple of the plain arm's (its own training, not what it builds on).

    CPU time (the process's, all threads) when both runs recorded it: another job on the machine stretches the
    wall time of whatever runs beside it, and the CPU time much less; else the wall time.

    Returns:
        ``(ratio, "cpu" or "wall")``.
    """
    clock = "cpu" if "train_cpu_seconds" in cost and "train_cpu_seconds" in plain_cost else "wall"
    key = "train_cpu_seconds" if clock == "cpu" else "train_seconds"
    per_step = float(cost[key]) / max(float(cost["iterations"]), 1.0)
    plain_step = float(plain_cost[key]) / max(float(plain_cost["iterations"]), 1.0)
    return per_step / plain_step, clock


def _plain_reference(
    plain_runs: Mapping[str, Any], run: Mapping[str, Any], seed: str
) -> tuple[dict[str, float] | None, str | None]:
    """The plain arm's cost to time one run against: the same seed's when both trained on the same recorded
    machine; else the mean cost of the plain runs that trained on this run's machine (time per step does not
    depend on the seed, and it does on the machine: the EPYC here takes about 1.7x the Xeon's); else the same
    seed's, marked.

    Returns:
        ``(cost, None)``, or ``(cost, "other machine")`` when no plain run shares this run's machine; ``(None,
        None)`` without a plain run of this seed or machine.
    """
    machine = run.get("machine")
    same_seed = plain_runs.get(seed)
    if same_seed is not None and same_seed.get("machine") == machine:
        return dict(same_seed["cost"]), None
    peers = [r["cost"] for r in plain_runs.values() if machine is not None and r.get("machine") == machine]
    keys = ("train_seconds", "train_cpu_seconds", "iterations")
    if peers:
        shared = [k for k in keys if all(k in c for c in peers)]
        return {k: float(np.mean([float(c[k]) for c in peers])) for k in shared}, None
    if same_seed is not None:
        return dict(same_seed["cost"]), "other machine"
    return None, None


def plateau_epoch(curve: Mapping[str, float], tolerance: float = CLEAN_TOLERANCE) -> int | None:
    """The first epoch from which the best validation IoU so far stays within ``tolerance`` of the run's best."""
    if not curve:
        return None
    epochs = sorted(int(e) for e in curve)
    best = max(curve.values())
    running = -math.inf
    for epoch in epochs:
        running = max(running, curve[str(epoch)])
        if running >= best - tolerance:
            return epoch
    return epochs[-1]


def _ratio_cell(entry: Mapping[str, Any]) -> str:
    ratios = entry.get("step_ratio") or []
    if not ratios:
        return "–"
    marks = ["wall"] * ("wall" in entry.get("step_ratio_clock", [])) + list(entry.get("step_ratio_notes", []))
    return _fmt(ratios, digits=2) + "x" + (f" ({', '.join(marks)})" if marks else "")


def _arms_by(summary: Mapping[str, Any], key: str) -> str:
    """``value (arm, arm...); value (...)``: the arms whose runs recorded each value of ``key`` (``code``: the code
    version; ``machines``: where they trained; :func:`summarize` lists results recorded before a key was kept as
    ``unknown`` and ``not recorded``)."""
    arms_by_value: dict[str, list[str]] = {}
    for name, entry in summary["arms"].items():
        for value in entry.get(key, []):
            arms_by_value.setdefault(value, []).append(name)
    return "; ".join(f"{v} ({', '.join(a)})" for v, a in arms_by_value.items()) or "none yet"


def summarize(results: Mapping[str, Any], spec: StudySpec) -> dict[str, Any]:
    """Per arm: scores over seeds, cost, and the paired differences against its control.

    An arm with a control also gets its ``clean_reference``: the arm its clean IoU is held to by the rule and the
    target, its control or the plain arm, whichever has the higher mean clean IoU over the arm's seeds.

    Returns:
        ``{"arms": {arm: {...}}, "epsilons": [...], "plain_arm"}``.
    """
    epsilons = spec.quoted_epsilons
    plain = spec.plain_arm
    out: dict[str, Any] = {"arms": {}, "epsilons": epsilons, "plain_arm": plain}
    for arm in spec.arms:
        runs = results["arms"].get(arm.name)
        if not runs:
            continue
        seeds = sorted(runs, key=int)
        entry: dict[str, Any] = {
            "label": arm.label,
            "seeds": [int(s) for s in seeds],
            "clean_iou": [clean_score(runs[s]) for s in seeds],
            "clean_dice": [clean_score(runs[s], "mean_dice") for s in seeds],
            "robust_iou": {f"{e:g}": [robust_score(runs[s], e) for s in seeds] for e in epsilons},
            "overrides": dict(arm.overrides),
            "control": arm.control,
            "candidate": arm.candidate,
            "code": sorted({str(runs[s].get("code") or "unknown") for s in seeds}),
            "machines": sorted({str(runs[s].get("machine") or "not recorded") for s in seeds}),
            "checks_failed": sorted(
                {k for s in seeds for k, c in runs[s].get("checks", {}).items() if c.get("passed") is False}
            ),
        }
        costs = [arm_cost(results, spec, arm.name, s) for s in seeds]
        entry["cost"] = {key: [c[key] for c in costs] for key in costs[0]}
        entry["robustness_seconds"] = [float(runs[s]["robustness_seconds"]) for s in seeds
                                       if "robustness_seconds" in runs[s]]  # fmt: skip
        if plain and plain in results["arms"]:
            ratios, clocks, notes = [], [], []
            for s in seeds:
                base, note = _plain_reference(results["arms"][plain], runs[s], s)
                if base is not None:
                    ratio, clock = step_ratio(runs[s]["cost"], base)
                    ratios.append(ratio)
                    clocks.append(clock)
                    notes.extend([note] if note else [])
            entry["step_ratio"] = ratios
            entry["step_ratio_clock"] = clocks
            entry["step_ratio_notes"] = sorted(set(notes))
        if arm.control and arm.control in results["arms"]:
            control_runs = results["arms"][arm.control]
            per_image = lambda runs_, key: {s: r["per_image"].get(key, {}) for s, r in runs_.items()}
            entry["vs_control"] = {
                "clean_iou": paired_bootstrap(per_image(runs, "clean"), per_image(control_runs, "clean")),
                **{f"robust_iou@{e:g}": paired_bootstrap(per_image(runs, robust_key(e)),
                                                         per_image(control_runs, robust_key(e)))
                   for e in epsilons},
            }  # fmt: skip
            shared = [s for s in seeds if s in control_runs]
            entry["control_clean_iou"] = [clean_score(control_runs[s]) for s in shared]
            entry["control_robust_iou"] = {f"{e:g}": [robust_score(control_runs[s], e) for s in shared]
                                           for e in epsilons}  # fmt: skip
            # the clean tolerance is measured against the plain arm where it beats the control: a control weakened
            # by its own augmentation must not make a recipe look accurate
            entry["clean_reference"], entry["clean_reference_iou"] = arm.control, entry["control_clean_iou"]
            plain_runs = results["arms"].get(plain or "", {})
            plain_clean = [clean_score(plain_runs[s]) for s in seeds if s in plain_runs]
            if arm.control != plain and plain_clean and np.mean(plain_clean) > np.mean(entry["control_clean_iou"]):
                entry["clean_reference"], entry["clean_reference_iou"] = plain, plain_clean
        out["arms"][arm.name] = entry
    return out


def choose_default(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Apply the rule: the most robust candidate (mean ensemble IoU at the first quoted epsilon) whose mean clean
    IoU is within 1 point of its reference (its compute-matched control, or the plain arm where that scores higher:
    ``clean_reference`` of :func:`summarize`); if none is, the candidate with the best sum of clean and
    robust IoU (the best trade-off). Also says whether the chosen one meets the target (within 1 point, and at
    least twice the control's robust IoU). Only candidates with at least ``min(MIN_SEEDS, most seeds of any
    candidate)`` seeds count; the reason names those left out.

    Args:
        summary: the output of :func:`summarize`.

    Returns:
        ``{"arm", "within_tolerance": bool, "reason", "meets_target": bool | None, "ranking": [arm, ...],
        "waiting": [arm, ...]}``: ``ranking`` is the counted candidates in the rule's order, the chosen one first;
        ``waiting`` the candidates not yet counted for lack of seeds; ``control_clean_iou`` is the reference's
        (named by ``clean_reference``), ``control_robust_iou`` the control's. ``arm`` is None without candidates
        that have a control.
    """
    epsilons = summary["epsilons"]
    if not epsilons:
        return {"arm": None, "within_tolerance": False, "meets_target": None, "reason": "no quoted epsilon.",
                "ranking": [], "waiting": []}  # fmt: skip
    key = f"{epsilons[0]:g}"
    candidates = {n: e for n, e in summary["arms"].items() if e["candidate"] and e.get("control_clean_iou")}
    # a candidate counts once it has as many seeds as the best-covered one, up to MIN_SEEDS: one lucky seed
    # must not displace a recipe measured on five
    needed = min(MIN_SEEDS, max((len(e["clean_iou"]) for e in candidates.values()), default=0))
    waiting = sorted(n for n, e in candidates.items() if len(e["clean_iou"]) < needed)
    rows = []
    for name, entry in candidates.items():
        if name in waiting:
            continue
        clean, robust = float(np.mean(entry["clean_iou"])), float(np.mean(entry["robust_iou"][key]))
        control_clean = float(np.mean(_clean_reference(entry)[1]))
        control_robust = float(np.mean(entry["control_robust_iou"][key]))
        rows.append((name, clean, robust, control_clean, control_robust))
    if not rows:
        return {"arm": None, "within_tolerance": False, "meets_target": None, "ranking": [], "waiting": waiting,
                "reason": "no candidate arm with a control has results yet."}  # fmt: skip
    within = [r for r in rows if r[1] >= r[3] - CLEAN_TOLERANCE]
    # the rule's order: those within the tolerance by robust IoU, then the rest by clean + robust IoU
    outside = [r for r in rows if r not in within]
    ranking = [r[0] for r in sorted(within, key=lambda r: -r[2])] + [
        r[0] for r in sorted(outside, key=lambda r: -(r[1] + r[2]))
    ]
    if within:
        name, clean, robust, control_clean, control_robust = max(within, key=lambda r: r[2])
        reason = (f"the most robust candidate within {100 * CLEAN_TOLERANCE:.0f} clean IoU point of its reference "
                  f"({len(within)} of {len(rows)} candidates are within it)")  # fmt: skip
    else:
        name, clean, robust, control_clean, control_robust = max(rows, key=lambda r: r[1] + r[2])
        reason = (f"no candidate is within {100 * CLEAN_TOLERANCE:.0f} clean IoU point of its reference: the best "
                  "trade-off (largest clean + robust IoU)")  # fmt: skip
    if waiting:
        reason += f"; not yet counted, with fewer than {needed} seeds: {', '.join(f'`{n}`' for n in waiting)}"
    meets = bool(within) and robust >= ROBUST_FACTOR * control_robust and clean >= control_clean - CLEAN_TOLERANCE
    return {"arm": name, "within_tolerance": bool(within), "reason": reason, "meets_target": meets, "ranking": ranking,
            "waiting": waiting,
            "clean_iou": clean, "robust_iou": robust, "control_clean_iou": control_clean,
            "control_robust_iou": control_robust, "epsilon": epsilons[0],
            "clean_reference": _clean_reference(summary["arms"][name])[0]}  # fmt: skip


def incomplete_parts(summary: Mapping[str, Any], spec: StudySpec, default: Mapping[str, Any]) -> list[str]:
    """What keeps a study from being complete, one phrase each (empty when it is complete).

    With ``spec.required_seeds`` ``{"each": N, "best": M, "arms": {ARM: K}}``: every arm of the study has results for
    at least N seeds (an arm listed in ``arms``, its own K), and the first two of the rule's ranking at least M
    (their controls need only N). Without it: every arm has every seed that any arm has. Either way, a study with
    candidates must have a default, and the rule must count every candidate.

    Args:
        summary: the output of :func:`summarize`.
        spec: the study.
        default: the output of :func:`choose_default` for ``summary``.

    Returns:
        phrases such as ``"arms with fewer than 3 seeds: `a`, `b`"``; empty when the study is complete.
    """
    parts = []
    missing = [a.name for a in spec.arms if a.name not in summary["arms"]]
    if missing:
        parts.append("arms without results yet: " + ", ".join(f"`{m}`" for m in missing))
    if default.get("arm") is None and any(a.candidate for a in spec.arms):
        parts.append(f"no default chosen yet ({str(default.get('reason', '')).rstrip('.')})")
    if default.get("waiting"):
        parts.append("candidates the rule does not count yet: " + ", ".join(f"`{m}`" for m in default["waiting"]))
    if spec.required_seeds:
        each, best = spec.required_seeds["each"], spec.required_seeds["best"]
        own = spec.required_seeds.get("arms", {})
        short = [n for n, e in summary["arms"].items() if n not in own and len(e["seeds"]) < each]
        if short:
            parts.append(f"arms with fewer than {each} seeds: " + ", ".join(f"`{m}`" for m in short))
        for name, needed in own.items():
            if name in summary["arms"] and len(summary["arms"][name]["seeds"]) < needed:
                parts.append(f"`{name}` has fewer than its {needed} seed{'s' if needed > 1 else ''}")
        top = [n for n in default.get("ranking", [])[:2] if len(summary["arms"][n]["seeds"]) < best]
        if top:
            parts.append(f"of the two best candidates, fewer than {best} seeds: " + ", ".join(f"`{m}`" for m in top))
    else:
        seeds_run = sorted({s for e in summary["arms"].values() for s in e["seeds"]})
        short = [n for n, e in summary["arms"].items() if len(e["seeds"]) < len(seeds_run)]
        if short:
            parts.append("arms with fewer seeds than others: " + ", ".join(f"`{m}`" for m in short))
    return parts


def _distance_to_target(default: Mapping[str, Any], compared: Mapping[str, Any], epsilon: float) -> str:
    """How far a default that misses the target is from it, and which counted candidate comes closest to the
    clean tolerance while keeping the robust factor: the front a user picks from when the target is not met.

    Args:
        default: the output of :func:`choose_default` (with an ``arm``).
        compared: the summary's arms that have a control.
        epsilon: the first quoted epsilon.

    Returns:
        one or two sentences for the page.
    """
    gap = 100 * (default["clean_iou"] - default["control_clean_iou"])
    ratio = _meets_target(compared[default["arm"]], epsilon)[1]
    side = "below" if gap < 0 else "above"
    text = (f"It is {abs(gap):.1f} clean IoU points {side} `{default.get('clean_reference')}` (the target allows "
            f"{100 * CLEAN_TOLERANCE:.0f} below) at {ratio:.2f}x its robust IoU (the target asks {ROBUST_FACTOR:g}x).")  # fmt: skip
    counted = set(default.get("ranking", []))
    robust_enough = [(n, e) for n, e in compared.items()
                     if n in counted and _meets_target(e, epsilon)[1] >= ROBUST_FACTOR]  # fmt: skip
    if robust_enough:
        name, entry = max(
            robust_enough, key=lambda item: np.mean(item[1]["clean_iou"]) - np.mean(_clean_reference(item[1])[1])
        )
        reference, reference_iou = _clean_reference(entry)
        closest = 100 * (np.mean(reference_iou) - np.mean(entry["clean_iou"]))
        if name != default["arm"]:
            text += (f" The candidate closest to the clean tolerance with at least {ROBUST_FACTOR:g}x the robust IoU is "
                     f"`{name}`: {closest:.1f} points below `{reference}` at {_meets_target(entry, epsilon)[1]:.2f}x "
                     f"`{entry['control']}`'s robust IoU.")  # fmt: skip
    return text


def _meets_target(entry: Mapping[str, Any], epsilon: float) -> tuple[bool, float]:
    """Whether an arm's means meet the target against its control (within the clean tolerance, and at least
    ``ROBUST_FACTOR`` times its robust IoU at ``epsilon``), and that robust ratio (inf for a control at 0)."""
    key = f"{epsilon:g}"
    control_robust = float(np.mean(entry["control_robust_iou"][key]))
    ratio = float(np.mean(entry["robust_iou"][key])) / control_robust if control_robust > 0 else math.inf
    within = float(np.mean(entry["clean_iou"])) >= float(np.mean(_clean_reference(entry)[1])) - CLEAN_TOLERANCE
    return within and ratio >= ROBUST_FACTOR, ratio


def _clean_reference(entry: Mapping[str, Any]) -> tuple[str | None, list[float]]:
    """The arm whose clean IoU an arm is held to, and its scores (the control's, in summaries written before the
    reference was recorded)."""
    return entry.get("clean_reference", entry.get("control")), entry.get(
        "clean_reference_iou", entry["control_clean_iou"]
    )


def _interval(stats: Mapping[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    return f"{100 * stats['mean']:+.1f} [{100 * stats['low']:+.1f}, {100 * stats['high']:+.1f}]"


def _verdict(entry: Mapping[str, Any], epsilons: Sequence[float]) -> str:
    """One sentence on an arm against its control, from the intervals."""
    vs = entry.get("vs_control")
    if not vs:
        return ""
    clean = vs["clean_iou"]
    parts = []
    if clean["mean"] is not None:
        if clean["high"] < 0:
            parts.append(f"costs clean IoU ({_interval(clean)} points, the interval excludes 0)")
        elif clean["low"] > 0:
            parts.append(f"gains clean IoU ({_interval(clean)} points)")
        else:
            parts.append(f"no clean IoU difference shown ({_interval(clean)} points)")
    for e in epsilons:
        robust = vs[f"robust_iou@{e:g}"]
        if robust["mean"] is None:
            continue
        word = (
            "more robust"
            if robust["low"] > 0
            else ("less robust" if robust["high"] < 0 else "no robustness difference shown")
        )
        parts.append(f"{word} at ε {epsilon_name(e)} ({_interval(robust)} points)")
    seeds = clean["seeds"] if clean else 0
    return f"{'; '.join(parts)} (paired over {seeds} seed(s) and {clean.get('images', 0)} test images)."


def _class_keys(results: Mapping[str, Any]) -> list[str]:
    """The per-class Dice keys of the robustness rows (``dice_<class>``; none for a binary task)."""
    for runs in results["arms"].values():
        for result in runs.values():
            for row in result["robustness"]:
                return [k for k in row if k.startswith("dice_")]
    return []


def _per_class_table(results: Mapping[str, Any], spec: StudySpec, epsilons: Sequence[float],
                     eps_names: Sequence[str]) -> list[str]:  # fmt: skip
    """Dice per class, clean and under the ensemble at each quoted epsilon (mean ± std over seeds)."""
    keys = _class_keys(results)
    if not keys:
        return []
    classes = [k[len("dice_") :] for k in keys]
    header = ["arm", *[f"clean Dice {c}" for c in classes],
              *[f"robust Dice {c} {n}" for n in eps_names for c in classes]]  # fmt: skip
    lines = ["", "## Dice per class", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in spec.arms:
        runs = results["arms"].get(arm.name)
        if not runs:
            continue
        seeds = sorted(runs, key=int)
        cells = [f"`{arm.name}`"]
        cells += [_fmt([clean_score(runs[s], key) for s in seeds]) for key in keys]
        cells += [_fmt([_row_value(runs[s], "ensemble", e, key) for s in seeds]) for e in epsilons for key in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _clean_evaluation_tables(results: Mapping[str, Any], spec: StudySpec) -> list[str]:
    """Per clean evaluation of the study: each arm's test Dice (per class and mean) from that evaluation beside the
    study's own clean Dice (the robustness run's epsilon-0 row), mean ± std over the seeds that have both."""
    lines: list[str] = []
    keys = _class_keys(results)
    classes = [k[len("dice_") :] for k in keys]
    for name, item in spec.clean_evaluations.items():
        columns = [(f"val_dice_{c}", f"dice_{c}", c) for c in classes]
        columns.append(("val_mean_dice", "mean_dice", "mean over the foreground classes" if classes else "foreground"))
        header = ["arm", "seeds", *[f"Dice {label} (this evaluation / the study's)" for _, _, label in columns]]
        rows = []
        for arm in spec.arms:
            runs = results["arms"].get(arm.name) or {}
            seeds = [s for s in sorted(runs, key=int) if name in runs[s].get("clean_evaluations", {})]
            if not seeds:
                continue
            cells = [f"`{arm.name}`", str(len(seeds))]
            for metric, row_key, _ in columns:
                ours = [runs[s]["clean_evaluations"][name]["metrics"][metric] for s in seeds]
                study = [clean_score(runs[s], row_key) for s in seeds]
                cells.append(f"{_fmt(ours)} / {_fmt(study)}")
            rows.append("| " + " | ".join(cells) + " |")
        if not rows:
            continue
        overrides = " ".join(f"--{k} {json.dumps(v)}" for k, v in item.get("overrides", {}).items())
        lines += ["", f"## Clean test scores: {item.get('label', name)}", "",
                  (f"The same models scored again on the test split by `run evaluating` with `{overrides}`, beside "
                   "the study's clean scores (the robustness run's unattacked row)."), "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows]  # fmt: skip
    return lines


def _reference_lines(results: Mapping[str, Any], spec: StudySpec) -> list[str]:
    """Each arm's clean Dice per class (the study's, and each clean evaluation's) against the study's reference:
    mean over seeds and its distance in Dice points."""
    if spec.reference is None:
        return []
    label, reference = spec.reference["label"], spec.reference["dice"]
    scored = {k[len("dice_") :] for k in _class_keys(results)}
    classes = [c for c in reference if c in scored]
    lines = ["", f"## Against {label}", "",
             f"{label}: " + ", ".join(f"{c} {v:g}" for c, v in reference.items()) + " Dice. Each arm's mean clean "
             "test Dice over its seeds, and how far it is from that, in Dice points."]  # fmt: skip
    missing = [c for c in reference if c not in scored]
    if missing:
        # binary studies have no dice_<class> keys; their foreground Dice is the clean Dice of the arms table
        lines += ["", f"No per-class Dice in the results for: {', '.join(f'`{c}`' for c in missing)}."]
    if not classes:
        return lines
    # None: the study's own clean scores (the robustness run's unattacked row); else a clean evaluation's name
    sources = [(None, "the study's"), *((n, item.get("label", n)) for n, item in spec.clean_evaluations.items())]

    def dice(run: Mapping[str, Any], evaluation: str | None, name: str) -> float:
        if evaluation is None:
            return clean_score(run, f"dice_{name}")
        return float(run["clean_evaluations"][evaluation]["metrics"][f"val_dice_{name}"])

    header = ["arm", "scored", "seeds", *[f"Dice {c} (distance)" for c in classes]]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in spec.arms:
        runs = results["arms"].get(arm.name) or {}
        for evaluation, source in sources:
            seeds = [s for s in sorted(runs, key=int)
                     if evaluation is None or evaluation in runs[s].get("clean_evaluations", {})]  # fmt: skip
            if not seeds:
                continue
            cells = [f"`{arm.name}`", source, str(len(seeds))]
            for name in classes:
                mean = float(np.mean([dice(runs[s], evaluation, name) for s in seeds]))
                cells.append(f"{mean:.3f} ({100 * (mean - reference[name]):+.1f})")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plot_pareto(summary: Mapping[str, Any], path: Path) -> Path:
    from monai_adv.evaluation.figures import agg_pyplot

    plt = agg_pyplot()
    key = f"{summary['epsilons'][0]:g}"
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, entry in summary["arms"].items():
        clean, robust = np.asarray(entry["clean_iou"]), np.asarray(entry["robust_iou"][key])
        ax.errorbar(clean.mean(), robust.mean(), xerr=clean.std(ddof=1) if clean.size > 1 else 0,
                    yerr=robust.std(ddof=1) if robust.size > 1 else 0, fmt="o" if entry["candidate"] else "s",
                    capsize=3, label=entry["label"])  # fmt: skip
        ax.annotate(name, (clean.mean(), robust.mean()), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("clean test IoU")
    ax.set_ylabel(f"IoU under the ensemble at ε {epsilon_name(key)}")
    ax.set_title("accuracy against robustness (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_validation_curves(
    arms: Sequence[tuple[str, Mapping[str, Any]]],
    path: Path,
    figsize: tuple[float, float] = (6.5, 4),
    legend_size: float = 6,
) -> Path:
    """Validation IoU per epoch, mean over seeds, one line per arm (``(label, {seed: collected})``); the study's
    and the reproduction's page draw it."""
    from monai_adv.evaluation.figures import agg_pyplot

    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    for label, runs in arms:
        epochs = sorted({int(e) for r in runs.values() for e in r["val_iou"]})
        means = [np.mean([r["val_iou"][str(e)] for r in runs.values() if str(e) in r["val_iou"]]) for e in epochs]
        ax.plot(epochs, means, marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation IoU (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_study_report(results: Mapping[str, Any], spec: StudySpec, output: Path, context: Mapping[str, Any]) -> Path:
    """Write ``output/<page>`` (default ``<name>.md``), its figures and ``summary.json`` under ``output/<name>/``.

    Args:
        results: the runner's raw results.
        spec: the study.
        output: the folder of the page.
        context: ``command``, ``version``, ``machine``, ``wall_time_s``, ``commands``, ``resumed``, ``dataset_dir``,
            ``source`` (the data's citation), ``counts``, ``timings``, ``stale`` (results left out).

    Returns:
        the page's path.
    """
    output = Path(output)
    figures = output / spec.name
    figures.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, spec)
    default = choose_default(summary)
    epsilons = summary["epsilons"]
    eps_names = [epsilon_name(e) for e in epsilons]
    lines = [f"# {spec.title}", ""]
    lines += [
        (
            "Generated by the study runner; every number below comes from the workflows' files (training history, "
            "robustness JSON and per-image CSV). Do not edit by hand: run the command again."
        ),
        "",
        f"- command: `{context.get('command', '')}`",
        f"- study file: `{context.get('study_file', spec.source)}`",
        f"- code of this call: {context.get('version', 'unknown')}",
        f"- code the arms ran with: {_arms_by(summary, 'code')}",
        f"- machine of this call: {context.get('machine', 'unknown')}",
        f"- machines the arms trained on: {_arms_by(summary, 'machines')}",
        f"- data: `{context.get('dataset_dir', '')}` ({', '.join(f'{k} {v}' for k, v in context.get('counts', {}).items())} images)",
        f"- seeds: {', '.join(str(s) for s in results.get('seeds', []))}",
        (
            f"- this call's wall time: {context.get('wall_time_s', 0) / 60:.1f} min ({len(context.get('resumed', []))} "
            "steps skipped because they had already run)"
        ),
        _compute_line(results),
    ]
    if context.get("stale"):
        lines += [f"- left out of this page: {'; '.join(context['stale'])}"]
    if context.get("source"):
        lines += [f"- about the data: {context['source']}"]
    if spec.description:
        lines += ["", spec.description]
    lines += ["", "## The rule and the target", ""]
    lines += [
        (
            f"The default recipe is the **most robust candidate** (mean IoU under the robustness ensemble at ε "
            f"{eps_names[0] if eps_names else '–'}) **whose mean clean test IoU is within {100 * CLEAN_TOLERANCE:.0f} "
            "point of its reference**: its compute-matched control, or the plain arm "
            f"(`{spec.plain_arm}`) where that scores higher, so that a control weakened by its own augmentation does "
            "not make a recipe look accurate. If no candidate is within it, the page picks the best trade-off "
            f"(largest clean + robust IoU) and says so. A candidate counts once it has {MIN_SEEDS} seeds (or as many "
            "as the best-covered candidate, when none has). The target is stricter: within 1 point of the reference's "
            f"clean IoU **and** at least {ROBUST_FACTOR:g}x its control's robust IoU at ε "
            f"{eps_names[0] if eps_names else '–'}."
        ),
        "",
        (
            "Robust IoU is the per-image worst case over FGSM, PGD, SegPGD, CosPGD and APGD (three losses) of `run "
            "robustness` (white box, true labels), with its gradient-masking checks; differences are arm minus control, "
            "in IoU points, with a 95% bootstrap interval over seeds and test images (paired by seed and image)."
        ),
    ]
    lines += ["", "## Arms", ""]
    header = ["arm", "seeds", "clean IoU", "clean Dice", *[f"robust IoU {n}" for n in eps_names],
              "steps", "images seen", "time/step vs plain", "training min", "robustness min",
              "checks failed"]  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in summary["arms"].items():
        cost = entry["cost"]
        cells = [f"{entry['label']} (`{name}`)", str(len(entry["seeds"])), _fmt(entry["clean_iou"]),
                 _fmt(entry["clean_dice"]), *[_fmt(entry["robust_iou"][f"{e:g}"]) for e in epsilons],
                 f"{np.mean(cost['iterations']):.0f}", f"{np.mean(cost['images']):.0f}",
                 _ratio_cell(entry),
                 _fmt([s / 60 for s in cost["seconds"]], digits=1),
                 _fmt([s / 60 for s in entry["robustness_seconds"]], digits=1) if entry["robustness_seconds"] else "–",
                 ", ".join(entry["checks_failed"]) or "none"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    gaps = incomplete_parts(summary, spec, default)
    if gaps:
        lines += ["", (f"**The study is not complete**: {'; '.join(gaps)}. The default below is the rule applied to "
                  "the results there are.")]  # fmt: skip
    lines += [
        "",
        (
            "Steps, images and training minutes include what an arm builds on (the clean training a fine-tune starts "
            "from, the model and the writing of offline copies); robustness minutes are the wall time of the arm's own "
            "`run robustness`; time per step is the arm's own, against the plain arm "
            f"(`{summary['plain_arm']}`) of the same seed on the same machine (else the mean of its runs on this "
            "arm's machine; a ratio marked *other machine* had neither), in CPU time where both runs recorded it (a "
            "ratio marked *wall* is in wall time, which another job on the machine stretches)."
        ),
    ]
    lines += _per_class_table(results, spec, epsilons, eps_names)
    lines += _clean_evaluation_tables(results, spec)
    lines += _reference_lines(results, spec)
    compared = {n: e for n, e in summary["arms"].items() if e.get("vs_control")}
    if compared:
        lines += ["", "## Against the compute-matched control", ""]
        header = ["arm", "control", "Δ clean IoU [95% CI]", *[f"Δ robust IoU {n} [95% CI]" for n in eps_names],
                  f"robust / control {eps_names[0]}", "target met"]  # fmt: skip
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, entry in compared.items():
            vs = entry["vs_control"]
            met, ratio = _meets_target(entry, epsilons[0])
            cells = [f"`{name}`", f"`{entry['control']}`", _interval(vs["clean_iou"]),
                     *[_interval(vs[f"robust_iou@{e:g}"]) for e in epsilons], f"{ratio:.2f}x",
                     "yes" if met else "no"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "### Verdicts", ""]
        for name, entry in compared.items():
            lines.append(f"- **{entry['label']}** (`{name}`) against `{entry['control']}`: {_verdict(entry, epsilons)}")
    lines += ["", "## The default", ""]
    if default["arm"] is None:
        lines.append(f"No default can be chosen yet: {default['reason']}")
    else:
        entry = summary["arms"][default["arm"]]
        lines.append(
            f"By the rule: **`{default['arm']}`** ({entry['label']}), {default['reason']}. Clean IoU "
            f"{default['clean_iou']:.3f} against {default['control_clean_iou']:.3f} for "
            f"`{default.get('clean_reference', entry['control'])}`; robust IoU at ε {eps_names[0]} "
            f"{default['robust_iou']:.3f} against {default['control_robust_iou']:.3f} for `{entry['control']}` "
            f"({_meets_target(entry, epsilons[0])[1]:.2f}x). The target is "
            + ("**met**." if default["meets_target"] else "**not met**.")
        )
        if not default["meets_target"]:
            lines[-1] += " " + _distance_to_target(default, compared, epsilons[0])
    # an arm outside the candidates can still meet the target: say so, or the rule hides the study's best result
    outside = [(n, e) for n, e in compared.items() if not e["candidate"] and _meets_target(e, epsilons[0])[0]]
    if outside:
        key0 = f"{epsilons[0]:g}"
        chosen = summary["arms"].get(default["arm"]) if default["arm"] else None
        items = []
        for name, entry in outside:
            arm = spec.arm(name)
            robust = float(np.mean(entry["robust_iou"][key0]))
            reference, reference_iou = _clean_reference(entry)
            control_named = "" if reference == entry["control"] else f" for `{entry['control']}`"
            text = (f"`{name}` ({entry['label']}, {len(entry['seeds'])} seed(s)): clean IoU "
                    f"{np.mean(entry['clean_iou']):.3f} against {np.mean(reference_iou):.3f} for "
                    f"`{reference}`, robust IoU at ε {eps_names[0]} {robust:.3f} against "
                    f"{np.mean(entry['control_robust_iou'][key0]):.3f}{control_named} ({_meets_target(entry, epsilons[0])[1]:.2f}x)")  # fmt: skip
            if chosen is not None:
                text += f", against {float(np.mean(chosen['robust_iou'][key0])):.3f} for the default"
            items.append(text + (f"; {arm.description}" if arm.description else "; not a candidate"))
        lines += ["", "Not candidates, and meeting the target: " + "; ".join(items) + "."]
    plain_arms = [a for a in spec.arms if str(a.overrides.get("adv#method", "")).lower() == "none" and not a.offline
                  and not a.init_from and str(a.overrides.get("augment", "none")) == "none"]  # fmt: skip
    longest = max((a for a in plain_arms if a.name in results["arms"]),
                  key=lambda a: max(len(r["val_iou"]) for r in results["arms"][a.name].values()), default=None)  # fmt: skip
    if longest is not None:
        runs = results["arms"][longest.name]
        plateaus = [plateau_epoch(r["val_iou"]) for r in runs.values()]
        length = max(len(r["val_iou"]) for r in runs.values())
        lines += ["", "## Convergence", "",
                  (f"The longest plain arm (`{longest.name}`, {length} epochs) reaches within 1 IoU point of its best "
                  f"validation IoU at epoch {', '.join(str(p) for p in plateaus)} (per seed).")]  # fmt: skip
        plain = spec.plain_arm
        if plain and plain != longest.name and plain in results["arms"]:
            shared = [s for s in results["arms"][plain] if s in runs]
            if shared:
                ours = [max(results["arms"][plain][s]["val_iou"].values()) for s in shared]
                theirs = [max(runs[s]["val_iou"].values()) for s in shared]
                study_length = max(len(results["arms"][plain][s]["val_iou"]) for s in shared)
                lines[-1] += (
                    f" At the study's length ({study_length} epochs) the plain arm `{plain}` reaches a best validation "
                    f"IoU of {_fmt(ours)}, against {_fmt(theirs)} for `{longest.name}` "
                    f"({100 * (np.mean(theirs) - np.mean(ours)):+.1f} points, seeds {', '.join(shared)})."
                )
    lines += ["", "## Figures", ""]
    if epsilons and summary["arms"]:
        pareto = _plot_pareto(summary, figures / "pareto.png")
        lines += [f"![clean against robust IoU]({spec.name}/{pareto.name})", ""]
    arms_run = [(a.label, results["arms"][a.name]) for a in spec.arms if results["arms"].get(a.name)]
    curves = plot_validation_curves(arms_run, figures / "validation_iou.png")
    lines += [f"![validation IoU per epoch]({spec.name}/{curves.name})", ""]
    lines += ["## Arms as configured", ""]
    for arm in spec.arms:
        extra = []
        if arm.offline:
            extra.append(f"offline copies ({arm.offline['method']}) made with `{arm.offline['from']}`'s model")
        if arm.init_from:
            extra.append(f"starts from `{arm.init_from}`'s model.pt")
        overrides = " ".join(
            f"--{k} {json.dumps(v) if not isinstance(v, str) else v}" for k, v in arm.overrides.items()
        )
        text = arm.description or arm.label
        text = text if text.endswith(("?", ".")) else text + "."
        lines.append(f"- `{arm.name}`: {text} `{overrides}`" + (f"; {'; '.join(extra)}" if extra else ""))
    lines += ["", "<details><summary>Every workflow of this call</summary>", "", "```"]
    # a page rebuilt from the results file (--report_only) ran no workflow: say so rather than show an empty list
    lines += list(dict.fromkeys(context.get("commands", []))) or [
        (
            "none: this call rebuilt the page from the results file; the study's command without --report_only runs "
            "whatever is missing, one arm-seed after another"
        )
    ]
    lines += ["```", "", "</details>", ""]
    page = output / (spec.page or f"{spec.name}.md")
    page.write_text("\n".join(lines))
    dataset = Path(str(context.get("dataset_dir") or spec.dataset_dir or "data")).name
    about = {"name": spec.name, "title": spec.title, "page": page.name, "profile": spec.profile, "dataset": dataset,
             "command": context.get("command", ""), "version": context.get("version", "unknown"),
             "complete": not gaps, "gaps": gaps}  # fmt: skip
    (figures / "summary.json").write_text(
        json.dumps({"study": about, "summary": summary, "default": default}, indent=1, default=float)
    )
    return page
