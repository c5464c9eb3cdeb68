"""A NaN loss stops a MONAI trainer, and a NaN model is never saved as the best one (public API, in process)."""

from __future__ import annotations

import warnings

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss

from monai_adv.attacks import NonFiniteLossError
from monai_adv.bundle import AtomicCheckpointSaver, StopOnNonFiniteLoss


def make_trainer(network, handlers, data, max_epochs=2):
    return SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=data, network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1), loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        train_handlers=handlers,
    )  # fmt: skip


def batches(make_square_data, count=3):
    out = []
    for seed in range(count):
        images, labels = make_square_data(batch=2, size=16, seed=seed)
        out.append({"image": images, "label": labels})
    return out


def test_a_nan_loss_fails_the_trainer_naming_epoch_and_iteration(make_tiny_net, make_square_data, tmp_path):
    network = make_tiny_net(in_channels=1, out_channels=2)
    data = batches(make_square_data)
    with torch.no_grad():
        next(network.parameters())[0, 0, 0, 0] = float("nan")
    saver = AtomicCheckpointSaver(tmp_path, {"model": network}, save_interval=1)
    trainer = make_trainer(network, [StopOnNonFiniteLoss()], data)
    saver.attach(trainer)
    with pytest.raises(NonFiniteLossError, match="training loss is nan at epoch 1, iteration 1"):
        trainer.run()
    assert list(tmp_path.iterdir()) == []  # no checkpoint of the NaN weights


def test_finite_training_passes_the_guard(make_tiny_net, make_square_data):
    network = make_tiny_net(in_channels=1, out_channels=2)
    trainer = make_trainer(network, [StopOnNonFiniteLoss()], batches(make_square_data), max_epochs=1)
    trainer.run()
    assert trainer.state.iteration == 3


def test_the_best_model_is_never_saved_with_nan_weights_or_a_nan_score(make_tiny_net, tmp_path):
    network = make_tiny_net()
    saver = AtomicCheckpointSaver(tmp_path, {"model": network}, save_key_metric=True, key_metric_name="iou",
                                  key_metric_filename="model.pt")  # fmt: skip
    scores = iter([0.5, float("nan"), 0.9, 0.95])
    engine = Engine(lambda engine, batch: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def score(engine):
        engine.state.metrics["iou"] = next(scores)
        if engine.state.epoch == 3:
            with torch.no_grad():
                next(network.parameters()).fill_(float("inf"))

    saver.attach(engine)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        engine.run([0], max_epochs=4)
    messages = [str(w.message) for w in record if "not saving the best model" in str(w.message)]
    assert [m.split(":")[0] for m in messages] == [f"not saving the best model at epoch {e}" for e in (2, 3, 4)]
    assert "its key metric is nan" in messages[0]
    assert "1 of its tensors are not finite (e.g. model.0.weight)" in messages[1], messages
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert saver.best_epoch == 1  # epochs 3 and 4 had infinite weights
