"""``python -m monai_adv.study``: arms of bundle overrides run once per seed (resume), and a page from their files."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_adv.errors import SettingsError
from monai_adv.hardware import cpu_model
from monai_adv.study import choose_default, load_study, paired_bootstrap, plateau_epoch
from monai_adv.study.report import (
    _reference_lines,
    epsilon_name,
    incomplete_parts,
    step_ratio,
    study_compute,
    summarize,
    write_study_report,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
KVASIR = REPO_ROOT.parent / "shared" / "data" / "kvasir_seg"
EPS = 2 / 255


def smoke_study() -> dict:
    return {
        "name": "smoke",
        "title": "Smoke study",
        "profile": "smoke",
        "overrides": {"max_epochs": 2},
        "plain_arm": "unet",
        "robustness": {"epsilons": [0.0, EPS], "iterative_epsilons": [EPS], "num_steps": 3},
        "arms": [
            {"name": "unet", "overrides": {"adv#method": "none"}},
            {"name": "fgsm", "overrides": {"adv#recipe": "paper"}, "control": "unet", "candidate": True},
            {"name": "offline", "offline": {"from": "unet", "method": "fgsm", "epsilon": EPS},
             "overrides": {"adv#method": "none"}, "control": "unet"},
            {"name": "finetune", "init_from": "unet", "overrides": {"adv#recipe": "finetune", "max_epochs": 1},
             "control": "unet"},
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    if (KVASIR / "split.json").is_file():
        return KVASIR
    from monai_adv.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", num_images=80, size=48)


def _run(study: Path, dataset: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monai_adv.study", str(study), "--seeds", "0", "--output", str(output),
               "--dataset_dir", str(dataset), "--no_tracking", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return result


def _per_image(path: Path, attack: str, epsilon: float) -> dict[str, float]:
    with open(path) as stream:
        return {r["image"]: float(r["iou"]) for r in csv.DictReader(stream)
                if r["attack"] == attack and math.isclose(float(r["epsilon"]), epsilon, rel_tol=1e-5)}  # fmt: skip


@pytest.mark.slow
def test_a_training_stopped_part_way_continues_from_its_checkpoint_when_the_study_runs_again(dataset, tmp_path):
    study = tmp_path / "stopped.json"
    spec = smoke_study()
    spec.update({"overrides": {"max_epochs": 8}, "arms": spec["arms"][:1]})
    study.write_text(json.dumps(spec))
    output = tmp_path / "out"
    models = output / "work" / "smoke" / "runs" / "seed0" / "unet" / "models"
    command = [sys.executable, "-m", "monai_adv.study", str(study), "--seeds", "0", "--output", str(output),
               "--dataset_dir", str(dataset), "--no_tracking"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True) as process:  # fmt: skip
        deadline = time.monotonic() + 300
        while not list(models.glob("checkpoint_epoch=[2-6].pt")) and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)  # a kill, as at the end of a session
    done = models.parent / "training_done.json"
    assert not done.exists() and (models.parent / "training_started.json").is_file()
    stopped_at = max(int(p.stem.split("=")[1]) for p in models.glob("checkpoint_epoch=*.pt"))
    assert stopped_at < 8

    result = _run(study, dataset, output)
    assert "continuing a stopped training from" in result.stdout + result.stderr
    history = json.loads((models / "training_history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == list(range(1, 9))  # the stopped epochs kept, none twice
    assert "resumed" in json.loads((models / "training_run.json").read_text())
    marker = json.loads(done.read_text())
    assert marker["resumed"] is True and "resume" not in marker["settings"]
    assert marker["seconds"] >= history["total"]["seconds"] * stopped_at / 8 * 0.5
    assert not (models.parent / "training_started.json").exists()
    # the page has the arm; run again, nothing runs
    assert "`unet`" in (output / "smoke.md").read_text()
    again = _run(study, dataset, output)
    assert "continuing a stopped training" not in again.stdout + again.stderr


def test_a_checkpoint_older_than_the_started_marker_is_not_continued(tmp_path):
    """An earlier training's checkpoint (other settings, not yet moved aside because the new training failed before
    it started) must not be resumed as if it were the new one's."""
    from monai_adv.study.runner import StudyRunner

    root, settings = tmp_path / "arm", {"max_epochs": 4, "adv#method": "none"}
    (root / "models").mkdir(parents=True)
    checkpoint = root / "models" / "checkpoint_epoch=3.pt"
    torch.save({"model": {}}, checkpoint)
    (root / "models" / "training_history.json").write_text(json.dumps({"total": {"seconds": 30.0}}))
    started = root / "training_started.json"
    started.write_text(json.dumps({"settings": settings}))
    os.utime(checkpoint, (started.stat().st_mtime - 60, started.stat().st_mtime - 60))  # written before the marker
    assert StudyRunner._stopped_training_seconds(started, root, settings) is None
    os.utime(checkpoint, (started.stat().st_mtime + 60, started.stat().st_mtime + 60))  # this training's
    assert StudyRunner._stopped_training_seconds(started, root, settings) == 30.0
    assert StudyRunner._stopped_training_seconds(started, root, {**settings, "max_epochs": 5}) is None


