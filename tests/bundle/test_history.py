"""TrainingHistory: what a training cost (time, optimiser steps, images trained on) and measured, per epoch."""

from __future__ import annotations

import json

import pytest
import torch
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import MeanDice, ValidationHandler, from_engine
from monai.transforms import AsDiscreted, Compose

from monai_adv.bundle import TrainingHistory
from monai_adv.handlers import AdversarialAugmentationHandler
from monai_adv.transforms import FGSMd, InvFGSMd

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, make_basic_unet, make_dicece, make_square_data, handler, max_epochs=2, history=None):
    images, labels = make_square_data(batch=8, size=32, seed=1)
    items = [{"image": images[i], "label": labels[i]} for i in range(8)]
    network = make_basic_unet()
    post = Compose([AsDiscreted(keys="pred", argmax=True, to_onehot=2), AsDiscreted(keys="label", to_onehot=2)])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(items[:4], batch_size=4), network=network,
        postprocessing=post,
        key_val_metric={"val_mean_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
    )  # fmt: skip
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=DataLoader(items, batch_size=4),
        network=network, optimizer=torch.optim.SGD(network.parameters(), lr=0.01), loss_function=make_dicece(),
        train_handlers=[h for h in (handler, ValidationHandler(validator=evaluator, interval=1, epoch_level=True)) if h],
        iteration_update=handler.iteration_update if handler is not None else None,
    )  # fmt: skip
    history = history or TrainingHistory(tmp_path / "history.json", evaluator, handler.step if handler else None)
    history.attach(trainer)
    trainer.run()
    return history, json.loads((tmp_path / "history.json").read_text())


@pytest.mark.parametrize(("methods", "mode", "per_epoch"), [((), None, 8), ((FGSMd,), "append", 16),
                                                            ((FGSMd, InvFGSMd), "append", 24), ((FGSMd,), "replace", 8)])  # fmt: skip
def test_counts_steps_and_the_images_each_step_trained_on(
    tmp_path, make_basic_unet, make_dicece, make_square_data, methods, mode, per_epoch
):
    handler = None
    if methods:
        transforms = [cls(keys="image", epsilon=0.05, batched=True) for cls in methods]
        handler = AdversarialAugmentationHandler(
            transforms, mode=mode, replace_fraction=1.0 if mode == "replace" else None
        )
    _, written = _run(tmp_path, make_basic_unet, make_dicece, make_square_data, handler)
    assert [e["epoch"] for e in written["epochs"]] == [1, 2]
    for entry in written["epochs"]:
        assert entry["iterations"] == 2 and entry["images"] == per_epoch
        assert 0.0 <= entry["val_mean_dice"] <= 1.0  # the validator's metric, at the trainer's epoch
        assert entry["seconds"] > 0 and entry["cpu_seconds"] > 0
    assert written["total"] == {
        "seconds": pytest.approx(sum(e["seconds"] for e in written["epochs"])),
        "cpu_seconds": pytest.approx(sum(e["cpu_seconds"] for e in written["epochs"])),
        "iterations": 4,
        "images": 2 * per_epoch,
    }


def test_state_dict_continues_the_counters_and_drops_later_entries(tmp_path, make_basic_unet, make_dicece,
                                                                   make_square_data):  # fmt: skip
    history, _ = _run(tmp_path, make_basic_unet, make_dicece, make_square_data, None, max_epochs=2)
    state = history.state_dict()
    resumed = TrainingHistory(tmp_path / "history.json", history.validator)
    resumed.load_state_dict(state)
    assert resumed.totals == history.totals and resumed.epochs == history.epochs
    # an interrupted training's later entry is dropped when a resumed trainer starts at epoch 1
    resumed.epochs.append({"epoch": 3, "seconds": 1.0, "iterations": 2, "images": 8})

    class _Started:
        class state:
            epoch = 2

    resumed._started(_Started)
    assert [e["epoch"] for e in resumed.epochs] == [1, 2]
