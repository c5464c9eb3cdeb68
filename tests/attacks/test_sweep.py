"""The one-gradient epsilon sweep gives exactly what one attack per epsilon gives."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from monai_adv.attacks.gradient_sign import gradient_sign_attack
from monai_adv.attacks.sweep import check_epsilons, gradient_sign_sweep, sweep_from_gradient

EPSILONS = [0.0, 0.0012, 0.0118, 0.1176, 0.2]


@pytest.mark.parametrize("clamp", ["range", "image", "none"])
def test_sweep_equals_one_attack_per_epsilon(clamp, make_tiny_net, make_square_data):
    tiny_net, square_data = make_tiny_net, make_square_data
    net = tiny_net(batch_norm=True)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    images, labels = square_data(batch=3, size=16)
    swept = gradient_sign_sweep(net, loss, images, labels, EPSILONS, ("ascend", "descend"), clamp=clamp)
    for direction in ("ascend", "descend"):
        assert len(swept[direction]) == len(EPSILONS)
        for eps, adversarial in zip(EPSILONS, swept[direction]):
            single = gradient_sign_attack(net, loss, images, labels, eps, direction, clamp=clamp).images
            assert torch.equal(adversarial, single), (direction, eps)
    # the two directions differ, and epsilon 0 is the clean batch
    assert not torch.equal(swept["ascend"][-1], swept["descend"][-1])
    assert torch.equal(swept["ascend"][0], images)


def test_sweep_leaves_network_as_it_was(make_tiny_net, make_square_data):
    tiny_net, square_data = make_tiny_net, make_square_data
    net = tiny_net(batch_norm=True).train()
    images, labels = square_data(batch=2)
    gradient_sign_sweep(net, DiceCELoss(to_onehot_y=True, softmax=True), images, labels, [0.1])
    assert net.training and all(p.grad is None for p in net.parameters())


def test_sweep_from_gradient_is_within_epsilon_and_bounds(make_square_data):
    square_data = make_square_data
    images, _ = square_data(batch=2)
    gradient = torch.randn_like(images)
    bounds = (torch.tensor(0.0), torch.tensor(1.0))
    for eps, out in zip(EPSILONS, sweep_from_gradient(images, gradient, EPSILONS, "ascend", bounds)):
        assert (out - images).abs().max() <= eps + 1e-7
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("bad", [[], [-0.1], [float("nan")], [0.1, float("inf")]])
def test_bad_epsilons_are_refused(bad):
    with pytest.raises(ValueError, match="epsilons"):
        check_epsilons(bad)


def test_bad_direction_and_gradient_shape_are_refused(make_tiny_net, make_square_data):
    tiny_net, square_data = make_tiny_net, make_square_data
    images, labels = square_data(batch=2)
    with pytest.raises(ValueError, match="directions"):
        gradient_sign_sweep(tiny_net(), DiceCELoss(to_onehot_y=True, softmax=True), images, labels, [0.1], ["up"])
    with pytest.raises(ValueError, match="gradient shape"):
        sweep_from_gradient(images, torch.zeros(1, 1, 4, 4), [0.1])
