"""Training state across crashes, concurrent starts and resumes, driven through the bundle CLI in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from monai_adv.bundle import latest_checkpoint

# Blocks the trainer's second checkpoint write inside torch.save, so that the test can kill -9 the process there.
SLOW_STATE = """
import time


class _BlocksWhileWritten:
    def __reduce__(self):
        print("CHECKPOINT-WRITE-STARTED", flush=True)
        time.sleep(300)
        return (int, (0,))


class SlowOnSecondSave:
    def __init__(self):
        self.saves = 0

    def state_dict(self):
        self.saves += 1
        return {"blocker": _BlocksWhileWritten() if self.saves >= 2 else 0}

    def load_state_dict(self, state):
        pass
"""
SLOW_OVERLAY = {
    "slow_state": {"_target_": "slow_state.SlowOnSecondSave"},
    "train#checkpoint_saver#save_dict#slow": "@slow_state",
}


def start_training(bundle, root: Path, settings: dict, log: Path, config_file: str, env: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config_file,
               "--bundle_root", str(root), "--tracking", "mlflow", *bundle.overrides({**bundle.tiny, **settings})]  # fmt: skip
    with open(log, "w") as out:
        return subprocess.Popen(
            command, cwd=bundle.repo_root, env=bundle.env(env), stdout=out, stderr=subprocess.STDOUT
        )


def wait_for(log: Path, text: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if process.poll() is not None:
            pytest.fail(f"training exited with {process.returncode} before {text!r}:\n{log.read_text()[-6000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {text!r} after {timeout} s:\n{log.read_text()[-6000:]}")
        time.sleep(0.2)


def mlflow_runs(bundle, root: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(bundle.sqlite_uri(root))
    experiment = client.get_experiment_by_name(bundle.experiment)
    return client, {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


@pytest.mark.slow
def test_kill_during_checkpoint_write_concurrent_start_and_fresh_run_after_the_crash(bundle, tmp_path):
    root = tmp_path / "bundle"
    root.mkdir()
    (tmp_path / "slow_state.py").write_text(SLOW_STATE)
    overlay = tmp_path / "slow.json"
    overlay.write_text(json.dumps(SLOW_OVERLAY))
    configs = f"['{bundle.train_json}','{overlay}']"
    log = tmp_path / "first.log"
    first = start_training(bundle, root, {"max_epochs": 3}, log, configs, {"PYTHONPATH": str(tmp_path)})
    try:
        wait_for(log, "CHECKPOINT-WRITE-STARTED", first)  # epoch 2's checkpoint is being written
        models = root / "models"
        lock = json.loads((models / "training.lock").read_text())
        assert lock["pid"] == first.pid
        assert first.poll() is None, "the first training should still be blocked in its checkpoint write"

        second = bundle.train(root, {"max_epochs": 1}, tracking="mlflow", expect_success=False)
        assert second.returncode != 0
        assert f"another training is running in {models}" in second.output, second.describe()
        assert f"pid {first.pid}" in second.output
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=60)

    # the previous checkpoint is complete; the interrupted write left no checkpoint_epoch=2.pt, partial or not
    checkpoints = sorted(p.name for p in models.glob("checkpoint_epoch=*.pt"))
    assert checkpoints == ["checkpoint_epoch=1.pt"], sorted(p.name for p in models.iterdir())
    assert latest_checkpoint(models) == str(models / "checkpoint_epoch=1.pt")
    assert (
        torch.load(models / "checkpoint_epoch=1.pt", weights_only=True)["trainer"]["iteration"] == 2
    )  # one epoch of 2 batches
    crashed_id = json.loads((models / "training_run.json").read_text())["run_id"]
    client, runs = mlflow_runs(bundle, root)
    assert list(runs) == [crashed_id], "the refused training must not have opened an MLflow run"

    # a fresh training after the crash: takes over the dead process's lock, gets its own MLflow run
    fresh = bundle.train(root, {"max_epochs": 1}, tracking="mlflow")
    assert "taking over the stale lock" in fresh.output, fresh.describe()
    assert not (models / "training.lock").exists()
    fresh_id = json.loads((models / "training_run.json").read_text())["run_id"]
    client, runs = mlflow_runs(bundle, root)
    assert set(runs) == {crashed_id, fresh_id} and fresh_id != crashed_id
    assert runs[fresh_id].info.status == "FINISHED" and runs[crashed_id].info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(runs[fresh_id].info.run_id, "val_mean_iou")] == [1]
    assert sorted(p.name for p in (models / "previous_runs" / crashed_id).iterdir()) == [
        "checkpoint_epoch=1.pt", "model.pt", "training_history.json", "training_run.json"]  # fmt: skip


@pytest.mark.slow
def test_resume_continues_the_latest_training_and_keeps_its_best_model(bundle, trained_bundle, tmp_path):
    # training A: the shared 2-epoch bundle (with its MLflow store); training B: 1 epoch, fresh, in the same root
    root = bundle.copy_outputs(trained_bundle.root, tmp_path / "bundle", parts=("models", "data", "eval"))
    run_a = json.loads((root / "models" / "training_run.json").read_text())["run_id"]
    bundle.train(root, {"max_epochs": 1}, tracking="mlflow")
    models = root / "models"
    run_b = json.loads((models / "training_run.json").read_text())["run_id"]
    assert run_b != run_a
    assert (models / "previous_runs" / run_a / "checkpoint_epoch=2.pt").is_file()

    # B's best score so far, as recorded with its checkpoint, made unbeatable: no later validation may replace it
    checkpoint = torch.load(models / "checkpoint_epoch=1.pt", weights_only=True)
    assert checkpoint["training_run"]["run_id"] == run_b
    [(best_b, _)] = checkpoint["best_model_saver"]["_saved"]
    checkpoint["best_model_saver"]["_saved"] = [(0.999, name) for _, name in checkpoint["best_model_saver"]["_saved"]]
    torch.save(checkpoint, models / "checkpoint_epoch=1.pt")
    best_model = (models / "model.pt").read_bytes()

    resumed = bundle.train(root, {"max_epochs": 2, "resume": "true"}, tracking="mlflow")
    restored = [line for line in resumed.output.splitlines() if "Restored" in line]
    assert restored and str(models / "checkpoint_epoch=1.pt") in restored[0], resumed.describe()
    assert "Epoch[2] Metrics" in resumed.output and "Epoch: 1/2" not in resumed.output
    assert (models / "model.pt").read_bytes() == best_model, "the first validation after resume replaced model.pt"
    assert "Got new best metric of val_mean_iou" not in resumed.output, "the validator forgot the best score"
    saved = torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)
    assert saved["best_model_saver"]["_saved"][0][0] == pytest.approx(0.999)
    assert json.loads((models / "training_run.json").read_text())["run_id"] == run_b

    assert (models / "previous_runs" / run_a / "training_history.json").is_file()
    history = json.loads((models / "training_history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]  # epoch 1 from before the resume, continued
    assert all("val_mean_iou" in e and e["iterations"] == 2 for e in history["epochs"])
    assert history["total"]["iterations"] == 4
    assert history["total"]["images"] == sum(e["images"] for e in history["epochs"])

    client, runs = mlflow_runs(bundle, root)
    assert set(runs) == {run_a, run_b}, "resume must continue B's MLflow run, not open another"
    b_iou = [m.step for m in client.get_metric_history(runs[run_b].info.run_id, "val_mean_iou")]
    assert sorted(b_iou) == [1, 2] and runs[run_b].info.status == "FINISHED"
    a_iou = [m.step for m in client.get_metric_history(runs[run_a].info.run_id, "val_mean_iou")]
    assert sorted(a_iou) == [1, 2]
    assert 0.0 <= best_b <= 1.0


@pytest.mark.slow
def test_resume_with_a_changed_setting_is_refused_at_start_naming_the_keys(bundle, trained_bundle, tmp_path):
    root = bundle.copy_outputs(trained_bundle.root, tmp_path / "bundle")
    before = sorted(p.name for p in (root / "models").iterdir())
    recorded = json.loads((root / "models" / "training_run.json").read_text())["settings"]
    assert recorded["adv#epsilon"] == 0.1 and recorded["adv#method"] == "fgsm" and "max_epochs" not in recorded
    assert "_desc_" not in recorded  # the config's comment is not a setting
    run = bundle.train(root, {"adv#method": "fgsm", "adv#epsilon": 0.05, "learning_rate": 0.01, "resume": "true",
                              "max_epochs": 3}, tracking="mlflow", expect_success=False)  # fmt: skip
    last = run.output.strip().splitlines()[-1]
    assert last.startswith("monai-adv: error: --resume true would continue training run_"), run.describe()
    assert "--adv#epsilon 0.1 -> 0.05, --learning_rate 0.001 -> 0.01." in last
    assert "by leaving out --resume true" in last and "Changing param values" not in run.output
    assert sorted(p.name for p in (root / "models").iterdir()) == before  # nothing touched, no lock left
    # more epochs are a legitimate change
    more = bundle.train(root, {"adv#method": "fgsm", "adv#track_loss": "true", "resume": "true", "max_epochs": 3},
                        tracking="mlflow")  # fmt: skip
    assert "Epoch[3] Metrics" in more.output, more.describe()


@pytest.mark.slow
def test_sigterm_stops_training_cleanly(bundle, tmp_path):
    root = tmp_path / "bundle"
    log = tmp_path / "train.log"
    process = start_training(bundle, root, {"max_epochs": 500, "adv#method": "fgsm"}, log, str(bundle.train_json), {})
    try:
        wait_for(log, "Saved checkpoint at epoch: 2", process)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()
    assert returncode == 1, output[-6000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("monai-adv: error: training run_") and "stopped by SIGTERM" in last, output[-4000:]
    assert "is the last complete checkpoint" in last and "--resume true" in last
    models = root / "models"
    assert not (models / "training.lock").exists(), "the lock was left behind"
    checkpoint = latest_checkpoint(models)
    assert Path(checkpoint).name in last
    _, runs = mlflow_runs(bundle, root)
    (run,) = runs.values()
    assert run.info.status == "KILLED"
    # and it resumes from there
    epoch = int(Path(checkpoint).stem.split("=")[1])
    resumed = bundle.train(root, {"max_epochs": epoch + 1, "adv#method": "fgsm", "resume": "true"}, tracking="mlflow")
    assert f"Epoch[{epoch + 1}] Metrics" in resumed.output, resumed.describe()


def test_a_run_the_signal_handler_cannot_close_is_closed_as_killed_at_exit(tmp_path, monkeypatch):
    """SIGTERM in the middle of a write to the SQLite store: the handler's own write fails (the store is locked by
    the call it interrupted), and the run is closed as KILLED at exit instead of staying RUNNING."""
    from mlflow.tracking import MlflowClient

    from monai_adv.bundle import training_run

    monkeypatch.setattr(training_run, "_KILLED_AT_EXIT", [])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("interrupted")
    runs = [client.create_run(experiment).info.run_id for _ in range(2)]

    class LockedOnce:  # the store while the interrupted write holds it
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def set_terminated(self, *args):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("(sqlite3.OperationalError) database is locked")
            return self.inner.set_terminated(*args)

    assert training_run.close_as_killed(client, runs[0])  # the usual case: closed at once
    assert client.get_run(runs[0]).info.status == "KILLED"
    assert not training_run.close_as_killed(LockedOnce(client), runs[1])
    assert client.get_run(runs[1]).info.status == "RUNNING"
    training_run.close_killed_runs()  # what atexit runs
    assert client.get_run(runs[1]).info.status == "KILLED" and not training_run._KILLED_AT_EXIT


def test_a_resumed_training_draws_what_an_uninterrupted_one_would(bundle, tmp_path):
    """The checkpoint keeps the random states (shuffle, transforms, the step's choices and noise): a training stopped
    after epoch 1 and resumed ends with the same weights as one that ran its 2 epochs at once (both start from the
    initial weights that --seed gives: the network is built after set_determinism)."""
    # N-FGSM draws noise and which samples to replace; --augment standard draws flips, turns, affine and noise
    settings = {"adv#recipe": "nfgsm", "augment": "standard", "max_epochs": 2}
    bundle.train(tmp_path / "whole", settings)
    resumed = tmp_path / "resumed"
    bundle.train(resumed, {**settings, "max_epochs": 1})
    first = resumed / "models" / "checkpoint_epoch=1.pt"
    saved = torch.load(first, weights_only=True)
    assert saved["random_states"]["transforms"] and saved["adv_step"]["random"]["generator"] is not None
    older = tmp_path / "older"  # the same checkpoint as an earlier version wrote it: without the random states
    bundle.copy_outputs(resumed, older, parts=("models", "data"))
    del saved["random_states"], saved["adv_step"]["random"]
    torch.save(saved, older / "models" / "checkpoint_epoch=1.pt")

    bundle.train(resumed, {**settings, "resume": "true"})
    whole = torch.load(tmp_path / "whole" / "models" / "checkpoint_epoch=2.pt", weights_only=True)["model"]
    continued = torch.load(resumed / "models" / "checkpoint_epoch=2.pt", weights_only=True)["model"]
    assert whole.keys() == continued.keys()
    assert all(torch.equal(whole[k], continued[k]) for k in whole), "the resumed training drew other random numbers"

    # an earlier version's checkpoint still resumes, saying what it cannot restore; its epoch 2 replays epoch 1's draws
    run = bundle.train(older, {**settings, "resume": "true"})
    assert "has no ['random_states'] (written by an earlier version)" in run.output
    reseeded = torch.load(older / "models" / "checkpoint_epoch=2.pt", weights_only=True)["model"]
    assert not all(torch.equal(whole[k], reseeded[k]) for k in whole)
