"""AdversarialAugmentationHandler inside a real monai SupervisedTrainer (CPU, tiny BasicUNet, 32x32)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from monai_adv.handlers import AdversarialAugmentationHandler
from monai_adv.transforms import FGSMd, InvFGSMd

SIZE = 32
EPS = 0.1


# tiny convolutions run much faster (and steadier on a busy 2-core machine) on one thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def items(make_square_data):
    images, labels = make_square_data(batch=8, size=SIZE, seed=3)
    return [{"image": images[i], "label": labels[i], "id": f"case_{i}"} for i in range(8)]


@pytest.fixture
def make_trainer(make_basic_unet, make_dicece):
    """A CPU SupervisedTrainer over ``items`` (not shuffled); SGD with ``lr=0`` by default keeps the weights fixed."""

    def _make_trainer(
        items, network=None, batch_size=4, max_epochs=1, lr=0.0, accumulation_steps=1, optimizer=None,
        iteration_update=None,
    ):  # fmt: skip
        network = network if network is not None else make_basic_unet()
        return SupervisedTrainer(
            iteration_update=iteration_update,
            device=torch.device("cpu"),
            max_epochs=max_epochs,
            train_data_loader=DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=0),
            network=network,
            optimizer=optimizer or torch.optim.SGD(network.parameters(), lr=lr),
            loss_function=make_dicece(),
            accumulation_steps=accumulation_steps,
        )

    return _make_trainer


class BatchRecorder:
    """Records ``engine.state.batch`` at ITERATION_STARTED; attach before the handler to see the clean batch,
    after it to see the batch the trainer trains on."""

    def __init__(self):
        self.batches: list[dict] = []
        self.epochs: list[int] = []

    def attach(self, engine):
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine):
        self.batches.append(engine.state.batch)
        self.epochs.append(engine.state.epoch)


@pytest.fixture
def run_with_recorders(make_trainer):
    def _run_with_recorders(items, handler, **kwargs):
        """Trainer with recorders around ``handler``: (trainer, clean batches, augmented batches)."""
        before, after = BatchRecorder(), BatchRecorder()
        trainer = make_trainer(items, **kwargs)
        before.attach(trainer)
        handler.attach(trainer)
        after.attach(trainer)
        trainer.run()
        return trainer, before, after

    return _run_with_recorders


def changed_samples(clean: torch.Tensor, augmented: torch.Tensor) -> torch.Tensor:
    return (augmented - clean).abs().flatten(1).amax(dim=1) > 0


# ----------------------------------------------------------------------------------------------- batch rewriting


def test_append_doubles_the_batch_with_bounded_copies(items, run_with_recorders):
    handler = AdversarialAugmentationHandler(FGSMd(keys="image", epsilon=EPS, batched=True), mode="append", fused=False)
    trainer, before, after = run_with_recorders(items, handler)
    assert len(after.batches) == 2
    for clean, augmented in zip(before.batches, after.batches):
        assert augmented["image"].shape[0] == 2 * clean["image"].shape[0] == 8
        # the clean half comes first, unchanged; labels and ids are repeated for the copies
        torch.testing.assert_close(augmented["image"][:4], clean["image"], rtol=0, atol=0)
        torch.testing.assert_close(augmented["label"], torch.cat([clean["label"]] * 2), rtol=0, atol=0)
        assert augmented["id"] == list(clean["id"]) * 2
        diff = (augmented["image"][4:] - clean["image"]).abs()
        assert diff.max() <= EPS + 1e-6
        assert changed_samples(clean["image"], augmented["image"][4:]).all()
    # the trainer really trained on 8 samples per iteration (outputs are decollated per sample)
    assert len(trainer.state.output) == 8


def test_fgsm_and_invfgsm_triple_the_batch(items, run_with_recorders):
    handler = AdversarialAugmentationHandler(
        [FGSMd(keys="image", epsilon=EPS, batched=True), InvFGSMd(keys="image", epsilon=EPS, batched=True)],
        fused=False,
    )
    trainer, before, after = run_with_recorders(items, handler)
    for clean, augmented in zip(before.batches, after.batches):
        assert augmented["image"].shape[0] == 3 * clean["image"].shape[0]
        assert augmented["label"].shape[0] == 3 * clean["label"].shape[0]
        up, down = augmented["image"][4:8], augmented["image"][8:]
        # FGSM and InvFGSM move every pixel that is not clamped in opposite directions
        free = (clean["image"] > EPS) & (clean["image"] < 1 - EPS)
        assert ((up - clean["image"])[free] * (down - clean["image"])[free] < 0).all()
    assert len(trainer.state.output) == 12
    assert trainer.state.metrics["adv_samples"] == 8.0


@pytest.mark.parametrize("fraction,expected", [(0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)])
def test_replace_keeps_size_and_changes_exactly_a_fraction(items, fraction, expected, run_with_recorders):
    handler = AdversarialAugmentationHandler(
        FGSMd(keys="image", epsilon=EPS, batched=True), mode="replace", replace_fraction=fraction
    )
    handler.set_random_state(seed=1)
    _, before, after = run_with_recorders(items, handler)
    for clean, augmented in zip(before.batches, after.batches):
        assert augmented["image"].shape == clean["image"].shape
        changed = changed_samples(clean["image"], augmented["image"])
        assert int(changed.sum()) == expected == round(fraction * 4)
        assert (augmented["image"] - clean["image"]).abs().max() <= EPS + 1e-6
        torch.testing.assert_close(augmented["label"], clean["label"], rtol=0, atol=0)
        assert list(augmented["id"]) == list(clean["id"])
    # the loader's own tensors were not written into
    for i, item in enumerate(items[:4]):
        torch.testing.assert_close(before.batches[0]["image"][i], item["image"], rtol=0, atol=0)


def test_replace_with_both_transforms_splits_the_chosen_samples(items, run_with_recorders):
    handler = AdversarialAugmentationHandler(
        [FGSMd(keys="image", epsilon=EPS, batched=True, return_loss_after=True),
         InvFGSMd(keys="image", epsilon=EPS, batched=True, return_loss_after=True)],
        mode="replace", replace_fraction=1.0,
    )  # fmt: skip
    trainer, before, after = run_with_recorders(items, handler)
    for clean, augmented in zip(before.batches, after.batches):
        assert augmented["image"].shape == clean["image"].shape
        assert changed_samples(clean["image"], augmented["image"]).all()
    assert trainer.state.metrics["adv_samples"] == 4.0
    assert {"adv_loss_fgsm", "adv_loss_invfgsm"} <= set(trainer.state.metrics)


def test_disabled_handler_leaves_the_batch_untouched(items, run_with_recorders):
    handler = AdversarialAugmentationHandler(FGSMd(keys="image", epsilon=EPS, batched=True), enabled=False)
    trainer, before, after = run_with_recorders(items, handler)
    for clean, augmented in zip(before.batches, after.batches):
        assert augmented is clean
        assert augmented["image"] is clean["image"]
    assert len(trainer.state.output) == 4
    assert "adv_samples" not in trainer.state.metrics


def test_handler_can_be_switched_on_between_epochs(items, make_trainer):
    handler = AdversarialAugmentationHandler(FGSMd(keys="image", epsilon=EPS, batched=True), enabled=False, fused=False)
    trainer = make_trainer(items, max_epochs=2)
    after = BatchRecorder()
    handler.attach(trainer)
    after.attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: setattr(handler, "enabled", True))
    trainer.run()
    assert [b["image"].shape[0] for b in after.batches] == [4, 4, 8, 8]


def test_start_epoch_leaves_earlier_epochs_clean(items, run_with_recorders):
    handler = AdversarialAugmentationHandler(FGSMd(keys="image", epsilon=EPS, batched=True), start_epoch=2, fused=False)
    _, before, after = run_with_recorders(items, handler, max_epochs=2)
    assert after.epochs == [1, 1, 2, 2]
    for epoch, clean, augmented in zip(after.epochs, before.batches, after.batches):
        if epoch == 1:
            assert augmented is clean
        else:
            assert augmented["image"].shape[0] == 8


# ------------------------------------------------------------------------------------------------------ gradients


class GradRecorder:
    """Copies every parameter's .grad at BACKWARD_COMPLETED (before the optimizer step)."""

    def __init__(self):
        self.grads: list[list[torch.Tensor]] = []

    def attach(self, engine):
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine):
        self.grads.append([p.grad.detach().clone() for p in engine.network.parameters()])