def test_a_continued_robustness_run_counts_the_seconds_of_the_stopped_ones(tmp_path):
    from monai_adv.study.runner import StudyRunner

    report = tmp_path / "robustness.json"
    assert StudyRunner._continued_robustness_seconds(report) == 0.0  # none written
    report.write_text(json.dumps({"results": [], "continued": {"batches": 3, "seconds": 421.5}}))
    assert StudyRunner._continued_robustness_seconds(report) == 421.5
    report.write_text(json.dumps({"results": []}))  # written before runs could continue
    assert StudyRunner._continued_robustness_seconds(report) == 0.0


@pytest.mark.slow
def test_smoke_study_runs_each_arm_once_and_reports_what_its_files_say(dataset, tmp_path):
    study = tmp_path / "smoke.json"
    study.write_text(json.dumps(smoke_study()))
    output = tmp_path / "out"
    _run(study, dataset, output)
    runs = output / "work" / "smoke" / "runs" / "seed0"
    page = (output / "smoke.md").read_text()
    summary = json.loads((output / "smoke" / "summary.json").read_text())["summary"]
    for arm in ("unet", "fgsm", "offline", "finetune"):
        measured = json.loads((runs / arm / "robustness_test" / "robustness.json").read_text())
        rows = {(r["attack"], r["epsilon"]): r for r in measured["results"]}
        assert summary["arms"][arm]["clean_iou"] == [pytest.approx(rows["ensemble", 0.0]["mean_iou"])]
        assert summary["arms"][arm]["robust_iou"][f"{EPS:g}"] == [pytest.approx(rows["ensemble", EPS]["mean_iou"])]
        assert f"{rows['ensemble', 0.0]['mean_iou']:.3f}" in page
        history = json.loads((runs / arm / "models" / "training_history.json").read_text())
        assert summary["arms"][arm]["cost"]["iterations"][0] >= history["total"]["iterations"]
    # costs: FGSM appends a copy to each of the 16 training images (2 epochs, batch 8); the fine-tune starts from
    # the UNet's model, so its cost includes the UNet's training
    costs = {arm: summary["arms"][arm]["cost"] for arm in ("unet", "fgsm", "finetune", "offline")}
    assert costs["unet"]["iterations"] == [4] and costs["unet"]["images"] == [32]
    assert costs["fgsm"]["iterations"] == [4] and costs["fgsm"]["images"] == [64]
    assert costs["finetune"]["iterations"] == [4 + 2] and costs["finetune"]["images"] == [32 + 16]
    assert costs["offline"]["iterations"] == [4 + 8] and costs["offline"]["images"] == [32 + 64]  # doubled data
    # the fine-tune started from the UNet arm's model; the offline arm trained on the copies its model made
    settings = json.loads((runs / "finetune" / "training_done.json").read_text())["settings"]
    assert settings["init_ckpt"] == str(runs / "unet" / "models" / "model.pt")
    copies = json.loads((runs / "offline" / "offline_data" / "datalist_fgsm.json").read_text())
    assert len(copies["training"]) == 32 and copies["checkpoint"] == str(runs / "unet" / "models" / "model.pt")
    # the paired difference is the mean of the per-image differences of the two arms' files
    arm_scores = _per_image(runs / "fgsm" / "robustness_test" / "robustness_per_image.csv", "ensemble", EPS)
    control = _per_image(runs / "unet" / "robustness_test" / "robustness_per_image.csv", "ensemble", EPS)
    expected = np.mean([arm_scores[k] - control[k] for k in control if not math.isnan(arm_scores[k] - control[k])])
    assert summary["arms"]["fgsm"]["vs_control"][f"robust_iou@{EPS:g}"]["mean"] == pytest.approx(expected)
    assert (output / "smoke" / "pareto.png").stat().st_size > 0 and "smoke/pareto.png" in page
    assert "## The default" in page and "`fgsm`" in page
    assert "- code the arms ran with: " in page and "(unet, fgsm, offline, finetune)" in page
    assert f"- machines the arms trained on: {cpu_model()}, " in page  # seconds and ratios hold on that machine

    # the study's choice becomes the default of (a copy of) the bundle
    bundle_copy = tmp_path / "bundle"
    shutil.copytree(REPO_ROOT / "bundles" / "adversarial_unet_segmentation", bundle_copy,
                    ignore=shutil.ignore_patterns("models", "eval", "data", "logs"))  # fmt: skip
    publish = [sys.executable, "-m", "monai_adv.study.publish", "--summary", str(output / "smoke" / "summary.json"),
               "--bundle", str(bundle_copy)]  # fmt: skip
    done = subprocess.run(publish, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads((bundle_copy / "configs" / "train.json").read_text())["adv"]["recipe"] == "paper"
    metrics = json.loads((bundle_copy / "configs" / "metadata.json").read_text())["eval_metrics"]
    dataset_name = json.loads((output / "smoke" / "summary.json").read_text())["study"]["dataset"]
    assert metrics[f"{dataset_name}_test_mean_iou_fgsm"] == pytest.approx(summary["arms"]["fgsm"]["clean_iou"][0])
    assert f"{summary['arms']['fgsm']['clean_iou'][0]:.3f}" in (bundle_copy / "docs" / "README.md").read_text()

    # again: every step had completed with the same settings, so nothing trains again, and the page is the same
    trained = {p: p.stat().st_mtime_ns for p in runs.rglob("model.pt")}
    again = _run(study, dataset, output)
    assert (again.stderr + again.stdout).count("not run again") == 4
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("model.pt")} == trained
    assert (
        json.loads((output / "smoke" / "summary.json").read_text())["summary"]["arms"]["fgsm"]["clean_iou"]
        == (summary["arms"]["fgsm"]["clean_iou"])
    )
    # a clean evaluation added to the study scores the models there are again, and trains nothing
    evaluated = smoke_study()
    evaluated["clean_evaluations"] = {"seed1": {"label": "another seed", "overrides": {"seed": 1}}}
    study.write_text(json.dumps(evaluated))
    fourth = _run(study, dataset, output)
    assert (fourth.stderr + fourth.stdout).count("not run again") == 4
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("model.pt")} == trained
    page = (output / "smoke.md").read_text()
    assert "## Clean test scores: another seed" in page
    raw = json.loads((output / "smoke" / "raw_results.json").read_text())
    for arm in ("unet", "fgsm", "offline", "finetune"):
        with open(runs / arm / "clean_seed1" / "metrics.csv") as stream:
            written = dict(csv.reader(stream))
        recorded = raw["arms"][arm]["0"]["clean_evaluations"]["seed1"]["metrics"]
        assert recorded["val_mean_dice"] == pytest.approx(float(written["val_mean_dice"]))
        assert f"| `{arm}` | 1 | {float(written['val_mean_dice']):.3f} / " in page
    study.write_text(json.dumps(smoke_study()))
    # the committed results alone continue a study: without the work folder, nothing trains
    elsewhere = _run(study, dataset, output, "--work_dir", str(tmp_path / "other_work"))
    assert (elsewhere.stderr + elsewhere.stdout).count("not run again") == 4
    assert not list((tmp_path / "other_work").rglob("model.pt"))
    # a changed arm runs again, alone (its dependency is reused)
    changed = smoke_study()
    changed["arms"][1]["overrides"]["adv#epsilon"] = 2 * EPS
    study.write_text(json.dumps(changed))
    third = _run(study, dataset, output, "--arms", "fgsm")
    assert "running again with other settings" in third.stderr + third.stdout
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("model.pt") if "fgsm" not in p.parts} == {
        p: t for p, t in trained.items() if "fgsm" not in p.parts
    }
    # the page of the study as it was leaves out the run with the changed settings, and says so
    study.write_text(json.dumps(smoke_study()))
    _run(study, dataset, output, "--report_only")
    page = (output / "smoke.md").read_text()
    assert "- left out of this page: fgsm (seed 0, run with other settings than the study's: it runs again)" in page
    assert "fgsm" not in json.loads((output / "smoke" / "summary.json").read_text())["summary"]["arms"]
    # an arm taken out of the study file is left out of its page, and listed as such
    fewer = smoke_study()
    fewer["arms"] = fewer["arms"][:3]
    study.write_text(json.dumps(fewer))
    _run(study, dataset, output, "--report_only")
    assert "finetune (seed 0, no longer an arm of the study)" in (output / "smoke.md").read_text()


