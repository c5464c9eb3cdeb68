"""Shared, generic test helpers: tiny deterministic networks and synthetic segmentation data."""

from __future__ import annotations

import pytest
import torch
from torch import nn


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


@pytest.fixture(scope="session")
def make_tiny_net():
    """Factory fixture: ``make_tiny_net(in_channels=1, out_channels=2, spatial_dims=2, batch_norm=False, ...)``."""
    return tiny_net


@pytest.fixture(scope="session")
def make_square_data():
    """Factory fixture: ``make_square_data(batch=2, size=16, spatial_dims=2, ...) -> (images, labels)``."""
    return square_data
