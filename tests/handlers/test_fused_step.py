"""The fused append step (the handler's default) against its definition: attack, then train on the concatenated batch."""

from __future__ import annotations

import copy
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.losses import DiceCELoss

from monai_adv.attacks import gradient_sign_attack
from monai_adv.handlers import AdversarialAugmentationHandler
from monai_adv.transforms import FGSM, FGSMd, InvFGSMd

SIZE = 32
EPS = 0.1
LR = 0.5
DIRECTIONS = {"fgsm": ["ascend"], "invfgsm": ["descend"], "both": ["ascend", "descend"]}


# tiny convolutions run much faster (and steadier on a busy 2-core machine) on one thread
pytestmark = pytest.mark.usefixtures("one_thread")


def transforms_for(method: str, **kwargs) -> list:
    made = {"fgsm": [FGSMd], "invfgsm": [InvFGSMd], "both": [FGSMd, InvFGSMd]}[method]
    return [cls(keys="image", epsilon=EPS, batched=True, **kwargs) for cls in made]


@pytest.fixture
def data(make_square_data):
    return make_square_data(batch=8, size=SIZE, seed=3)


@pytest.fixture
def trainer_for(make_dicece):
    def _trainer_for(
        images, labels, network, handler=None, batch_size=4, max_epochs=1, own_iteration=False, **kwargs
    ) -> SupervisedTrainer:
        """A SupervisedTrainer with the handler's step as its iteration (``own_iteration``: the trainer's own)."""
        items = [{"image": images[i], "label": labels[i]} for i in range(len(images))]
        if handler is not None and not own_iteration:
            kwargs["iteration_update"] = handler.iteration_update
        return SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=max_epochs,
            train_data_loader=DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=0),
            network=network,
            optimizer=torch.optim.SGD(network.parameters(), lr=LR),
            loss_function=make_dicece(),
            train_handlers=[handler] if handler is not None else None,
            **kwargs,
        )

    return _trainer_for


@pytest.fixture
def explicit_step(make_dicece):
    def _explicit_step(network, images, labels, directions, lr=LR):
        """The definition: FGSM/InvFGSM at the current weights (train mode), then one SGD step on the concatenation."""
        network.train()
        copies = [
            gradient_sign_attack(network, make_dicece(), images, labels, EPS, direction=d, network_mode="train").images
            for d in directions
        ]
        optimizer = torch.optim.SGD(network.parameters(), lr=lr)
        optimizer.zero_grad()
        loss = make_dicece()(network(torch.cat([images, *copies])), torch.cat([labels] * (1 + len(copies))))
        loss.backward()
        optimizer.step()
        return torch.cat(copies), loss.detach()

    return _explicit_step


def assert_same_parameters(actual, expected):
    for p, q in zip(actual.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["fgsm", "invfgsm", "both"])
def test_fused_step_equals_attack_then_concatenated_step(data, method, make_basic_unet, trainer_for, explicit_step):
    images, labels = data
    images, labels = images[:4], labels[:4]
    network, reference = make_basic_unet(seed=1), make_basic_unet(seed=1)
    handler = AdversarialAugmentationHandler(transforms_for(method))
    trainer = trainer_for(images, labels, network, handler)
    trainer.run()
    expected_copies, expected_loss = explicit_step(reference, images, labels, DIRECTIONS[method])
    torch.testing.assert_close(handler.adversarial, expected_copies, rtol=0, atol=1e-6)
    assert_same_parameters(network, reference)
    # the loss reported is the concatenated batch's; the clean batch and each method's copies get their metrics
    assert trainer.state.output[0]["loss"] == pytest.approx(float(expected_loss), rel=1e-5)
    metrics = trainer.state.metrics
    assert metrics["adv_samples"] == 4.0 * len(DIRECTIONS[method])
    assert {f"adv_loss_{t.method}" for t in handler.transforms} <= set(metrics)
    assert not trainer.state.output[0]["image"].requires_grad


def test_fused_step_over_two_iterations_follows_the_updated_weights(data, make_basic_unet, trainer_for, explicit_step):
    """Each iteration's copies are made at that iteration's weights (after the previous update)."""
    images, labels = data
    network, reference = make_basic_unet(seed=2), make_basic_unet(seed=2)
    copies: list[torch.Tensor] = []
    handler = AdversarialAugmentationHandler(transforms_for("both"))
    trainer = trainer_for(images, labels, network, handler)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: copies.append(handler.adversarial.clone()))
    trainer.run()
    for i, batch in enumerate((slice(0, 4), slice(4, 8))):
        expected, _ = explicit_step(reference, images[batch], labels[batch], DIRECTIONS["both"])
        torch.testing.assert_close(copies[i], expected, rtol=0, atol=1e-6)
    assert_same_parameters(network, reference)