def test_study_file_errors_name_the_file_and_key(tmp_path):
    study = smoke_study()
    study["arms"][1]["control"] = "later"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(study))
    with pytest.raises(SettingsError, match=r"bad\.json.*fgsm.*control 'later' must name an arm listed before it"):
        load_study(path)
    study = smoke_study()
    study["arms"][0]["overides"] = {}
    path.write_text(json.dumps(study))
    with pytest.raises(SettingsError, match=r"unknown keys \['overides'\]"):
        load_study(path)
    with pytest.raises(FileNotFoundError, match="kvasir_recipes"):
        load_study(tmp_path / "missing.json")
    for bad, message in (([], "clean_evaluations is"), ({"a b": {}}, r"clean_evaluations\['a b'\] must be"),
                         ({"w": {"overides": {}}}, r"clean_evaluations\['w'\].*unknown keys \['overides'\]"),
                         ({"w": {"overrides": [1]}}, r"clean_evaluations\['w'\].overrides must be an object")):  # fmt: skip
        study = {**smoke_study(), "clean_evaluations": bad}
        with pytest.raises(SettingsError, match=message):
            load_study(study)
    for bad, message in (({"dice": {}}, "reference must be"), ({"dice": {"a": 1.5}}, r"reference.dice\['a'\].*1.5"),
                         ({"dice": {"a": 0.8}, "lable": "x"}, r"reference: unknown keys \['lable'\]")):  # fmt: skip
        with pytest.raises(SettingsError, match=message):
            load_study({**smoke_study(), "reference": bad})
    assert load_study("hippocampus_recipes").reference["dice"] == {"anterior": 0.89, "posterior": 0.87}
    assert load_study("hippocampus_recipes").clean_evaluations["single_window"]["overrides"] == {
        "validate#inferer#roi_size": [48, 64, 48]
    }
    spec = load_study(smoke_study())
    assert [a.name for a in spec.select(["finetune"])] == ["unet", "finetune"]  # with what it builds on
    with pytest.raises(SettingsError, match="--arms"):
        spec.select(["nope"])
    shipped = load_study("kvasir_recipes")
    assert {a.control for a in shipped.arms if a.candidate} <= {a.name for a in shipped.arms}


