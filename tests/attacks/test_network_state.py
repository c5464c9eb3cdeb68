"""The attack leaves the network exactly as it found it, keeps no autograd graph, and works through DDP."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from monai.losses import DiceCELoss
from torch import nn

from monai_adv.attacks import gradient_sign_attack, preserved_network_state, unwrap_network


def make_bn_net(make_tiny_net, train: bool = True) -> nn.Module:
    """Tiny conv-BN net in train mode, with parameter grads set and one frozen layer."""
    net = make_tiny_net(batch_norm=True, seed=21)
    net.train(train)
    # Non-trivial running statistics and counters, so a reset would be visible too.
    with torch.no_grad():
        net(torch.rand(4, 1, 16, 16))
    # Make one submodule's flag differ from its parent's.
    net[2].eval()
    net[0].weight.requires_grad_(False)  # partly frozen
    for i, p in enumerate(net.parameters()):
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.5 + i)
    return net


def snapshot(net: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in net.named_parameters()},
        "grads": {n: (None if p.grad is None else p.grad.clone()) for n, p in net.named_parameters()},
        "grad_objects": {n: p.grad for n, p in net.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in net.named_parameters()},
        "buffers": {n: b.clone() for n, b in net.named_buffers()},
        "training": {n: m.training for n, m in net.named_modules()},
    }


def assert_same_state(net: nn.Module, before: dict) -> None:
    after = snapshot(net)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["buffers"].keys() == before["buffers"].keys()
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value), f"buffer {name} changed"
    for name, value in before["params"].items():
        assert torch.equal(after["params"][name], value), f"parameter {name} changed"
    for name, grad in before["grads"].items():
        if grad is None:
            assert after["grads"][name] is None, f"{name}.grad was created"
        else:
            assert after["grad_objects"][name] is before["grad_objects"][name], f"{name}.grad replaced"
            assert torch.equal(after["grads"][name], grad), f"{name}.grad changed"


@pytest.fixture
def data(make_square_data):
    return make_square_data(batch=2, size=16, seed=22)


@pytest.mark.parametrize("network_mode", ["train", "eval", "unchanged"])
@pytest.mark.parametrize("num_steps,random_start", [(1, False), (3, True)])
def test_attack_leaves_network_state_untouched(make_tiny_net, data, network_mode, num_steps, random_start):
    net = make_bn_net(make_tiny_net)
    images, mask = data
    before = snapshot(net)
    assert before["buffers"]["1.num_batches_tracked"].item() == 1
    assert any(g is None for g in before["grads"].values()) and any(g is not None for g in before["grads"].values())

    seen_modes = []
    handle = net[1].register_forward_pre_hook(lambda module, args: seen_modes.append(module.training))
    try:
        result = gradient_sign_attack(
            net,
            DiceCELoss(to_onehot_y=True, softmax=True),
            images,
            mask,
            0.1,
            network_mode=network_mode,
            num_steps=num_steps,
            random_start=random_start,
            return_loss_after=True,
        )
    finally:
        handle.remove()

    assert_same_state(net, before)
    assert not torch.equal(result.images, images)
    expected_mode = {"train": True, "eval": False, "unchanged": True}[network_mode]
    assert seen_modes and all(mode == expected_mode for mode in seen_modes)


@pytest.mark.parametrize("network_mode", ["train", "eval"])
def test_attack_runs_in_requested_mode(make_tiny_net, data, network_mode):
    # Compare with a plain-autograd FGSM on a copy of the network put in the requested mode:
    # BatchNorm with batch statistics (train) and with running statistics (eval) give different results.
    net = make_bn_net(make_tiny_net)
    images, mask = data
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    copy = make_bn_net(make_tiny_net).train(network_mode == "train")
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(copy(x), mask), x)
    expected = torch.clamp(images + 0.1 * grad.sign(), 0, 1)
    result = gradient_sign_attack(net, loss_fn, images, mask, 0.1, network_mode=network_mode)
    assert torch.equal(result.images, expected)
    other = gradient_sign_attack(
        net, loss_fn, images, mask, 0.1, network_mode="eval" if network_mode == "train" else "train"
    )
    assert not torch.equal(other.images, expected)
    assert net.training


@pytest.mark.parametrize("network_mode", ["train", "eval"])
def test_state_restored_after_exception(make_tiny_net, data, network_mode):
    net = make_bn_net(make_tiny_net)
    images, mask = data
    before = snapshot(net)
    forwards = []
    handle = net.register_forward_hook(lambda *args: forwards.append(1))
    try:
        # The bad label ({0, 255}) is only detected after the forward pass has run (and updated BN statistics).
        with pytest.raises(ValueError, match="class indices"):
            gradient_sign_attack(
                net, DiceCELoss(to_onehot_y=True, softmax=True), images, mask * 255, 0.1, network_mode=network_mode
            )
    finally:
        handle.remove()
    assert forwards, "the forward pass should have run before the label error"
    assert_same_state(net, before)


def test_state_restored_after_exception_in_network(make_tiny_net, data):
    net = make_bn_net(make_tiny_net)
    images, mask = data
    before = snapshot(net)

    def explode(module, args, output):
        raise RuntimeError("network failure")

    handle = net[2].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="network failure"):
            gradient_sign_attack(net, DiceCELoss(to_onehot_y=True, softmax=True), images, mask, 0.1)
    finally:
        handle.remove()
    assert_same_state(net, before)


def test_preserved_network_state_context_manager(make_tiny_net):
    net = make_bn_net(make_tiny_net)
    before = snapshot(net)
    with pytest.raises(KeyError), preserved_network_state(net, "train") as inner:
        assert inner is net
        assert all(m.training for m in net.modules())
        net(torch.rand(2, 1, 16, 16))  # updates BN statistics
        for p in net.parameters():
            p.requires_grad_(True)
        raise KeyError("inside")
    assert_same_state(net, before)
    with preserved_network_state(net, "eval"):
        assert not any(m.training for m in net.modules())
    with preserved_network_state(net, "unchanged"):
        assert {n: m.training for n, m in net.named_modules()} == before["training"]
    assert_same_state(net, before)
    with pytest.raises(ValueError, match="network_mode"), preserved_network_state(net, "test"):  # type: ignore[arg-type]
        pass


def test_no_autograd_graph_kept_alive(make_tiny_net, data):
    net = make_bn_net(make_tiny_net)
    images, mask = data
    images = images.clone().requires_grad_(True)  # even an input that requires grad must not leak a graph
    outputs = []
    handle = net.register_forward_hook(lambda module, args, output: outputs.append(weakref.ref(output)))
    try:
        result = gradient_sign_attack(
            net, DiceCELoss(to_onehot_y=True, softmax=True), images, mask, 0.1, return_loss_after=True
        )
    finally:
        handle.remove()
    for tensor in (result.images, result.epsilon, result.loss_before, result.loss_after):
        assert not tensor.requires_grad
        assert tensor.grad_fn is None
    assert images.grad is None
    gc.collect()
    assert outputs and all(ref() is None for ref in outputs), "a network output (and its graph) is still alive"


def test_unwrap_network_plain_module(make_tiny_net):
    net = make_tiny_net()
    assert unwrap_network(net) is net


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_attack_through_distributed_data_parallel(make_tiny_net, make_square_data, tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        net = make_tiny_net(batch_norm=True, seed=23)
        reference = make_tiny_net(batch_norm=True, seed=23)
        ddp = nn.parallel.DistributedDataParallel(net)
        assert unwrap_network(ddp) is net
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        images, mask = make_square_data(batch=2, size=16, seed=23)
        optimiser = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ref_optimiser = torch.optim.SGD(reference.parameters(), lr=0.1)
        for _ in range(2):
            before = snapshot(net)
            result = gradient_sign_attack(ddp, loss_fn, images, mask, 0.1, network_mode="train")
            assert_same_state(net, before)
            # the attack through DDP equals the attack on the bare module
            assert torch.equal(
                result.images, gradient_sign_attack(reference, loss_fn, images, mask, 0.1, network_mode="train").images
            )
            # an ordinary training step through DDP still works, and matches the bare module's step
            for model, opt in ((ddp, optimiser), (reference, ref_optimiser)):
                opt.zero_grad()
                loss = loss_fn(model(torch.cat([images, result.images])), torch.cat([mask, mask]))
                loss.backward()
                opt.step()
            for p, q in zip(net.parameters(), reference.parameters()):
                torch.testing.assert_close(p, q)
    finally:
        dist.destroy_process_group()