def test_fused_and_separate_modes_give_the_same_gradient_accumulation(data, make_basic_unet, trainer_for):
    images, labels = data
    grads = {}
    for fused in (True, False):
        network = make_basic_unet(seed=3)
        handler = AdversarialAugmentationHandler(transforms_for("fgsm", network_mode="train"), fused=fused)
        trainer = trainer_for(images, labels, network, handler, accumulation_steps=2)
        recorded: list = []
        trainer.add_event_handler(
            IterationEvents.BACKWARD_COMPLETED,
            lambda e, r=recorded: r.append([p.grad.clone() for p in e.network.parameters()]),
        )
        trainer.run()
        grads[fused] = recorded
    assert len(grads[True]) == 2
    for fused_step, separate_step in zip(grads[True], grads[False]):
        for a, b in zip(fused_step, separate_step):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the second iteration accumulated onto the first (no zero_grad in between)
    assert any(not torch.allclose(a, b) for a, b in zip(grads[True][0], grads[True][1]))


def test_start_epoch_fused_trains_clean_first(data, make_basic_unet, make_dicece, trainer_for, explicit_step):
    images, labels = data
    images, labels = images[:4], labels[:4]
    network, reference = make_basic_unet(seed=4), make_basic_unet(seed=4)
    handler = AdversarialAugmentationHandler(transforms_for("fgsm"), start_epoch=2)
    per_epoch = []
    trainer = trainer_for(images, labels, network, handler, max_epochs=2)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: per_epoch.append(dict(e.state.metrics)))
    trainer.run()
    # epoch 1: a plain step on the clean batch; epoch 2: the augmented step at the updated weights
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    make_dicece()(reference.train()(images), labels).backward()
    optimizer.step()
    explicit_step(reference, images, labels, DIRECTIONS["fgsm"])
    assert_same_parameters(network, reference)
    assert "adv_samples" not in per_epoch[0] and per_epoch[1]["adv_samples"] == 4.0


def test_amp_trainer_on_cpu_runs_bfloat16_autocast(data, make_basic_unet, trainer_for, explicit_step):
    """SupervisedTrainer(amp=True) on a CPU: the step's forward passes run under bfloat16 autocast (the trainer's
    own autocast is CUDA-only), fused and separate, and the update stays close to the float32 one."""
    images, labels = data
    images, labels = images[:4], labels[:4]
    for fused in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GradScaler on a machine without CUDA
            network, reference = make_basic_unet(seed=5), make_basic_unet(seed=5)
            handler = AdversarialAugmentationHandler(transforms_for("both", network_mode="train"), fused=fused)
            trainer = trainer_for(images, labels, network, handler, amp=True)
        dtypes = []
        trainer.add_event_handler(
            IterationEvents.FORWARD_COMPLETED, lambda e, d=dtypes: d.append(e.state.output["pred"].dtype)
        )
        trainer.run()
        assert dtypes == [torch.bfloat16] and handler.params["adv_step"] == ("fused" if fused else "separate")
        assert all(m.spec.amp for m in handler.step.methods)  # the attack follows engine.amp
        assert not any(t.amp for t in handler.transforms)  # the user's transforms are not written into
        explicit_step(reference, images, labels, DIRECTIONS["both"])
        for p, q in zip(network.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("native", [False, True])
def test_amp_on_a_cpu_without_bfloat16_instructions_warns_once(
    native, data, make_basic_unet, trainer_for, monkeypatch, caplog
):
    """Emulated bfloat16 (no avx512_bf16/amx_bf16) is tens of times slower than float32: the step says so, once."""
    from monai_adv.engines import adversarial_step

    monkeypatch.setattr(adversarial_step, "cpu_has_native_bf16", lambda: native)
    adversarial_step._warn_if_bf16_emulated.cache_clear()
    images, labels = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler on a machine without CUDA
        handler = AdversarialAugmentationHandler(transforms_for("fgsm", network_mode="train"))
        trainer = trainer_for(images[:4], labels[:4], make_basic_unet(seed=5), handler, amp=True, max_epochs=2)
    with caplog.at_level("WARNING", logger="monai_adv.AdversarialTrainingStep"):
        trainer.run()
    adversarial_step._warn_if_bf16_emulated.cache_clear()
    found = [r.getMessage() for r in caplog.records if "without bfloat16 instructions" in r.getMessage()]
    assert len(found) == (0 if native else 1), found
    assert native or "--amp false" in found[0]


def test_batchnorm_network_attacks_separately_in_eval_mode_and_warns_when_fused(data, trainer_for):
    images, labels = data
    network = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1)
    )
    eval_mode = AdversarialAugmentationHandler(transforms_for("fgsm"))  # the spec's default network_mode="eval"
    trainer = trainer_for(images[:4], labels[:4], network, eval_mode)
    trainer.run()
    assert eval_mode.params["adv_step"] == "separate" and "eval mode" in eval_mode.params["adv_step_reason"]
    train_mode = AdversarialAugmentationHandler(transforms_for("fgsm", network_mode="train"))
    with pytest.warns(UserWarning, match="BatchNorm2d.*fused=False"):
        trainer_for(images[:4], labels[:4], network, train_mode).run()
    assert train_mode.params["adv_step"] == "fused"