@pytest.fixture
def reference_grads(make_dicece):
    def _reference_grads(network, batch) -> list[torch.Tensor]:
        network = copy.deepcopy(network).train()
        network.zero_grad(set_to_none=True)
        make_dicece()(network(batch["image"]), batch["label"]).mean().backward()
        return [p.grad.detach().clone() for p in network.parameters()]

    return _reference_grads


def assert_grads_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["append", "replace"])
def test_parameter_gradients_are_those_of_the_augmented_batch(
    items, mode, make_basic_unet, make_trainer, reference_grads
):
    network = make_basic_unet(seed=5)
    start = copy.deepcopy(network)
    handler = AdversarialAugmentationHandler(
        [FGSMd(keys="image", epsilon=EPS, batched=True), InvFGSMd(keys="image", epsilon=EPS, batched=True)],
        mode=mode,
        fused=False,
    )
    grads, after = GradRecorder(), BatchRecorder()
    trainer = make_trainer(items, network=network, lr=0.0)  # lr 0: the weights stay those of `start`
    handler.attach(trainer)
    after.attach(trainer)
    grads.attach(trainer)
    trainer.run()
    assert len(grads.grads) == len(after.batches) == 2
    for batch, actual in zip(after.batches, grads.grads):
        assert_grads_close(actual, reference_grads(start, batch))
    # the attack took no gradient of its own into the parameters: without it the grads would differ
    clean_only = {"image": after.batches[0]["image"][:4], "label": after.batches[0]["label"][:4]}
    if mode == "append":
        difference = max(float((a - c).abs().max()) for a, c in zip(grads.grads[0], reference_grads(start, clean_only)))
        assert difference > 1e-6


