"""Shared, generic test helpers: tiny deterministic networks, synthetic segmentation data, losses and a reference
FGSM.

Test modules reach them through fixtures (``make_tiny_net``, ``make_dicece``, ``reference_fgsm``, ``loss_case``...):
``import conftest`` would be ambiguous next to ``tests/bundle/conftest.py``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.networks.nets import BasicUNet
from torch import nn


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (addopts runs one worker per core) every worker computes on one thread: two
    workers with two threads each on a 2-core machine would only fight over the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _sigterm_handler_is_given_back():
    """A training stopped (or refused) in this process must give SIGTERM back its handler: one left behind would
    turn a later SIGTERM (a scheduler, a CI time limit) into a stale training's error in an unrelated process."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    after = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, before)  # one leaking test must not fail every test after it
    assert after == before, f"the test left SIGTERM handled by {after!r} (it was {before!r})"


def tiny_net(
    in_channels: int = 1,
    out_channels: int = 2,
    spatial_dims: int = 2,
    hidden: int = 4,
    batch_norm: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """A two-layer conv net (conv-[BN]-tanh-conv), same spatial size out as in, deterministic weights."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = [conv(in_channels, hidden, 3, padding=1)]
        if batch_norm:
            layers.append(norm(hidden))
        layers += [nn.Tanh(), conv(hidden, out_channels, 3, padding=1)]
        net = nn.Sequential(*layers)
    return net.to(dtype)


def square_data(
    batch: int = 2,
    size: int = 16,
    spatial_dims: int = 2,
    noise: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright square on a dark background in [0, 1]: images ``(B, 1, *spatial)`` and {0, 1} labels of the same shape.

    The square's position and size vary per sample (drawn from ``seed``).
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 1) + (size,) * spatial_dims
    labels = torch.zeros(shape, dtype=dtype)
    for b in range(batch):
        side = int(torch.randint(size // 4, size // 2 + 1, (1,), generator=gen))
        corner = [int(torch.randint(0, size - side + 1, (1,), generator=gen)) for _ in range(spatial_dims)]
        index = (b, 0) + tuple(slice(c, c + side) for c in corner)
        labels[index] = 1
    images = 0.2 + 0.6 * labels + noise * torch.randn(shape, generator=gen, dtype=dtype)
    return images.clamp(0, 1), labels


BASIC_UNET_FEATURES = (4, 4, 8, 8, 16, 4)


def basic_unet(seed: int = 0) -> BasicUNet:
    """A small 2D MONAI BasicUNet (1 channel in, 2 out) with deterministic weights; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=BASIC_UNET_FEATURES)


def dicece() -> DiceCELoss:
    """Dice + cross-entropy on softmax outputs with index labels ``(B, 1, *spatial)``."""
    return DiceCELoss(to_onehot_y=True, softmax=True)


def _reference_input_grad(net, loss_fn, images, labels) -> torch.Tensor:
    """Independent input gradient of ``loss_fn(net(images), labels)`` with plain autograd."""
    x = images.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(net(x), labels), x)
    return grad


def _reference_fgsm(net, loss_fn, images, labels, eps, sign, clamp=(0.0, 1.0)) -> torch.Tensor:
    """Independent FGSM (``sign=+1``) / Inverse FGSM (``sign=-1``): ``clamp(x + sign * eps * sign(grad))``."""
    adv = images.detach() + sign * eps * _reference_input_grad(net, loss_fn, images, labels).sign()
    return adv if clamp is None else torch.clamp(adv, clamp[0], clamp[1])


class LossCase(NamedTuple):
    """A loss with the network output channels and the label layout it expects."""

    name: str
    make_loss: Callable[[], nn.Module]
    out_channels: int
    labels: Callable[[torch.Tensor], torch.Tensor]  # mask (B, 1, *spatial) in {0, 1} -> labels for the loss


def _channel_labels(mask: torch.Tensor) -> torch.Tensor:
    return mask.clone()


