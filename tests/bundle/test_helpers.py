"""monai_adv.bundle in-process: atomic checkpoint writing, readable-checkpoint lookup, the training lock, MLflow."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from monai_adv.bundle import (
    AtomicCheckpointSaver,
    KeepPreviousDiskSaver,
    TrainingRun,
    latest_checkpoint,
    log_best_model,
    prepare_mlflow_handlers,
)


class Unpicklable:
    """Fails while ``torch.save`` writes it: stands for a process that dies mid-write."""

    def __reduce__(self):
        raise RuntimeError("write interrupted")


class State:
    def __init__(self):
        self.value = {"x": 0}

    def state_dict(self):
        return self.value

    def load_state_dict(self, state):
        self.value = state


def engine_at(epoch: int) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.state.epoch = epoch
    return engine


def test_previous_checkpoint_is_kept_until_the_new_one_is_complete(tmp_path):
    state = State()
    checkpoint = Checkpoint({"state": state, "other": State()}, KeepPreviousDiskSaver(tmp_path),
                            score_function=lambda e: e.state.epoch, score_name="epoch", n_saved=1)  # fmt: skip
    checkpoint(engine_at(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt"]
    state.value = {"x": Unpicklable()}
    with pytest.raises(RuntimeError, match="write interrupted"):
        checkpoint(engine_at(2))
    # Ignite asked to remove epoch 1 before writing epoch 2: it stays, complete, and no partial file appears
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt"]
    assert torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)["state"] == {"x": 0}
    state.value = {"x": 3}
    checkpoint(engine_at(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=3.pt"]


def test_best_model_saver_keeps_its_best_score_across_a_resume(tmp_path):
    network = torch.nn.Linear(2, 2)
    saver = AtomicCheckpointSaver(tmp_path, {"model": network}, save_key_metric=True,
                                  key_metric_name="iou", key_metric_filename="model.pt")  # fmt: skip
    engine = engine_at(1)
    engine.state.metrics = {"iou": 0.5}
    saver(engine)
    saved = (tmp_path / "model.pt").read_bytes()
    torch.save({"saver": saver.state_dict()}, tmp_path / "state.pt")

    resumed = AtomicCheckpointSaver(tmp_path, {"model": torch.nn.Linear(2, 2)}, save_key_metric=True,
                                    key_metric_name="iou", key_metric_filename="model.pt")  # fmt: skip
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["saver"])
    validator = Engine(lambda e, b: None)
    validator.state.best_metric, validator.state.best_metric_epoch = -1, -1  # as a fresh MONAI workflow has them
    resumed.attach(validator)
    validator.fire_event(Events.STARTED)
    assert (validator.state.best_metric, validator.state.best_metric_epoch) == (pytest.approx(0.5), 1)
    engine.state.epoch = 2
    engine.state.metrics = {"iou": 0.3}
    resumed(engine)
    assert (tmp_path / "model.pt").read_bytes() == saved, "a worse model replaced the best one"
    engine.state.metrics = {"iou": 0.7}
    resumed(engine)
    assert (tmp_path / "model.pt").read_bytes() != saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "state.pt"]


def test_saver_needs_exactly_one_job(tmp_path):
    with pytest.raises(ValueError, match="either save_interval > 0"):
        AtomicCheckpointSaver(tmp_path, {"m": torch.nn.Linear(1, 1)})
    with pytest.raises(ValueError, match="either save_interval > 0"):
        AtomicCheckpointSaver(tmp_path, {"m": torch.nn.Linear(1, 1)}, save_interval=1, save_key_metric=True)


def test_unreadable_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path):
    torch.save({"model": {"w": torch.ones(3)}}, tmp_path / "checkpoint_epoch=2.pt")
    complete = (tmp_path / "checkpoint_epoch=2.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(complete[: len(complete) // 2])  # truncated by a kill
    (tmp_path / "checkpoint_epoch=4.pt").write_bytes(b"")
    with pytest.warns(UserWarning) as caught:
        assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_epoch=2.pt")
    messages = [str(w.message) for w in caught]
    assert any(str(tmp_path / "checkpoint_epoch=4.pt") in m for m in messages), messages
    assert any(str(tmp_path / "checkpoint_epoch=3.pt") in m for m in messages), messages
    (tmp_path / "checkpoint_epoch=2.pt").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match="none of the checkpoints"):
        latest_checkpoint(tmp_path)


def test_resuming_reads_the_checkpoint_once_to_find_it_and_its_entries(tmp_path, monkeypatch):
    """latest_checkpoint and checkpoint_entries share one read; a rewritten checkpoint is read again."""
    from monai_adv.bundle import checkpoints

    path = tmp_path / "checkpoint_epoch=1.pt"
    torch.save({"model": {"w": torch.ones(3)}}, path)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(checkpoints.torch, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    found = latest_checkpoint(tmp_path)
    load_dict = {"model": 1, "random_states": 2}
    with pytest.warns(UserWarning, match="random_states"):
        assert checkpoints.checkpoint_entries(load_dict, found) == {"model": 1}
    assert reads == [found]
    torch.save({"model": {"w": torch.ones(4)}, "random_states": {"seed": 1}}, path)  # a later save, other entries
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1))  # however coarse the clock
    assert checkpoints.checkpoint_entries(load_dict, latest_checkpoint(tmp_path)) == load_dict
    assert reads == [found, found]


def write_lock(ckpt_dir, pid: int) -> None:
    import socket

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "training.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "run_id": "other"}))


def test_lock_of_a_running_training_refuses_a_second_one(tmp_path):
    models = tmp_path / "models"
    torch.save({}, models.mkdir() or models / "checkpoint_epoch=1.pt")
    write_lock(models, os.getppid())  # a live process other than this one
    with pytest.raises(RuntimeError, match="another training is running in") as info:
        TrainingRun(models).start()
    assert f"pid {os.getppid()}" in str(info.value) and str(models / "training.lock") in str(info.value)
    assert (models / "checkpoint_epoch=1.pt").is_file(), "a refused training must not touch the files"


def test_stale_lock_is_taken_over_and_released(tmp_path):
    models = tmp_path / "models"
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    write_lock(models, int(finished.stdout))
    run = TrainingRun(models)
    with pytest.warns(UserWarning, match="stale lock"):
        run.start()
    assert json.loads((models / "training.lock").read_text())["pid"] == os.getpid()
    run.finish()
    assert not (models / "training.lock").exists()


def test_fresh_training_moves_the_previous_one_aside_and_resume_keeps_identity(tmp_path):
    models = tmp_path / "models"
    first = TrainingRun(models)
    first.start()
    torch.save({}, models / "checkpoint_epoch=3.pt")
    torch.save({}, models / "model.pt")
    first.finish()
    second = TrainingRun(models, resume="false")
    with pytest.warns(UserWarning, match="moved the previous training"):
        second.start()
    second.finish()
    archived = models / "previous_runs" / first.run_id
    assert sorted(p.name for p in archived.iterdir()) == ["checkpoint_epoch=3.pt", "model.pt", "training_run.json"]
    assert not list(models.glob("*.pt"))
    torch.save({}, models / "checkpoint_epoch=1.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = TrainingRun(models, resume="True")
        assert resumed.run_id == second.run_id and resumed.run_name == second.run_id
        assert resumed.checkpoint == str(models / "checkpoint_epoch=1.pt")
    with pytest.raises(ValueError, match="resume must be true or false, got 'maybe'"):
        TrainingRun(models, resume="maybe")


def test_mlflow_handlers_get_the_params_and_a_finished_run_is_reopened_on_resume(tmp_path):
    from mlflow.tracking import MlflowClient
    from monai.handlers import MLFlowHandler, StatsHandler
    from monai.utils import path_to_sqlite_uri

    uri = path_to_sqlite_uri(str(tmp_path / "mlruns.db"))
    handler = MLFlowHandler(tracking_uri=uri, experiment_name="exp", run_name="run_a")
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("exp"), run_name="run_a")
    client.set_terminated(run.info.run_id, status="FINISHED")
    found = prepare_mlflow_handlers([StatsHandler(), handler], {"adv_method": "fgsm", "adv_epsilon": 0.1})
    assert found == [handler] and handler.experiment_param == {"adv_method": "fgsm", "adv_epsilon": "0.1"}
    assert client.get_run(run.info.run_id).info.status == "FINISHED", "a fresh training must not reopen runs"
    prepare_mlflow_handlers([handler], resume=True)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"


def _closed_mlflow_run(tmp_path):
    """A guarded MLFlowHandler (as the bundle prepares it) whose run a one-epoch engine started and closed."""
    from monai.handlers import MLFlowHandler
    from monai.utils import path_to_sqlite_uri

    uri = path_to_sqlite_uri(str(tmp_path / "mlruns.db"))
    handler = MLFlowHandler(tracking_uri=uri, experiment_name="exp", run_name="run_a", iteration_log=False,
                            close_on_complete=True)  # fmt: skip
    prepare_mlflow_handlers([handler])
    engine = Engine(lambda engine, batch: None)
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    assert handler.cur_run is None  # closed as the bundle's trainer handler is, before finalize
    return handler, uri


def _tiny_unet(features=(4, 4, 4, 4, 4, 4)):
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=features).eval()


def test_the_best_model_goes_into_the_closed_run_and_loads_back(tmp_path, monkeypatch):
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient
    from monai.handlers import StatsHandler

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    handler, uri = _closed_mlflow_run(tmp_path)
    best, last = _tiny_unet(), _tiny_unet()
    torch.save(best.state_dict(), tmp_path / "model.pt")
    with torch.no_grad():  # the network at the end of training differs from the best one
        for parameter in last.parameters():
            parameter.add_(1.0)
    metadata = {"name": "bundle", "version": "0.2.0", "changelog": {"0.2.0": "long"}, "network_data_format": {}}
    settings = {"_desc_": "comment", "features": [4, 4, 4, 4, 4, 4]}
    model_uri = log_best_model([StatsHandler(), handler], last, tmp_path / "model.pt", (1, 1, 32, 32), metadata,
                               settings)  # fmt: skip
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("exp").experiment_id])[0]
    assert model_uri == f"runs:/{run.info.run_id}/model" and run.info.status == "FINISHED"
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the fluent API's URI is given back
    mlflow.set_tracking_uri(uri)
    try:
        info = mlflow.models.get_model_info(model_uri)
        loaded = mlflow.pytorch.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    assert [spec.shape for spec in info.signature.inputs.inputs] == [(-1, 1, 32, 32)]
    assert [spec.shape for spec in info.signature.outputs.inputs] == [(-1, 2, 32, 32)]
    assert info.metadata == {"name": "bundle", "version": "0.2.0", "network_data_format": {},
                             "settings": {"features": [4, 4, 4, 4, 4, 4]}, "source": "model.pt"}  # fmt: skip
    images = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), best(images), rtol=0, atol=0)


def test_no_best_model_no_mlflow_or_a_failure_logs_no_model(tmp_path, caplog):
    from mlflow.tracking import MlflowClient
    from monai.handlers import StatsHandler

    handler, uri = _closed_mlflow_run(tmp_path)
    network = _tiny_unet()
    assert log_best_model([handler], network, tmp_path / "model.pt", (1, 1, 32, 32)) is None  # no best model saved
    torch.save(_tiny_unet((8, 8, 8, 8, 8, 8)).state_dict(), tmp_path / "model.pt")
    assert log_best_model([StatsHandler()], network, tmp_path / "model.pt", (1, 1, 32, 32)) is None  # no MLflow
    with caplog.at_level("WARNING", logger="monai_adv.bundle.tracking"):
        assert log_best_model([handler], network, tmp_path / "model.pt", (1, 1, 32, 32)) is None  # does not fit
    assert f"MLflow: the best model {tmp_path}/model.pt was not logged to {uri} (RuntimeError: Error(s) in loading " \
           "state_dict" in caplog.text  # fmt: skip
    assert handler.client.failed_calls == {"log_model": 1}
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("exp")
    assert not client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert client.search_runs([experiment.experiment_id])[0].info.status == "FINISHED"


def test_a_checkpoint_that_cannot_be_written_is_named(tmp_path):
    from monai_adv.bundle import KeepPreviousDiskSaver
    from monai_adv.errors import StorageError

    target = tmp_path / "model.pt"
    target.mkdir()  # a folder in the way: the rename into place fails, as on a full or read-only disk
    saver = KeepPreviousDiskSaver(tmp_path, filename="model.pt")
    with pytest.raises(StorageError, match=f"cannot write checkpoint {target}: .*Free disk space or make"):
        saver({"model": {"w": torch.zeros(2)}}, "ignored.pt")


def test_random_states_restore_every_draw_of_the_transforms_and_refuse_other_transforms(tmp_path):
    import io

    from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd, RandGaussianNoised

    from monai_adv.bundle import RandomStates

    def transforms():
        crop = RandCropByPosNegLabeld(["image", "label"], "label", spatial_size=(4, 4), num_samples=1)
        return Compose([RandFlipd(["image"], prob=0.5), RandGaussianNoised(["image"], prob=1.0), crop])

    def draw(compose):
        sample = {"image": torch.arange(64.0).reshape(1, 8, 8), "label": (torch.arange(64) % 3 == 0).reshape(1, 8, 8)}
        out = compose(sample)[0]
        return out["image"], float(torch.rand(())), float(np.random.rand()), random.random()

    live = transforms().set_random_state(seed=3)
    draw(live)
    buffer = io.BytesIO()
    torch.save(RandomStates(live).state_dict(), buffer)  # as the checkpoint saver writes it
    expected = [draw(live) for _ in range(3)]
    other = transforms().set_random_state(seed=99)  # a new process's transforms, seeded anew
    torch.manual_seed(5)
    buffer.seek(0)
    RandomStates(other).load_state_dict(torch.load(buffer, weights_only=True))
    for (image, *numbers), (image_again, *numbers_again) in zip(expected, [draw(other) for _ in range(3)]):
        assert torch.equal(image, image_again) and numbers == numbers_again

    buffer.seek(0)
    fewer = Compose([RandFlipd(["image"], prob=0.5)])
    with pytest.raises(
        ValueError, match=r"holds 6 random states of training transforms, the training transforms now have 2"
    ):
        RandomStates(fewer).load_state_dict(torch.load(buffer, weights_only=True))
