"""``run robustness``: IoU/Dice of a checkpoint, clean and under FGSM, Inverse FGSM and PGD, as a user runs it."""

from __future__ import annotations

import csv
import json

import pytest


def robustness_configs(bundle) -> str:
    return f"['{bundle.train_json}','{bundle.configs / 'robustness.json'}']"


def eval_settings(bundle) -> dict:
    return {k: v for k, v in bundle.tiny.items() if k != "max_epochs"}


def test_robustness_rows_files_and_mlflow(bundle, trained_bundle, tmp_path):
    root = bundle.copy_outputs(trained_bundle.root, tmp_path / "bundle")
    settings = eval_settings(bundle)
    evaluate = f"['{bundle.train_json}','{bundle.evaluate_json}']"
    bundle.run("run", "evaluating", "--config_file", evaluate, "--bundle_root", root, *bundle.overrides(settings))
    with open(root / "eval" / "metrics.csv") as f:
        evaluated = {row[0]: float(row[1]) for row in csv.reader(f) if row}

    run = bundle.run(
        "run", "robustness", "--config_file", robustness_configs(bundle), "--bundle_root", root,
        "--tracking", "mlflow", "--output_dir", root / "robust", *bundle.overrides(settings),
    )  # fmt: skip
    out = root / "robust"
    summary = json.loads((out / "robustness.json").read_text())
    assert summary["checkpoint"] == str(root / "models" / "model.pt") and summary["num_images"] == 8
    rows = {(r["attack"], r["epsilon"]): r for r in summary["results"]}
    epsilons = [0.0, 0.0012, 0.0118, 0.1176, 0.2]
    assert set(rows) == {(a, e) for a in ("fgsm", "invfgsm", "pgd") for e in epsilons}
    assert rows["pgd", 0.2]["num_steps"] == 10 and rows["fgsm", 0.2]["num_steps"] == 1
    # epsilon 0 is exactly what `run evaluating` measures on the same checkpoint and images
    for attack in ("fgsm", "invfgsm", "pgd"):
        assert rows[attack, 0.0]["mean_iou"] == pytest.approx(evaluated["val_mean_iou"], abs=1e-6)
        assert rows[attack, 0.0]["mean_dice"] == pytest.approx(evaluated["val_mean_dice"], abs=1e-6)
    assert rows["fgsm", 0.2]["mean_iou"] < rows["fgsm", 0.0]["mean_iou"]
    # the iterative attack is at least as strong as the single step, on average over the epsilons
    positive = epsilons[1:]
    pgd = sum(rows["pgd", e]["mean_iou"] for e in positive) / len(positive)
    fgsm = sum(rows["fgsm", e]["mean_iou"] for e in positive) / len(positive)
    assert pgd <= fgsm + 1e-6
    with open(out / "robustness.csv") as f:
        assert [(r["attack"], float(r["epsilon"])) for r in csv.DictReader(f)] == [
            (r["attack"], r["epsilon"]) for r in summary["results"]
        ]
    assert (out / "robustness.png").stat().st_size > 0 and (out / "robustness_examples.png").stat().st_size > 0
    assert "invfgsm" in run.output and "mean_iou" in run.output  # the table is printed

    from monai.utils import path_to_sqlite_uri

    client, mlflow_run = bundle.single_mlflow_run(path_to_sqlite_uri(str(out / "mlruns.db")))
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"robustness.json", "robustness.csv", "robustness.png", "robustness_examples.png"} <= artifacts
    logged = mlflow_run.data.metrics["robust_iou/fgsm/eps_0.2"]
    assert logged == pytest.approx(rows["fgsm", 0.2]["mean_iou"])


@pytest.mark.parametrize(
    "override, message",
    [({"attacks": ["fgsm", "cw"]}, "unknown attack"), ({"epsilons": [0.1, -0.01]}, "non-negative"),
     ({"pgd_steps": 0}, "pgd_steps")],
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