def test_arms_do_not_depend_on_the_defaults_that_publish_writes(dataset, tmp_path):
    from monai_adv.study.runner import StudyRunner, _fingerprint

    unnamed = smoke_study()
    unnamed["arms"][0]["overrides"] = {"max_epochs": 3}
    with pytest.raises(SettingsError, match=r"arms\[0\] \(unet\): names neither 'adv#recipe' nor 'adv#method'"):
        load_study(unnamed)
    assert load_study({**unnamed, "overrides": {"adv#method": "none"}}).arms[0].overrides == {"max_epochs": 3}
    study = smoke_study()
    study["arms"].append({"name": "std", "overrides": {"adv#method": "none", "augment": "standard"}})
    runner = StudyRunner(load_study(study), dataset, [0], tmp_path / "work")
    runner.datalists = {"validation": tmp_path / "validation.json", "test": tmp_path / "test.json"}
    plain, standard = runner.spec.arm("unet"), runner.spec.arm("std")
    # the plain arm trains un-augmented even where the bundle's train.json now says --augment standard
    assert runner.training_settings(plain, 0, tmp_path / "d.json")["augment"] == "none"
    assert runner.training_settings(standard, 0, tmp_path / "d.json")["augment"] == "standard"
    # ...and keeps the fingerprint (and step markers) it had before the pin, so its results are not run again
    assert "augment" not in _fingerprint(runner.plan(plain, 0))[0]
    assert _fingerprint(runner.plan(standard, 0))[0]["augment"] == "standard"
    _, marker, run_id, overlays, root, tracking, settings = runner.plan(plain, 0)[0]
    before_the_pin = {k: v for k, v in settings.items() if k != "augment"}
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"settings": before_the_pin, "seconds": 12.5}))
    assert runner.step(marker, run_id, overlays, root, tracking, settings) == 12.5
    assert runner.resumed == [str(marker.parent)] and not runner.ran


def test_step_ratio_prefers_cpu_time_when_both_runs_have_it():
    plain = {"train_seconds": 100.0, "train_cpu_seconds": 180.0, "iterations": 100}
    busy = {"train_seconds": 400.0, "train_cpu_seconds": 380.0, "iterations": 100}  # slowed by another job
    assert step_ratio(busy, plain) == (pytest.approx(380 / 180), "cpu")
    older = {"train_seconds": 100.0, "iterations": 50}  # a result written before CPU time was recorded
    assert step_ratio(older, plain) == (pytest.approx(2.0), "wall")


def test_paired_bootstrap_is_exact_for_a_constant_shift_and_covers_the_mean():
    rng = np.random.default_rng(1)
    control = {str(s): {f"img{i}": float(v) for i, v in enumerate(rng.random(50))} for s in range(3)}
    shifted = {s: {k: v + 0.05 for k, v in images.items()} for s, images in control.items()}
    stats = paired_bootstrap(shifted, control)
    assert stats["mean"] == pytest.approx(0.05) and stats["low"] == pytest.approx(0.05)
    assert stats["high"] == pytest.approx(0.05) and (stats["seeds"], stats["images"]) == (3, 50)
    noisy = {s: {k: v + rng.normal(0.0, 0.1) for k, v in images.items()} for s, images in control.items()}
    stats = paired_bootstrap(noisy, control)
    assert stats["low"] < stats["mean"] < stats["high"] and stats["high"] - stats["low"] < 0.1
    assert paired_bootstrap(noisy, {"7": {}})["mean"] is None  # no shared seed