def test_gradient_accumulation_sums_only_the_training_gradients(items, make_basic_unet, make_trainer, reference_grads):
    network = make_basic_unet(seed=6)
    start = copy.deepcopy(network)
    handler = AdversarialAugmentationHandler(FGSMd(keys="image", epsilon=EPS, batched=True), fused=False)
    grads, after = GradRecorder(), BatchRecorder()
    trainer = make_trainer(items, network=network, lr=0.0, accumulation_steps=2)
    handler.attach(trainer)
    after.attach(trainer)
    grads.attach(trainer)
    trainer.run()
    assert len(after.batches) == 2 and all(b["image"].shape[0] == 8 for b in after.batches)
    first, second = (reference_grads(start, b) for b in after.batches)
    # after the first half-step: g1 / 2; after the second (no zero_grad in between): (g1 + g2) / 2
    assert_grads_close(grads.grads[0], [g / 2 for g in first])
    assert_grads_close(grads.grads[1], [(g1 + g2) / 2 for g1, g2 in zip(first, second)])


# -------------------------------------------------------------------------------------------------------- metrics


def test_metrics_are_running_epoch_means(make_square_data, make_trainer):
    images, labels = make_square_data(batch=6, size=SIZE, seed=4)
    items = [{"image": images[i], "label": labels[i]} for i in range(6)]  # batches of 4 and 2
    handler = AdversarialAugmentationHandler(FGSMd(keys="image", epsilon=EPS, batched=True), fused=False)
    per_epoch = []
    trainer = make_trainer(items, max_epochs=2)
    handler.attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: per_epoch.append(dict(e.state.metrics)))
    trainer.run()
    for metrics in per_epoch:
        assert {"adv_epsilon", "adv_samples", "adv_loss_clean"} <= set(metrics)
        assert metrics["adv_samples"] == pytest.approx(3.0)  # mean of 4 and 2, reset each epoch
        assert metrics["adv_epsilon"] == pytest.approx(EPS)
        assert 0.0 < metrics["adv_loss_clean"] < 10.0
    assert "adv_loss_fgsm" not in per_epoch[0]  # only with return_loss_after=True


