"""A tracking server that is down at start, or dies mid-run, never stalls a training (real ``mlflow server``s on
127.0.0.1, started and stopped by the tests; issue 15, items 5 and 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

PREFIX = "monai-adv: error: "

# Pauses the trainer at the end of epoch 1 (before MLflow logs it) until the test has stopped the server.
PAUSE = """
import pathlib
import time

from ignite.engine import Events


class PauseAfterFirstEpoch:
    def __init__(self, go_file):
        self.go_file = pathlib.Path(go_file)

    def attach(self, engine):
        engine.add_event_handler(Events.EPOCH_COMPLETED(once=1), self)

    def __call__(self, engine):
        print("PAUSED-AFTER-EPOCH-1", flush=True)
        deadline = time.monotonic() + 300
        while not self.go_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
"""


@pytest.mark.slow
def test_a_server_that_does_not_answer_fails_at_start_in_one_line(bundle, mlflow_server, tmp_path):
    mlflow_server.stop()  # it was there, and went away
    started = time.monotonic()
    run = bundle.train(tmp_path / "root", {"adv#method": "none"}, tracking="mlflow",
                       env={"MLFLOW_TRACKING_URI": mlflow_server.url}, expect_success=False, timeout=300)  # fmt: skip
    elapsed = time.monotonic() - started
    assert run.returncode != 0
    last = run.output.strip().splitlines()[-1]
    assert last.startswith(f"{PREFIX}the MLflow tracking server {mlflow_server.url} (MLFLOW_TRACKING_URI) does not "
                           "answer within 5 s"), run.describe()  # fmt: skip
    assert elapsed < 120, f"took {elapsed:.0f} s"
    assert "CacheDataset" not in run.output and not (tmp_path / "root" / "models" / "model.pt").exists()


@pytest.mark.slow
def test_a_server_that_dies_mid_run_leaves_training_and_checkpoints_going(bundle, mlflow_server, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "pause_after_epoch.py").write_text(PAUSE)
    go = tmp_path / "go"
    overlay = tmp_path / "pause.json"
    overlay.write_text(json.dumps({
        "pause": {"_target_": "pause_after_epoch.PauseAfterFirstEpoch", "go_file": str(go)},
        "train#trainer#train_handlers": "$[@adv#handler, @train#loss_guard, @pause] + @train#handlers",
    }))  # fmt: skip
    log = tmp_path / "train.log"
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
               f"['{bundle.train_json}','{overlay}']", "--bundle_root", str(root), "--tracking", "mlflow",
               *bundle.overrides({**bundle.tiny, "adv#method": "fgsm", "max_epochs": 3})]  # fmt: skip
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "PYTHONPATH": path}
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=bundle.repo_root, env=bundle.env(env),
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "PAUSED-AFTER-EPOCH-1" not in log.read_text():
            assert process.poll() is None, log.read_text()[-6000:]
            assert time.monotonic() < deadline, log.read_text()[-6000:]
            time.sleep(0.5)
        mlflow_server.stop()
        go.touch()
        stopped = time.monotonic()
        returncode = process.wait(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()
    assert returncode == 0, output[-6000:]
    assert time.monotonic() - stopped < 180, "training stalled on the dead server"
    models = sorted(p.name for p in (root / "models").iterdir())
    expected = ["checkpoint_epoch=3.pt", "model.pt", "training_history.json", "training_run.json"]
    assert models == expected, models  # lock released too
    assert f"MLflow logging to {mlflow_server.url} failed" in output
    assert "nothing more is sent to it in this training" in output
    # one summary per handler: the trainer's when its run ends, the validator's at exit
    summaries = [line for line in output.splitlines() if f"MLflow: not logged to {mlflow_server.url}" in line]
    assert len(summaries) == 2, output[-6000:]
    trainer, validator = summaries
    assert "train_loss (steps" in trainer and "train_epoch_loss (steps 1-3, 3 values)" in trainer, trainer
    assert "the run's end (it stays RUNNING on the server)" in trainer
    assert "val_mean_iou (steps 1-3, 3 values)" in validator, validator
    # the best model is not sent to the server given up on: a warning, and model.pt stays (listed above)
    assert f"MLflow: the best model {root}/models/model.pt was not logged to {mlflow_server.url} (the server " \
           "stopped answering earlier in this training)." in output, output[-6000:]  # fmt: skip


@pytest.mark.slow
def test_a_deleted_experiment_of_the_same_name_is_refused_at_start(bundle, tmp_path):
    from mlflow.tracking import MlflowClient

    root = tmp_path / "root"
    (root / "eval").mkdir(parents=True)
    uri = bundle.sqlite_uri(root)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(bundle.experiment)
    client.delete_experiment(experiment_id)
    run = bundle.train(root, {"adv#method": "none"}, tracking="mlflow", expect_success=False)
    last = run.output.strip().splitlines()[-1]
    assert last.startswith(f"{PREFIX}the MLflow experiment '{bundle.experiment}' at {uri} is deleted"), run.describe()
    assert f"mlflow experiments restore --experiment-id {experiment_id}" in last and "--experiment_name" in last
    assert "Cannot set a deleted experiment" not in run.output
    assert not (root / "data").exists(), "the data was generated (and cached) before the refusal"
    client.restore_experiment(experiment_id)
    bundle.train(root, {"adv#method": "none", "max_epochs": 1}, tracking="mlflow")  # trains once restored


@pytest.mark.slow
def test_a_deleted_experiment_named_on_the_command_line_is_refused_before_the_data(bundle, tmp_path):
    """``--tracking_uri`` and ``--experiment_name`` (the config's, no MLFLOW_TRACKING_URI): refused before the data
    is generated or cached, before the lock is taken and before the previous training's files are put aside."""
    from mlflow.tracking import MlflowClient
    from monai.utils import path_to_sqlite_uri

    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    for name in ("checkpoint_epoch=2.pt", "model.pt"):  # a previous training's files (a fresh one puts them aside)
        (root / "models" / name).write_bytes(b"previous")
    before = sorted(p.name for p in (root / "models").iterdir())
    uri = path_to_sqlite_uri(str(tmp_path / "elsewhere" / "store.db"))
    (tmp_path / "elsewhere").mkdir()
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("renamed")
    client.delete_experiment(experiment_id)
    run = bundle.train(root, {"adv#method": "none", "tracking_uri": uri, "experiment_name": "renamed"},
                       tracking="mlflow", expect_success=False)  # fmt: skip
    last = run.output.strip().splitlines()[-1]
    assert last.startswith(f"{PREFIX}the MLflow experiment 'renamed' at {uri} is deleted (id {experiment_id}"), \
        run.describe()  # fmt: skip
    assert f"MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {experiment_id}" in last
    assert not (root / "data").exists(), "the data was generated (and cached) before the refusal"
    assert sorted(p.name for p in (root / "models").iterdir()) == before  # no lock, nothing put aside
    assert not (root / "eval" / "mlruns.db").exists()  # the config's store, not the default one
