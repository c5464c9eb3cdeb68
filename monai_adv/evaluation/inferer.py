"""A network seen through a MONAI inferer, so that attacks go through the inference the evaluation uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["InfererNetwork"]


class InfererNetwork(nn.Module):
    """``inferer(x, network)`` as a module: an attack on it differentiates through the inferer.

    With :class:`monai.inferers.SlidingWindowInferer` the input gradient flows through
    ``sliding_window_inference`` (window extraction, the network on each window, the weighted stitching), so the
    attack targets the prediction that the evaluation scores, not a whole-volume forward pass that the network may
    never see at inference. ``train()``/``eval()`` reach the wrapped network.

    Args:
        network: the segmentation network.
        inferer: a MONAI inferer (``inferer(inputs, network)``), e.g. ``SlidingWindowInferer(roi_size=...)``.
    """

    def __init__(self, network: nn.Module, inferer: Callable[..., Any]) -> None:
        super().__init__()
        self.network = network
        self.inferer = inferer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inferer(x, self.network)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, dict):
            raise TypeError("the inferer returned a dict: give an inferer whose output is the prediction tensor.")
        return out
