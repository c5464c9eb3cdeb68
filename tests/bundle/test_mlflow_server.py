"""Tracking to a real MLflow server: ``MLFLOW_TRACKING_URI=http://...`` wins over the bundle's sqlite store."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest


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
