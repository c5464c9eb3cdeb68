"""TensorBoard tracking, the model zoo's default: ``--tracking configs/tensorboard.json`` (a MONAI tracking settings
file) writes the same metrics as ``--tracking mlflow`` as TensorBoard event files (issue 15)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_tensorboard_tracking_writes_the_metrics_as_event_files(bundle, tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard tracking needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tmp_path / "bundle"
    bundle.train(root, {"adv#method": "fgsm"}, tracking=str(bundle.configs / "tensorboard.json"))
    run_name = json.loads((root / "models" / "training_run.json").read_text())["run_id"]
    runs = sorted(p.name for p in (root / "eval" / "tensorboard").iterdir())
    assert runs == [run_name], runs  # one folder per training, named as its MLflow run would be
    events = EventAccumulator(str(root / "eval" / "tensorboard" / run_name))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for tag in ("val_mean_iou", "val_mean_dice", "train_epoch_loss", "adv_samples", "adv_epsilon", "adv_loss_clean"):
        assert [step for step, _ in scalars.get(tag, [])] == [1, 2], (tag, sorted(scalars))
    assert all(0.0 <= value <= 1.0 for _, value in scalars["val_mean_iou"])
    assert [step for step, _ in scalars["train_loss"]] == [1, 2, 3, 4]  # per iteration: 16 images, batches of 8
    # the MLflow steps of the bundle (checks, guard, the best model's logging) leave TensorBoard handlers alone
    assert not (root / "eval" / "mlruns.db").exists()
    assert (root / "models" / "model.pt").is_file()