@pytest.fixture
def epoch_metrics_and_log(make_trainer):
    def _epoch_metrics_and_log(items, transform, max_epochs):
        """Run with ``transform``; per epoch: the metrics at its end and, per iteration, (samples added, stats)."""
        handler = AdversarialAugmentationHandler(transform, fused=False)
        handler.set_random_state(seed=2)
        before, after = BatchRecorder(), BatchRecorder()
        trainer = make_trainer(items, max_epochs=max_epochs)
        before.attach(trainer)
        handler.attach(trainer)
        after.attach(trainer)
        log: dict[int, list] = {}
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED,
            lambda e: log.setdefault(e.state.epoch, []).append(
                (
                    after.batches[-1]["image"].shape[0] - before.batches[-1]["image"].shape[0],
                    dict(handler.step.last_values),
                )
            ),
        )
        per_epoch: dict[int, dict] = {}
        trainer.add_event_handler(
            Events.EPOCH_COMPLETED, lambda e: per_epoch.__setitem__(e.state.epoch, dict(e.state.metrics))
        )
        trainer.run()
        return per_epoch, log

    return _epoch_metrics_and_log


def test_adv_samples_is_reset_each_epoch_with_random_skips(make_square_data, epoch_metrics_and_log):
    images, labels = make_square_data(batch=16, size=SIZE, seed=3)
    items = [{"image": images[i], "label": labels[i]} for i in range(16)]
    per_epoch, log = epoch_metrics_and_log(items, FGSMd(keys="image", epsilon=EPS, prob=0.5, batched=True), 3)
    expected = {epoch: sum(added for added, _ in entries) / len(entries) for epoch, entries in log.items()}
    assert len(set(expected.values())) > 1, "the seed should give epochs with different numbers of copies"
    assert {epoch: metrics["adv_samples"] for epoch, metrics in per_epoch.items()} == pytest.approx(expected)


def test_adv_epsilon_and_losses_average_only_the_iterations_that_made_copies(make_square_data, epoch_metrics_and_log):
    images, labels = make_square_data(batch=16, size=SIZE, seed=3)
    items = [{"image": images[i], "label": labels[i]} for i in range(16)]
    transform = FGSMd(keys="image", epsilon=EPS, prob=0.5, batched=True, return_loss_after=True)
    per_epoch, log = epoch_metrics_and_log(items, transform, 2)
    checked = 0
    for epoch, entries in log.items():
        applied = [stats for added, stats in entries if added]
        if not applied:
            continue
        checked += 1
        metrics = per_epoch[epoch]
        assert metrics["adv_epsilon"] == pytest.approx(EPS)
        clean = sum(float(s["adv_loss_clean"]) for s in applied) / len(applied)
        assert metrics["adv_loss_clean"] == pytest.approx(clean)
        assert metrics["adv_loss_fgsm"] == pytest.approx(sum(float(s["adv_loss_fgsm"]) for s in applied) / len(applied))
        assert metrics["adv_loss_fgsm"] > metrics["adv_loss_clean"]  # FGSM raises the loss
    assert checked, "the seed should let some epoch make copies"


