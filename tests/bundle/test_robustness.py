"""``run robustness``: IoU/Dice of a checkpoint, clean, under every attack and their per-image worst case, with the
gradient-masking checks, as a user runs it."""

from __future__ import annotations

import csv
import json

import pytest


def robustness_configs(bundle) -> str:
    return f"['{bundle.train_json}','{bundle.configs / 'robustness.json'}']"


def eval_settings(bundle) -> dict:
    return {k: v for k, v in bundle.tiny.items() if k != "max_epochs"}


# a small budget: the point is the workflow, not the numbers
BUDGET = {"epsilons": [0.0, 2 / 255, 0.1176], "num_steps": 3}


def test_robustness_rows_files_and_mlflow(bundle, trained_bundle, tmp_path):
    root = bundle.copy_outputs(trained_bundle.root, tmp_path / "bundle")
    settings = eval_settings(bundle)
    evaluate = f"['{bundle.train_json}','{bundle.evaluate_json}']"
    bundle.run("run", "evaluating", "--config_file", evaluate, "--bundle_root", root, *bundle.overrides(settings))
    with open(root / "eval" / "metrics.csv") as f:
        evaluated = {row[0]: float(row[1]) for row in csv.reader(f) if row}

    run = bundle.run(
        "run", "robustness", "--config_file", robustness_configs(bundle), "--bundle_root", root,
        "--tracking", "mlflow", "--output_dir", root / "robust", *bundle.overrides({**settings, **BUDGET}),
    )  # fmt: skip
    out = root / "robust"
    summary = json.loads((out / "robustness.json").read_text())
    assert summary["checkpoint"] == str(root / "models" / "model.pt") and summary["num_images"] == 8
    rows = {(r["attack"], r["loss"], r["epsilon"]): r for r in summary["results"]}
    attacks = {"fgsm", "invfgsm", "pgd", "segpgd", "cospgd", "apgd", "noise", "ensemble"}
    assert {r["attack"] for r in summary["results"]} == attacks
    assert {(a, e) for a, _, e in rows} == {(a, e) for a in attacks for e in BUDGET["epsilons"]}
    assert {loss for a, loss, e in rows if a == "apgd" and e > 0} == {"js", "masked_ce", "balanced_ce"}
    assert rows["pgd", "DiceCELoss", 0.1176]["num_steps"] == 3 and rows["fgsm", "DiceCELoss", 0.1176]["num_steps"] == 1
    # epsilon 0 is exactly what `run evaluating` measures on the same checkpoint and images
    for (attack, _, eps), row in rows.items():
        if eps == 0:
            assert row["mean_iou"] == pytest.approx(evaluated["val_mean_iou"], abs=1e-6), attack
            assert row["mean_dice"] == pytest.approx(evaluated["val_mean_dice"], abs=1e-6), attack
    for eps in BUDGET["epsilons"][1:]:
        worst = min(r["mean_iou"] for (a, _, e), r in rows.items() if e == eps and a not in ("invfgsm", "noise"))
        ensemble = next(r for (a, _, e), r in rows.items() if a == "ensemble" and e == eps)
        assert ensemble["mean_iou"] <= worst + 1e-7
    assert set(summary["checks"]) >= {"monotone_in_epsilon", "large_radius", "noise_weaker", "fgsm_not_stronger"}
    assert isinstance(summary["suspect_gradient_masking"], bool)
    with open(out / "robustness.csv") as f:
        assert [(r["attack"], float(r["epsilon"])) for r in csv.DictReader(f)] == [
            (r["attack"], r["epsilon"]) for r in summary["results"]
        ]
    assert (out / "robustness.png").stat().st_size > 0 and (out / "robustness_examples.png").stat().st_size > 0
    assert "ensemble" in run.output and "mean_iou" in run.output  # the table is logged

    from monai.utils import path_to_sqlite_uri

    client, mlflow_run = bundle.single_mlflow_run(path_to_sqlite_uri(str(out / "mlruns.db")))
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"robustness.json", "robustness.csv", "robustness.png", "robustness_examples.png"} <= artifacts
    logged = mlflow_run.data.metrics["robust_iou/ensemble/eps_0.1176"]
    assert logged == pytest.approx(next(r for (a, _, e), r in rows.items() if a == "ensemble" and e == 0.1176)[
        "mean_iou"])  # fmt: skip