def test_default_rule_prefers_robust_within_one_point_then_trade_off():
    def entry(clean, robust, control_clean, control_robust):
        return {"candidate": True, "clean_iou": [clean], "robust_iou": {"0.1": [robust]},
                "control_clean_iou": [control_clean], "control_robust_iou": {"0.1": [control_robust]}}  # fmt: skip

    summary = {"epsilons": [0.1], "arms": {"a": entry(0.60, 0.30, 0.60, 0.10), "b": entry(0.595, 0.35, 0.60, 0.10),
                                           "c": entry(0.55, 0.50, 0.60, 0.10)}}  # fmt: skip
    chosen = choose_default(summary)
    assert chosen["arm"] == "b" and chosen["within_tolerance"] and chosen["meets_target"]
    assert chosen["ranking"] == ["b", "a", "c"]  # within the tolerance by robust IoU, then the rest
    summary["arms"] = {"c": entry(0.55, 0.50, 0.60, 0.10), "d": entry(0.50, 0.52, 0.60, 0.10)}
    chosen = choose_default(summary)
    assert chosen["arm"] == "c" and not chosen["within_tolerance"] and not chosen["meets_target"]
    assert "best trade-off" in chosen["reason"]
    # one lucky seed does not displace a candidate measured on three; it counts once it has three too
    three = {**entry(0.55, 0.30, 0.60, 0.10), "clean_iou": [0.55] * 3, "robust_iou": {"0.1": [0.30] * 3}}
    summary["arms"] = {"many": three, "lucky": entry(0.60, 0.50, 0.60, 0.10)}
    chosen = choose_default(summary)
    assert chosen["arm"] == "many" and "fewer than 3 seeds: `lucky`" in chosen["reason"]
    summary["arms"]["lucky"] = {**three, "clean_iou": [0.60] * 3, "robust_iou": {"0.1": [0.50] * 3}}
    assert choose_default(summary)["arm"] == "lucky"


def test_page_names_an_arm_outside_the_candidates_that_meets_the_target(tmp_path):
    spec = load_study(smoke_study())  # `offline` has a control and is no candidate

    def result(clean, robust):
        rows = [{"attack": "ensemble", "epsilon": 0.0, "mean_iou": clean, "mean_dice": clean},
                {"attack": "ensemble", "epsilon": EPS, "mean_iou": robust, "mean_dice": robust}]  # fmt: skip
        per_image = {"clean": {"a": clean, "b": clean}, f"ensemble@{EPS:g}": {"a": robust, "b": robust}}
        return {"robustness": rows, "per_image": per_image, "val_iou": {"1": clean}, "checks": {},
                "cost": {"train_seconds": 1.0, "iterations": 1, "images": 16}}  # fmt: skip

    def page(offline_clean):
        results = {"seeds": [0], "arms": {"unet": {"0": result(0.60, 0.10)}, "fgsm": {"0": result(0.50, 0.40)},
                                          "offline": {"0": result(offline_clean, 0.25)}}}  # fmt: skip
        return write_study_report(results, spec, tmp_path, {}).read_text()

    text = page(0.595)  # within 1 point and 2.5x: the target, outside the rule
    assert "By the rule: **`fgsm`**" in text
    assert ("Not candidates, and meeting the target: `offline` (offline, 1 seed(s)): clean IoU 0.595 against 0.600 "
            f"for `unet`, robust IoU at ε {epsilon_name(EPS)} 0.250 against 0.100 (2.50x), against 0.400 for the "
            "default; not a candidate.") in text  # fmt: skip
    assert "Not candidates, and meeting the target" not in page(0.58)  # 2 points below its control
    # the target is not met: the page says how far the default is
    assert ("The target is **not met**. It is 10.0 clean IoU points below `unet` (the target allows 1 below) "
            "at 4.00x its robust IoU (the target asks 2x).") in text  # fmt: skip
    assert "The candidate closest to the clean tolerance" not in text  # the default is the only candidate