def test_iterative_transform_falls_back_to_a_separate_pass(data, make_basic_unet, trainer_for):
    images, labels = data
    handler = AdversarialAugmentationHandler(FGSMd(keys="image", epsilon=EPS, num_steps=2, batched=True))
    sizes = []
    trainer = trainer_for(images[:4], labels[:4], make_basic_unet(), handler)
    trainer.add_event_handler(
        IterationEvents.FORWARD_COMPLETED, lambda e: sizes.append(e.state.output["image"].shape[0])
    )
    trainer.run()
    assert sizes == [8] and handler.params["adv_step"] == "separate"
    assert (handler.adversarial - images[:4]).abs().max() <= EPS + 1e-6


# ----------------------------------------------------------------------------------------------- DDP, 2 processes

DDP_TIMEOUT_S = 300


def _ddp_worker(
    rank: int, world_size: int, store: str, images, labels, result_dir: str, make_basic_unet, trainer_for
) -> None:
    """One DDP rank; ``make_basic_unet`` and ``trainer_for`` (fixtures) reach it as arguments, unpickled under fork."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        network = torch.nn.parallel.DistributedDataParallel(make_basic_unet(seed=6))
        handler = AdversarialAugmentationHandler(transforms_for("both"))
        part = slice(rank * 4, rank * 4 + 4)
        trainer_for(images[part], labels[part], network, handler).run()
        torch.save(
            {"params": [p.detach() for p in network.module.parameters()], "copies": handler.adversarial},
            os.path.join(result_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_fused_step_equals_averaged_explicit_steps(
    data, tmp_path: Path, make_basic_unet, make_dicece, trainer_for
):
    images, labels = data
    # fork: the children need no fresh interpreter importing MONAI (spawn takes ~20 s more on 2 cores)
    ranks = torch.multiprocessing.start_processes(
        _ddp_worker,
        args=(2, str(tmp_path / "store"), images, labels, str(tmp_path), make_basic_unet, trainer_for),
        nprocs=2,
        join=False,
        start_method="fork",
    )
    # bounded: a rank stuck in the rendezvous (or a fork that inherited a held lock) must fail this test, not hang
    # the whole run until CI's limit
    deadline = time.monotonic() + DDP_TIMEOUT_S
    while not ranks.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(
                f"the two DDP ranks did not finish in {DDP_TIMEOUT_S} s (exit codes {[p.exitcode for p in ranks.processes]})"
            )
    # reference: each rank's concatenated-batch gradient at the same start, averaged (what DDP does), one SGD step
    start = make_basic_unet(seed=6)
    grads, copies = [], []
    for rank in range(2):
        network = copy.deepcopy(start).train()
        part = slice(rank * 4, rank * 4 + 4)
        adv = [
            gradient_sign_attack(
                network, make_dicece(), images[part], labels[part], EPS, direction=d, network_mode="train"
            ).images
            for d in DIRECTIONS["both"]
        ]
        copies.append(torch.cat(adv))
        loss = make_dicece()(network(torch.cat([images[part], *adv])), torch.cat([labels[part]] * 3))
        grads.append(torch.autograd.grad(loss, list(network.parameters())))
    expected = [p.detach() - LR * (g0 + g1) / 2 for p, g0, g1 in zip(start.parameters(), *grads)]
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["copies"], copies[rank], rtol=0, atol=1e-6)
        for actual, wanted in zip(result["params"], expected):
            torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------- bad input


def test_array_transform_is_named_with_the_dictionary_form():
    with pytest.raises(TypeError, match=r"FGSM is an array transform: use FGSMd\(keys='image', batched=True\)"):
        AdversarialAugmentationHandler(FGSM(epsilon=EPS))


@pytest.mark.parametrize("start_epoch", [2.7, 2.0, "2", True])
def test_non_integer_start_epoch_is_refused(start_epoch):
    with pytest.raises(ValueError, match="start_epoch must be an integer"):
        AdversarialAugmentationHandler(transforms_for("fgsm"), start_epoch=start_epoch)


def test_start_epoch_after_the_last_epoch_warns(data, make_basic_unet, trainer_for):
    images, labels = data
    handler = AdversarialAugmentationHandler(transforms_for("fgsm"), start_epoch=3)
    with pytest.warns(UserWarning, match=r"start_epoch=3 is after the last epoch \(max_epochs=2\)"):
        trainer_for(images[:4], labels[:4], make_basic_unet(), handler, max_epochs=2).run()


@pytest.mark.parametrize("fused", [True, False])
def test_empty_batch_is_refused_clearly(data, fused, make_basic_unet, trainer_for):
    images, labels = data
    handler = AdversarialAugmentationHandler(transforms_for("fgsm"), fused=fused)
    trainer = trainer_for(images[:4], labels[:4], make_basic_unet(), handler)
    trainer.add_event_handler(
        Events.ITERATION_STARTED, lambda e: setattr(e.state, "batch", {"image": images[:0], "label": labels[:0]})
    )
    trainer.remove_event_handler(handler, Events.ITERATION_STARTED)  # re-register after the emptying handler
    trainer.add_event_handler(Events.ITERATION_STARTED, handler)
    with pytest.raises(ValueError, match="holds no samples"):
        trainer.run()


def test_attach_twice_registers_once(data, make_basic_unet, trainer_for):
    images, labels = data
    handler = AdversarialAugmentationHandler(transforms_for("fgsm"), fused=False)
    trainer = trainer_for(images[:4], labels[:4], make_basic_unet(), handler)
    handler.attach(trainer)
    sizes = []
    trainer.add_event_handler(
        IterationEvents.FORWARD_COMPLETED, lambda e: sizes.append(e.state.output["image"].shape[0])
    )
    trainer.run()
    assert sizes == [8]  # attached twice would have given 16 (the copy appended twice)


def test_append_repeats_per_sample_metadata(data, make_basic_unet, make_dicece):
    images, labels = data
    names = [f"case_{i}.png" for i in range(4)]
    items = [
        {"image": MetaTensor(images[i], meta={"filename_or_obj": names[i]}), "label": labels[i], "id": names[i]}
        for i in range(4)
    ]
    handler = AdversarialAugmentationHandler(transforms_for("both"), fused=False)
    seen = []
    network = make_basic_unet()
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=DataLoader(items, batch_size=4),
        network=network, optimizer=torch.optim.SGD(network.parameters(), lr=0.0), loss_function=make_dicece(),
        train_handlers=[handler],
    )  # fmt: skip
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append(e.state.batch))
    trainer.run()
    batch = seen[0]
    assert batch["image"].shape[0] == 12
    assert list(batch["image"].meta["filename_or_obj"]) == names * 3
    assert batch["id"] == names * 3


def test_fused_step_in_3d_with_three_classes_equals_attack_then_concatenated_step(trainer_for, explicit_step):
    """The fused step on a tiny 3D, 3-class BasicUNet (volumes as in configs/hippocampus.json): the same copies and
    the same update as attacking first and stepping on the concatenated batch."""
    from monai.networks.nets import BasicUNet

    def unet3d() -> BasicUNet:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            return BasicUNet(spatial_dims=3, in_channels=1, out_channels=3, features=(4, 4, 8, 8, 16, 4))

    generator = torch.Generator().manual_seed(5)
    images = torch.randn(2, 1, 32, 32, 32, generator=generator)
    labels = torch.randint(0, 3, (2, 1, 32, 32, 32), generator=generator).float()
    network, reference = unet3d(), unet3d()
    handler = AdversarialAugmentationHandler([FGSMd(keys="image", epsilon=EPS, batched=True, clamp="image")])
    trainer = trainer_for(images, labels, network, handler, batch_size=2)
    trainer.run()
    assert handler.params["adv_step"] == "fused"
    reference.train()
    copies = gradient_sign_attack(reference, DiceCELoss(to_onehot_y=True, softmax=True), images, labels, EPS,
                                  direction="ascend", network_mode="train", clamp="image").images  # fmt: skip
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    optimizer.zero_grad()
    loss = DiceCELoss(to_onehot_y=True, softmax=True)(reference(torch.cat([images, copies])), torch.cat([labels] * 2))
    loss.backward()
    optimizer.step()
    torch.testing.assert_close(handler.adversarial, copies, rtol=0, atol=1e-6)
    assert_same_parameters(network, reference)