def _index_labels_without_channel(mask: torch.Tensor) -> torch.Tensor:
    return mask[:, 0].long()


LOSS_CASES = {
    case.name: case
    for case in (
        LossCase("cross_entropy", lambda: nn.CrossEntropyLoss(), 2, _index_labels_without_channel),
        LossCase("dice_sigmoid", lambda: DiceLoss(sigmoid=True), 1, _channel_labels),
        LossCase("dicece_softmax", dicece, 2, _channel_labels),
    )
}


@pytest.fixture(params=sorted(LOSS_CASES))
def loss_case(request) -> LossCase:
    """Parametrizes a test over the segmentation losses: ``loss_case.make_loss()``, ``loss_case.out_channels``,
    ``loss_case.labels(mask)``."""
    return LOSS_CASES[request.param]


@pytest.fixture(scope="session")
def make_dicece():
    """Factory fixture: ``make_dicece() -> DiceCELoss(to_onehot_y=True, softmax=True)``."""
    return dicece


@pytest.fixture(scope="session")
def reference_fgsm():
    """``reference_fgsm(net, loss_fn, images, labels, eps, sign, clamp=(0.0, 1.0)) -> adversarial images``,
    computed independently of ``monai_adv``."""
    return _reference_fgsm


@pytest.fixture(scope="session")
def reference_input_grad():
    """``reference_input_grad(net, loss_fn, images, labels) -> d loss / d images``, independent of ``monai_adv``."""
    return _reference_input_grad


@pytest.fixture(scope="session")
def make_basic_unet():
    """Factory fixture: ``make_basic_unet(seed=0)``, a small 2D BasicUNet (1 -> 2 channels)."""
    return basic_unet


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (tiny convolutions run faster and steadier on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def make_tiny_net():
    """Factory fixture: ``make_tiny_net(in_channels=1, out_channels=2, spatial_dims=2, batch_norm=False, ...)``."""
    return tiny_net


@pytest.fixture(scope="session")
def make_square_data():
    """Factory fixture: ``make_square_data(batch=2, size=16, spatial_dims=2, ...) -> (images, labels)``."""
    return square_data


def trained_square_unet(
    spatial_dims: int = 2, num_classes: int = 2, size: int = 32, iterations: int = 60, seed: int = 0
) -> tuple[BasicUNet, list[dict[str, torch.Tensor]]]:
    """A small BasicUNet trained for a few seconds on bright squares (class ``c`` at brightness ``c / (K - 1)``
    scaled into [0.2, 0.8]), and two held-out batches of 4 ``{"image", "label"}``. The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = BasicUNet(
            spatial_dims=spatial_dims, in_channels=1, out_channels=num_classes, features=BASIC_UNET_FEATURES
        )

        def batch(data_seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
            images, masks = square_data(batch=count, size=size, spatial_dims=spatial_dims, seed=data_seed)
            if num_classes > 2:  # the lower half of each square is another class, a little brighter
                half = torch.zeros_like(masks)
                half[..., size // 2 :] = 1  # the last axis's upper half
                labels = masks * (1 + half * (num_classes - 2))
                images = (images + 0.15 * labels / (num_classes - 1) * masks).clamp(0, 1)
                return images, labels
            return images, masks

        loss = DiceCELoss(to_onehot_y=True, softmax=True)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        for step in range(iterations):
            images, labels = batch(1000 + step, 8)
            optimizer.zero_grad()
            loss(net(images), labels).backward()
            optimizer.step()
        net.eval()
        held_out = [dict(zip(("image", "label"), batch(seed, 4))) for seed in (1, 2)]
    return net, held_out


@pytest.fixture(scope="session")
def make_trained_unet():
    """Factory fixture: ``make_trained_unet(spatial_dims=2, num_classes=2, size=32, iterations=60)`` -> ``(net,
    batches)``: a small BasicUNet trained briefly on squares, with two held-out batches of 4."""
    cache: dict[tuple, tuple] = {}

    def make(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            cache[key] = trained_square_unet(**kwargs)
        return cache[key]

    return make