def test_a_control_weaker_than_the_plain_arm_does_not_make_a_recipe_look_accurate(tmp_path):
    study = smoke_study()
    study["arms"] = study["arms"][:2] + [
        {"name": "augmented", "overrides": {"adv#method": "none", "augment": "standard"}},
        {"name": "augmented_fgsm", "overrides": {"adv#recipe": "paper", "augment": "standard"},
         "control": "augmented", "candidate": True},
    ]  # fmt: skip
    spec = load_study(study)

    def result(clean, robust):
        rows = [{"attack": "ensemble", "epsilon": 0.0, "mean_iou": clean, "mean_dice": clean},
                {"attack": "ensemble", "epsilon": EPS, "mean_iou": robust, "mean_dice": robust}]  # fmt: skip
        per_image = {"clean": {"a": clean}, f"ensemble@{EPS:g}": {"a": robust}}
        return {"robustness": rows, "per_image": per_image, "val_iou": {"1": clean}, "checks": {},
                "cost": {"train_seconds": 1.0, "iterations": 1, "images": 16}}  # fmt: skip

    # augmentation costs the plain model 10 points; on top of it the recipe is within 1 point of its own control,
    # but 9.5 below plain training, and less accurate and less robust than the other candidate
    results = {"seeds": [0], "arms": {"unet": {"0": result(0.70, 0.60)}, "fgsm": {"0": result(0.68, 0.64)},
                                      "augmented": {"0": result(0.60, 0.50)},
                                      "augmented_fgsm": {"0": result(0.605, 0.55)}}}  # fmt: skip
    summary = summarize(results, spec)
    assert summary["arms"]["augmented_fgsm"]["clean_reference"] == "unet"
    assert summary["arms"]["fgsm"]["clean_reference"] == "unet"  # its control is the plain arm
    chosen = choose_default(summary)
    assert chosen["arm"] == "fgsm" and chosen["clean_reference"] == "unet" and not chosen["within_tolerance"]
    # with a control as good as plain training, the control is the reference, and the recipe is within it
    results["arms"]["augmented"] = {"0": result(0.70, 0.50)}
    results["arms"]["augmented_fgsm"] = {"0": result(0.695, 0.55)}
    summary = summarize(results, spec)
    assert summary["arms"]["augmented_fgsm"]["clean_reference"] == "augmented"
    assert choose_default(summary)["arm"] == "augmented_fgsm"
    page = write_study_report(results, spec, tmp_path, {}).read_text()
    assert "Clean IoU 0.695 against 0.700 for `augmented`; robust IoU" in page


def test_required_seeds_decide_when_a_study_is_complete():
    spec = load_study({**smoke_study(), "required_seeds": {"each": 2, "best": 3}})
    assert spec.required_seeds == {"each": 2, "best": 3, "arms": {}}

    def summary(**seeds):
        return {"arms": {name: {"seeds": list(range(n))} for name, n in seeds.items()}}

    ranking = {"arm": "fgsm", "ranking": ["fgsm"], "waiting": []}
    assert incomplete_parts(summary(unet=2, fgsm=2, offline=2, finetune=1), spec, ranking) == [
        "arms with fewer than 2 seeds: `finetune`",
        "of the two best candidates, fewer than 3 seeds: `fgsm`",
    ]
    # every arm at 2 and the best at 3 is complete, though the arms have different numbers of seeds
    assert incomplete_parts(summary(unet=2, fgsm=3, offline=2, finetune=2), spec, ranking) == []
    assert incomplete_parts(summary(unet=2, fgsm=3, finetune=2), spec, ranking) == [
        "arms without results yet: `offline`"
    ]
    # without the key, every arm needs every seed any arm has
    plain = load_study(smoke_study())
    assert plain.required_seeds is None
    assert incomplete_parts(summary(unet=2, fgsm=3, offline=2, finetune=2), plain, ranking) == [
        "arms with fewer seeds than others: `unet`, `offline`, `finetune`"
    ]
    assert incomplete_parts(summary(unet=1, fgsm=1, offline=1, finetune=1), plain, ranking) == []
    assert load_study({**smoke_study(), "required_seeds": {"each": 3}}).required_seeds == {
        "each": 3,
        "best": 3,
        "arms": {},
    }
    # an arm with its own number (a check of a design decision, not a recipe) is held to it, not to `each`
    own = load_study({**smoke_study(), "required_seeds": {"each": 3, "arms": {"offline": 1, "finetune": 2}}})
    assert incomplete_parts(summary(unet=3, fgsm=3, offline=1, finetune=1), own, ranking) == [
        "`finetune` has fewer than its 2 seeds"
    ]
    assert incomplete_parts(summary(unet=3, fgsm=3, offline=1, finetune=2), own, ranking) == []
    assert incomplete_parts(summary(unet=2, fgsm=3, offline=0, finetune=2), own, ranking) == [
        "arms with fewer than 3 seeds: `unet`",
        "`offline` has fewer than its 1 seed",
    ]
    for bad, message in ((3, "required_seeds must be"), ({"each": 3, "best": 2}, "M >= N >= 1.*'best': 2"),
                         ({"each": 0}, "got {'each': 0}"), ({"each": 2.5}, "got {'each': 2.5}"),
                         ({"each": 3, "bset": 5}, r"required_seeds: unknown keys \['bset'\]"),
                         ({"each": 3, "arms": {"nope": 1}}, r"required_seeds.arms names \['nope'\], which are not"),
                         ({"each": 3, "arms": {"unet": 0}}, r"required_seeds.arms must be .*'unet': 0"),
                         ({"each": 3, "arms": [1]}, r"required_seeds.arms must be")):  # fmt: skip
        with pytest.raises(SettingsError, match=message):
            load_study({**smoke_study(), "required_seeds": bad})
    assert load_study("kvasir_recipes").required_seeds == {"each": 3, "best": 5, "arms": {}}
    # a candidate the rule does not count yet (too few seeds) keeps the study incomplete, whatever `each` says
    lax = load_study({**smoke_study(), "required_seeds": {"each": 1, "best": 3}})
    assert incomplete_parts(summary(unet=3, fgsm=3, offline=3, finetune=3), lax,
                            {"arm": "fgsm", "ranking": ["fgsm"], "waiting": ["offline"]}) == [
        "candidates the rule does not count yet: `offline`"]  # fmt: skip
    assert incomplete_parts(summary(unet=1, fgsm=1, offline=1, finetune=1), lax,
                            {"arm": None, "reason": "no quoted epsilon.", "ranking": [], "waiting": []}) == [
        "no default chosen yet (no quoted epsilon)"]  # fmt: skip


