"""Attacks through a MONAI inferer: the gradient flows through sliding_window_inference."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.losses import DiceCELoss

from monai_adv.attacks import AttackSpec, run_attack
from monai_adv.evaluation import InfererNetwork

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def volume_case(make_tiny_net):
    net = make_tiny_net(in_channels=1, out_channels=3, spatial_dims=3).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 1, 16, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (2, 1, 16, 16, 16), generator=generator).float()
    return net, images, labels


def test_attack_through_one_window_equals_the_attack_on_the_whole_volume(volume_case):
    """A volume that fits in one window: the inferer is the identity, so the attack is the same to float precision."""
    net, images, labels = volume_case
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    spec = AttackSpec.create(num_steps=3, random_start=False, clamp="image")
    window = InfererNetwork(net, SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=1, overlap=0.0))
    through = run_attack(window, images, labels, spec, loss, 0.05).images
    whole = run_attack(net, images, labels, spec, loss, 0.05).images
    assert torch.allclose(through, whole, atol=1e-6)
    assert not torch.equal(whole, images)  # the attack moved the images


def test_gradient_flows_through_overlapping_windows(volume_case):
    """Smaller overlapping windows: the input gradient through the inferer is non-zero everywhere and matches a
    finite difference of the stitched prediction's loss."""
    net, images, labels = volume_case
    # float64 and a seeded direction: in float32 the central difference's rounding (~1e-4) is the size of the
    # derivative itself, which made this check fail now and then
    net, images = copy.deepcopy(net).double(), images.double()
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=4, overlap=0.5, mode="gaussian")
    window = InfererNetwork(net, inferer)
    x = images.clone().requires_grad_(True)
    value = loss(window(x), labels)
    (grad,) = torch.autograd.grad(value, x)
    assert grad.abs().sum() > 0 and bool((grad != 0).float().mean() > 0.9)
    direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(0), dtype=images.dtype)
    direction /= direction.norm()
    h = 1e-4
    with torch.no_grad():
        numeric = (loss(window(images + h * direction), labels) - loss(window(images - h * direction), labels)) / (
            2 * h
        )
    assert float((grad * direction).sum()) == pytest.approx(float(numeric), rel=1e-3, abs=1e-8)
    # the simple inferer is the network itself
    assert torch.equal(InfererNetwork(net, SimpleInferer())(images), net(images))
