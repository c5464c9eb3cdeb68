"""A guard that leaves a network exactly as it was after an attack has run through it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

__all__ = ["NetworkMode", "preserved_network_state", "unwrap_network"]

#: The mode a network is put in while attacked: ``"eval"``, ``"train"`` or ``"unchanged"``.
NetworkMode = Literal["eval", "train", "unchanged"]
_NETWORK_MODES = ("eval", "train", "unchanged")


def unwrap_network(network: nn.Module) -> nn.Module:
    """Return the module inside a ``DistributedDataParallel`` wrapper, else ``network`` itself.

    An attack only needs the input gradient. Running it through the DDP wrapper would arm the
    reducer for a backward pass that never reaches the parameters, which DDP reports as an
    unfinished reduction at the next training step, and would synchronise nothing useful.
    """
    if isinstance(network, nn.parallel.DistributedDataParallel):
        return network.module
    return network


@contextmanager
def preserved_network_state(network: nn.Module, mode: NetworkMode = "eval") -> Iterator[nn.Module]:
    """Run a block with ``network`` in ``mode`` and restore its state afterwards.

    Restored on exit, also when the block raises: every submodule's ``training`` flag, every
    parameter's ``requires_grad`` flag and, when the block runs modules in training mode (``mode="train"``,
    or ``"unchanged"`` with a module in training mode), every buffer (BatchNorm running statistics and
    ``num_batches_tracked``); in eval mode buffers are only read, so they are not copied. Parameters and their ``.grad`` are not copied: the attack functions
    take gradients with ``torch.autograd.grad`` with respect to the input only, so they never
    write to them.

    Args:
        network: the network to guard.
        mode: ``"eval"`` (dropout off, BatchNorm uses running statistics), ``"train"``, or
            ``"unchanged"`` (whatever mode the network is in).

    Raises:
        ValueError: when ``mode`` is not one of ``"eval"``, ``"train"``, ``"unchanged"``.
    """
    if mode not in _NETWORK_MODES:
        raise ValueError(f"network_mode must be one of {_NETWORK_MODES}, got {mode!r}.")
    modules = list(network.modules())
    training_flags = [m.training for m in modules]
    parameters = list(network.parameters())
    requires_grad_flags = [p.requires_grad for p in parameters]
    # BatchNorm updates running statistics only when it runs in training mode: keep copies of the
    # buffers then (in eval mode they are read, not written, and copying them would cost every attack).
    runs_training = mode == "train" or (mode == "unchanged" and any(training_flags))
    buffers = [(b, b.detach().clone()) for b in network.buffers()] if runs_training else []
    try:
        # only when a flag changes: Module.train() sets every submodule's flag, which costs a BasicUNet about
        # 0.4 ms, half a percent of its gradient pass on a CPU, on every attack call
        if mode == "eval" and any(training_flags):
            network.eval()
        elif mode == "train" and not all(training_flags):
            network.train()
        yield network
    finally:
        # Write back only what differs: setting hundreds of flags costs more than comparing them.
        for module, flag in zip(modules, training_flags):
            if module.training != flag:
                module.training = flag
        for param, flag in zip(parameters, requires_grad_flags):
            if param.requires_grad != flag:
                param.requires_grad_(flag)
        if buffers:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