def test_plateau_epoch():
    assert plateau_epoch({"1": 0.2, "2": 0.5, "3": 0.595, "4": 0.6, "5": 0.58}) == 3
    assert plateau_epoch({}) is None


def test_summary_reads_costs_and_ratio_from_the_files(tmp_path):
    spec = load_study(smoke_study())

    def result(iou, seconds, iterations, images):
        rows = [{"attack": "ensemble", "epsilon": 0.0, "mean_iou": iou, "mean_dice": iou},
                {"attack": "ensemble", "epsilon": EPS, "mean_iou": iou / 2, "mean_dice": iou / 2}]  # fmt: skip
        return {"robustness": rows, "per_image": {}, "val_iou": {"1": iou}, "checks": {},
                "cost": {"train_seconds": seconds, "iterations": iterations, "images": images}}  # fmt: skip

    results = {"arms": {"unet": {"0": result(0.6, 10.0, 10, 160)}, "fgsm": {"0": result(0.5, 20.0, 10, 320)},
                        "finetune": {"0": result(0.55, 15.0, 5, 80)}}}  # fmt: skip
    summary = summarize(results, spec)
    assert summary["arms"]["fgsm"]["step_ratio"] == [pytest.approx(2.0)]
    assert summary["arms"]["finetune"]["cost"]["iterations"] == [15.0]  # its own 5 and the UNet's 10
    assert summary["arms"]["finetune"]["step_ratio"] == [pytest.approx(3.0)]

    # a run on another machine than its seed's plain run is timed against the plain runs on its own machine
    slow, fast = "EPYC, 2 CPUs", "Xeon, 2 CPUs"
    results["arms"]["unet"] = {"0": {**result(0.6, 10.0, 10, 160), "machine": fast},
                               "1": {**result(0.6, 16.0, 10, 160), "machine": slow},
                               "2": {**result(0.6, 18.0, 10, 160), "machine": slow}}  # fmt: skip
    results["arms"]["fgsm"] = {"0": {**result(0.5, 34.0, 10, 320), "machine": slow}}
    fgsm = summarize(results, spec)["arms"]["fgsm"]
    assert fgsm["step_ratio"] == [pytest.approx(2.0)] and fgsm["step_ratio_notes"] == []
    results["arms"]["fgsm"]["0"]["machine"] = "a third machine"  # no plain run there: the same seed's, marked
    fgsm = summarize(results, spec)["arms"]["fgsm"]
    assert fgsm["step_ratio"] == [pytest.approx(3.4)] and fgsm["step_ratio_notes"] == ["other machine"]


def test_page_states_the_compute_behind_its_results_and_a_rebuild_that_ran_nothing(tmp_path):
    spec = load_study(smoke_study())

    def result(train, robustness=None, offline=0.0, evaluation=None):
        rows = [{"attack": "ensemble", "epsilon": 0.0, "mean_iou": 0.6, "mean_dice": 0.7},
                {"attack": "ensemble", "epsilon": EPS, "mean_iou": 0.3, "mean_dice": 0.4}]  # fmt: skip
        out = {"robustness": rows, "per_image": {}, "val_iou": {"1": 0.6}, "checks": {},
               "cost": {"train_seconds": train - 60, "wall_seconds": train, "offline_seconds": offline,
                        "iterations": 10, "images": 160}}  # fmt: skip
        if robustness is not None:
            out["robustness_seconds"] = robustness
        if evaluation is not None:
            out["clean_evaluations"] = {"window": {"metrics": {}, "seconds": evaluation}}
        return out

    # the offline arm builds on the UNet: its training is counted once here (arm_cost counts it again for the arm)
    results = {"seeds": [0, 1], "arms": {
        "unet": {"0": result(3600, 1800, evaluation=360), "1": result(3600, 5400)},
        "offline": {"0": result(1800, 3600, offline=720)},
        "fgsm": {"0": result(7200)},  # recorded before robustness time was kept
    }}  # fmt: skip
    compute = study_compute(results)
    assert compute == {"runs": 4, "train_seconds": 16200, "offline_seconds": 720, "robustness_seconds": 10800,
                       "evaluation_seconds": 360, "total_seconds": 28080}  # fmt: skip
    page = write_study_report(results, spec, tmp_path, {}).read_text()
    assert ("- compute behind this page: 4 arm-seed runs, 7.8 h of wall time (training 4.5 h, offline copies 12 min, "
            "robustness 3.0 h, clean evaluations 6 min; each run's own steps") in page  # fmt: skip
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if "| robustness min |" in line)  # the table of arms
    header = lines[start].split(" | ")
    rows = {line.split(" | ")[0]: line.split(" | ") for line in lines[start + 2 : start + 5]}
    assert rows["| fgsm (`fgsm`)"][header.index("robustness min")] == "–"
    assert rows["| unet (`unet`)"][header.index("robustness min")] == "60.0 ± 42.4"
    assert "none: this call rebuilt the page from the results file" in page
    ran = write_study_report(results, spec, tmp_path, {"commands": ["monai.bundle run training ..."]}).read_text()
    assert "monai.bundle run training ..." in ran and "none: this call rebuilt" not in ran


