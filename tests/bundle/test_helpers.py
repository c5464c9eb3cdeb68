"""monai_adv.bundle in-process: atomic checkpoint writing, readable-checkpoint lookup, the training lock, MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from monai_adv.bundle import (
    AtomicCheckpointSaver,
    KeepPreviousDiskSaver,
    TrainingRun,
    latest_checkpoint,
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


def test_a_checkpoint_that_cannot_be_written_is_named(tmp_path):
    from monai_adv.bundle import KeepPreviousDiskSaver
    from monai_adv.errors import StorageError

    target = tmp_path / "model.pt"
    target.mkdir()  # a folder in the way: the rename into place fails, as on a full or read-only disk
    saver = KeepPreviousDiskSaver(tmp_path, filename="model.pt")
    with pytest.raises(StorageError, match=f"cannot write checkpoint {target}: .*Free disk space or make"):
        saver({"model": {"w": torch.zeros(2)}}, "ignored.pt")