def test_transfer_check_from_a_surrogate_checkpoint(bundle, trained_bundle, tmp_path):
    root = bundle.copy_outputs(trained_bundle.root, tmp_path / "bundle")
    surrogate = max((root / "models").glob("checkpoint_epoch=*.pt"))
    bundle.run(
        "run", "robustness", "--config_file", robustness_configs(bundle), "--bundle_root", root,
        "--output_dir", root / "robust", "--surrogate_ckpt", surrogate, "--attacks", '["fgsm","pgd","ensemble"]',
        "--num_examples", "0", *bundle.overrides({**eval_settings(bundle), **BUDGET}),
    )  # fmt: skip
    summary = json.loads((root / "robust" / "robustness.json").read_text())
    assert "transfer_not_stronger" in summary["checks"]


@pytest.mark.parametrize(
    "override, message",
    [({"attacks": ["fgsm", "cw"]}, "unknown attack"), ({"epsilons": [0.1, -0.01]}, "non-negative"),
     ({"num_steps": 0}, "num_steps"), ({"apgd_losses": ["hinge"]}, "loss")],
)  # fmt: skip
def test_bad_options_fail_before_any_batch(
    bundle, trained_bundle, tmp_path, override, message, one_torch_thread, restore_determinism
):
    from monai.bundle import ConfigWorkflow

    root = bundle.copy_outputs(trained_bundle.root, tmp_path / "bundle")
    workflow = ConfigWorkflow(
        config_file=[str(bundle.train_json), str(bundle.configs / "robustness.json")], workflow_type=None,
        logging_file=False, bundle_root=str(root), **eval_settings(bundle), **override,
    )  # fmt: skip
    workflow.initialize()
    with pytest.raises(Exception) as info:
        workflow.run()
    assert message in str(info.value) or message in str(info.value.__cause__)
    assert not (root / "eval" / "robustness.json").exists()


def test_missing_checkpoint_is_explained(bundle, tmp_path, restore_determinism):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[str(bundle.train_json), str(bundle.configs / "robustness.json")], workflow_type=None,
        logging_file=False, bundle_root=str(tmp_path), **bundle.tiny_net,
    )  # fmt: skip
    with pytest.raises(Exception) as info:
        workflow.initialize()
    text = f"{info.value} {info.value.__cause__}"
    assert "checkpoint to evaluate (ckpt_path)" in text and str(tmp_path / "models" / "model.pt") in text


class _StopAfterFirstBatch:
    """Ends a run after its first batch, as a kill or the end of a session would."""

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self.stop)

    def stop(self) -> None:
        raise KeyboardInterrupt("stopped part way")


def test_a_stopped_run_robustness_continues_where_it_stopped(
    bundle, trained_bundle, tmp_path, one_torch_thread, restore_determinism
):
    from monai.bundle import ConfigWorkflow

    root = bundle.copy_outputs(trained_bundle.root, tmp_path / "bundle")
    # two batches of 4, the cheap attacks with random starts and noise
    settings = {**eval_settings(bundle), **BUDGET, "batch_size": 4, "attacks": ["fgsm", "pgd", "noise", "ensemble"],
                "num_examples": 0}  # fmt: skip
    args = ("run", "robustness", "--config_file", robustness_configs(bundle), "--bundle_root", root)
    bundle.run(*args, "--output_dir", root / "whole", *bundle.overrides(settings))
    stopped = root / "stopped"
    workflow = ConfigWorkflow(
        config_file=[str(bundle.train_json), str(bundle.configs / "robustness.json")], workflow_type=None,
        logging_file=False, bundle_root=str(root), output_dir=str(stopped), handlers=[_StopAfterFirstBatch()],
        **settings,
    )  # fmt: skip
    workflow.initialize()
    with pytest.raises(KeyboardInterrupt):
        workflow.run()
    assert (stopped / "robustness_progress.pt").is_file() and not (stopped / "robustness.json").exists()

    run = bundle.run(*args, "--output_dir", stopped, *bundle.overrides(settings))
    assert "continuing from" in run.output and "1 batches (4 images) already measured" in run.output
    whole, continued = (json.loads((root / d / "robustness.json").read_text()) for d in ("whole", "stopped"))
    assert continued["num_images"] == 8 and continued["results"] == whole["results"]
    assert (
        not (stopped / "robustness_progress.pt").exists() and not (root / "whole" / "robustness_progress.pt").exists()
    )