def test_reference_distances_are_the_mean_clean_dice_minus_the_reference():
    spec = load_study({**smoke_study(), "reference": {"label": "nnU-Net", "dice": {"a": 0.9, "b": 0.8, "c": 0.7}},
                       "clean_evaluations": {"windows": {"label": "small windows"}}})  # fmt: skip

    def result(a, b, windows=None):
        row = {"attack": "ensemble", "epsilon": 0.0, "mean_iou": 0.5, "dice_a": a, "dice_b": b}
        evaluations = {} if windows is None else {"windows": {"metrics": {"val_dice_a": windows[0],
                                                                          "val_dice_b": windows[1]}}}  # fmt: skip
        return {"robustness": [row], "clean_evaluations": evaluations}

    # seed 2 has no clean evaluation (its model.pt was gone): the windows row averages seeds 0 and 1 only
    results = {"arms": {"unet": {"0": result(0.86, 0.75, (0.88, 0.70)), "1": result(0.84, 0.77, (0.90, 0.72)),
                                 "2": result(0.85, 0.76)}}}  # fmt: skip
    page = "\n".join(_reference_lines(results, spec))
    assert "## Against nnU-Net" in page and "a 0.9, b 0.8, c 0.7 Dice" in page
    assert "No per-class Dice in the results for: `c`." in page
    assert "| `unet` | the study's | 3 | 0.850 (-5.0) | 0.760 (-4.0) |" in page
    assert "| `unet` | small windows | 2 | 0.890 (-1.0) | 0.710 (-9.0) |" in page
    assert _reference_lines(results, load_study(smoke_study())) == []  # no reference, no section


def test_volume_datalists_name_files_the_bundle_finds_from_a_relative_dataset_dir(tmp_path, monkeypatch):
    """Volumes are not prepared: the datalists name the original files, which must resolve from the datalist's own
    folder (where the bundle reads them) also when the study was given relative paths."""
    import nibabel as nib

    from monai_adv.study import StudyRunner

    data = tmp_path / "decathlon"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    cases = [f"case_{i:03d}" for i in range(6)]
    for case in cases:
        for folder in ("imagesTr", "labelsTr"):
            nib.save(
                nib.Nifti1Image(np.zeros((6, 6, 6), dtype=np.float32), np.eye(4)), data / folder / f"{case}.nii.gz"
            )
    training = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]
    (data / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a", "2": "b"},
                                                   "training": training}))  # fmt: skip
    (data / "split.json").write_text(json.dumps({"train": cases[:4], "validation": cases[4:5], "test": cases[5:]}))
    monkeypatch.chdir(tmp_path)
    runner = StudyRunner(load_study("hippocampus_recipes"), "decathlon", [0], "work")
    datalists = runner.prepare()
    for path in datalists.values():
        listed = json.loads(path.read_text())
        items = listed["training"] + listed["validation"]
        assert len(items) == 5
        assert listed["labels"] == {"0": "background", "1": "a", "2": "b"}  # the bundle's per-class keys read them
        for item in items:
            for key in ("image", "label"):
                assert (path.parent / item[key]).is_file(), (path, item[key])
    # the test scores and attacks run through the bundle's own 32^3 windows; only the validation that picks the
    # checkpoint takes the profile's cheaper single window
    runner.datalists = datalists
    steps = {step[0]: step for step in runner.plan(runner.spec.arm("nfgsm_eps1_eighth"), 0)}
    assert steps["train"][-1]["validate#inferer#roi_size"] == [48, 64, 48]
    assert "validate#inferer#roi_size" not in steps["robustness"][-1]
    assert steps["robustness"][-1]["adv#recipe"] == "nfgsm_eps1_eighth"
