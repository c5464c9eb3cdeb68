"""Tracking to a real MLflow server: ``MLFLOW_TRACKING_URI=http://...`` wins over the bundle's sqlite store, and the
best model goes into the training's run as an MLflow model (issue 15)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mlflow") is None and not Path(sys.executable).with_name("mlflow").is_file(),
                    reason="the mlflow command is not installed")  # fmt: skip
def test_training_is_tracked_on_an_mlflow_server(bundle, mlflow_server, tmp_path):
    url, artifacts = mlflow_server
    root = tmp_path / "bundle"
    run = bundle.train(root, {"adv#method": "fgsm"}, tracking="mlflow", env={"MLFLOW_TRACKING_URI": url})
    assert not (root / "eval" / "mlruns.db").exists(), "the run went to the sqlite store, not to the server"

    client, mlflow_run = bundle.single_mlflow_run(url)
    assert mlflow_run.info.status == "FINISHED", run.describe()
    params = mlflow_run.data.params
    assert params["adv_method"] == "fgsm" and float(params["adv_epsilon"]) == pytest.approx(0.1)
    iou = bundle.metric_steps(client, mlflow_run.info.run_id, "val_mean_iou")
    assert [step for step, _ in iou] == [1, 2] and all(0.0 <= v <= 1.0 for _, v in iou)
    assert "adv_loss_fgsm" in mlflow_run.data.metrics
    # the resolved config went through the server into its artifact store
    names = [a.path for a in client.list_artifacts(mlflow_run.info.run_id)]
    assert any(re.fullmatch(r"config_.*\.json", n) for n in names), names
    assert list(artifacts.rglob("config_*.json")), "the server's artifact folder holds no config"

    # the best model (models/model.pt) is an MLflow model of the same run: it loads as the bundle's network
    import mlflow
    import mlflow.pytorch

    model_uri = f"runs:/{mlflow_run.info.run_id}/model"
    mlflow.set_tracking_uri(url)
    try:
        info = mlflow.models.get_model_info(model_uri)
        loaded = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    finally:
        mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI (the fixture restores the environment)
    assert info.run_id == mlflow_run.info.run_id
    assert [o.model_id for o in client.get_run(mlflow_run.info.run_id).outputs.model_outputs] == [info.model_id]
    size, channels = bundle.tiny_image_size, 3
    assert [spec.shape for spec in info.signature.inputs.inputs] == [(-1, channels, size, size)]
    assert [spec.shape for spec in info.signature.outputs.inputs] == [(-1, 2, size, size)]
    assert info.metadata["name"] == "Adversarial-augmentation UNet segmentation"
    assert info.metadata["settings"]["features"] == bundle.tiny_features and info.metadata["source"] == "model.pt"
    expected = bundle.load_tiny_network(root / "models" / "model.pt")
    images = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), expected(images), rtol=0, atol=0)
    assert f"MLflow: the best model {root}/models/model.pt is logged as {model_uri}" in run.output