def test_fgsm_raises_and_invfgsm_lowers_the_loss_of_a_trained_network(items, make_basic_unet, make_trainer):
    network = make_basic_unet(seed=7)
    make_trainer(items, network=network, max_epochs=15,
                 optimizer=torch.optim.Adam(network.parameters(), lr=0.01)).run()  # fmt: skip
    handler = AdversarialAugmentationHandler(
        [FGSMd(keys="image", epsilon=0.05, batched=True, return_loss_after=True),
         InvFGSMd(keys="image", epsilon=0.05, batched=True, return_loss_after=True)]
    )  # fmt: skip
    trainer = make_trainer(items, network=network, lr=0.0)
    handler.attach(trainer)
    trainer.run()
    metrics = trainer.state.metrics
    assert metrics["adv_epsilon"] == pytest.approx(0.05)
    assert metrics["adv_samples"] == 8.0
    assert metrics["adv_loss_fgsm"] > metrics["adv_loss_clean"] > metrics["adv_loss_invfgsm"], metrics


# --------------------------------------------------------------------------------------------- bad construction


def test_unbatched_transform_is_refused():
    with pytest.raises(ValueError, match="batched"):
        AdversarialAugmentationHandler(FGSMd(keys="image"))


@pytest.mark.parametrize(
    "kwargs,match",
    [({"mode": "swap"}, "mode"), ({"replace_fraction": 0}, "replace_fraction"),
     ({"replace_fraction": 1.5}, "replace_fraction"), ({"start_epoch": 0}, "start_epoch")],
)  # fmt: skip
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdversarialAugmentationHandler(FGSMd(keys="image", batched=True), **kwargs)


@pytest.mark.parametrize("transform", [object(), 0.1, "fgsm", torch.nn.Identity()])
def test_non_transforms_are_refused(transform):
    with pytest.raises(TypeError):
        AdversarialAugmentationHandler(transform)


def test_non_transform_in_a_list_is_named():
    with pytest.raises(TypeError, match="FGSMd.*got str"):
        AdversarialAugmentationHandler([FGSMd(keys="image", batched=True), "fgsm"])


def test_empty_transform_list_only_when_disabled():
    with pytest.raises(ValueError, match="empty"):
        AdversarialAugmentationHandler([])
    assert AdversarialAugmentationHandler([], enabled=False).params == {"adv_method": "none"}


def test_batch_without_label_key_is_reported(items, make_trainer):
    data = [{"image": item["image"], "seg": item["label"]} for item in items]
    trainer = make_trainer(data)
    AdversarialAugmentationHandler(FGSMd(keys="image", batched=True)).attach(trainer)
    with pytest.raises(KeyError, match="label"):
        trainer.run()


# --------------------------------------------------------------------------------------------------------- MLflow


def test_params_reach_the_mlflow_run_through_experiment_param(items, tmp_path: Path, monkeypatch, make_trainer):
    """The public route: MLFlowHandler(experiment_param=handler.params), as the bundle's tracking settings do."""
    from mlflow.tracking import MlflowClient
    from monai.handlers import MLFlowHandler
    from monai.utils import path_to_sqlite_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the handler would prefer it over tracking_uri
    uri = path_to_sqlite_uri(str(tmp_path / "m.db"))
    ours = AdversarialAugmentationHandler(FGSMd(keys="image", epsilon=0.05, batched=True), start_epoch=1)
    trainer = make_trainer(items, iteration_update=ours.iteration_update)
    ours.attach(trainer)  # attached to a trainer with its network: the params say what runs
    mlflow_handler = MLFlowHandler(
        tracking_uri=uri, experiment_name="handler_test", iteration_log=False, close_on_complete=True,
        experiment_param=ours.params,
    )  # fmt: skip
    mlflow_handler.attach(trainer)
    trainer.run()

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("handler_test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    params = runs[0].data.params
    assert params["adv_method"] == "fgsm"
    assert float(params["adv_epsilon"]) == pytest.approx(0.05)
    assert params["adv_mode"] == "append"
    assert params["adv_start_epoch"] == "1"
    assert params["adv_fused"] == "True" and params["adv_step"] == "fused"
    assert {"adv_samples", "adv_epsilon", "adv_loss_clean", "adv_loss_fgsm"} <= set(runs[0].data.metrics)


# ------------------------------------------------------------------------------------------------------------ DDP


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_wrapped_network_trains_two_epochs(items, tmp_path: Path, make_basic_unet, make_trainer):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        inner = make_basic_unet(seed=8)
        start = copy.deepcopy(inner)
        network = torch.nn.parallel.DistributedDataParallel(inner)
        handler = AdversarialAugmentationHandler(
            [FGSMd(keys="image", epsilon=EPS, batched=True), InvFGSMd(keys="image", epsilon=EPS, batched=True)],
            fused=False,
        )
        after = BatchRecorder()
        calls = {"wrapper": 0, "inner": 0}
        network.register_forward_pre_hook(lambda module, args: calls.__setitem__("wrapper", calls["wrapper"] + 1))
        inner.register_forward_pre_hook(lambda module, args: calls.__setitem__("inner", calls["inner"] + 1))
        trainer = make_trainer(items, network=network, max_epochs=2,
                               optimizer=torch.optim.Adam(network.parameters(), lr=1e-3))  # fmt: skip
        handler.attach(trainer)
        after.attach(trainer)
        trainer.run()
        assert trainer.state.epoch == 2 and trainer.state.iteration == 4
        assert [b["image"].shape[0] for b in after.batches] == [12] * 4
        assert trainer.state.metrics["adv_samples"] == 8.0
        # the training step goes through the DDP wrapper; the attack (one input-gradient pass per iteration, shared
        # by FGSM and InvFGSM) goes straight to the inner module, so DDP never arms a synchronisation for it
        assert calls == {"wrapper": 4, "inner": 4 + 4}
        moved = max(float((p - q).detach().abs().max()) for p, q in zip(inner.parameters(), start.parameters()))
        assert moved > 0, "the DDP-wrapped network did not train"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "transform,kwargs,step,reason",
    [
        ({}, {}, "fused", "own backward pass"),
        ({"num_steps": 3}, {}, "separate", "several steps"),
        ({}, {"mode": "replace"}, "separate", "mode 'replace'"),
        ({}, {"fused": False}, "separate", "fused=False"),
        ({"loss_function": "equal"}, {}, "separate", "other than the trainer's, even if equal"),
        ({}, {"own_iteration": True}, "separate", "its own iteration"),
    ],
)
def test_params_say_what_runs_and_why(items, make_trainer, make_dicece, transform, kwargs, step, reason):
    """What is tracked is what runs: an iterative attack, replace mode, fused=False, a second (equal) loss object,
    or a trainer running its own iteration all attack in a separate pass, and adv_fused says so."""
    if transform.get("loss_function") == "equal":
        transform["loss_function"] = make_dicece()  # equal to the trainer's, not the same object
    own_iteration = kwargs.pop("own_iteration", False)
    handler = AdversarialAugmentationHandler(FGSMd(keys="image", batched=True, **transform), **kwargs)
    assert "adv_step" not in handler.params  # not known before a trainer
    trainer = make_trainer(items[:4], iteration_update=None if own_iteration else handler.iteration_update)
    handler.attach(trainer)
    params = handler.params
    assert params["adv_step"] == step and reason in params["adv_step_reason"]
    assert params["adv_fused"] is (step == "fused")
    trainer.run()  # and it runs as said
    assert trainer.state.metrics["adv_samples"] == (2.0 if handler.mode == "replace" else 4.0)


def test_a_step_taken_but_not_given_to_the_trainer_is_an_error_after_the_first_iteration(items, make_trainer):
    handler = AdversarialAugmentationHandler(FGSMd(keys="image", batched=True))
    handler.iteration_update  # taken, then not passed to the trainer  # noqa: B018
    trainer = make_trainer(items)
    handler.attach(trainer)
    with pytest.raises(RuntimeError, match="iteration_update was taken, but this trainer runs another iteration"):
        trainer.run()
    assert trainer.state.iteration == 1
