"""Random states as checkpoint entries that ``torch.load(weights_only=True)`` accepts (tensors, ints, floats, strings).

MONAI's ``CheckpointLoader`` loads with ``weights_only=True``, which refuses numpy arrays: a ``RandomState``'s key
is kept as an int64 tensor and turned back into uint32 on restore.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["numpy_state", "python_state", "restore_numpy_state", "restore_python_state"]


def numpy_state(generator: np.random.RandomState | None = None) -> dict[str, Any]:
    """The state of ``generator`` (default: numpy's global one), as tensors and numbers."""
    state = generator.get_state(legacy=False) if generator is not None else np.random.get_state(legacy=False)
    return {"bit_generator": str(state["bit_generator"]),
            "key": torch.from_numpy(np.asarray(state["state"]["key"], dtype=np.int64)),
            "pos": int(state["state"]["pos"]), "has_gauss": int(state["has_gauss"]), "gauss": float(state["gauss"])}  # fmt: skip


def restore_numpy_state(state: Mapping[str, Any], generator: np.random.RandomState | None = None) -> None:
    """Give ``generator`` (default: numpy's global one) the state :func:`numpy_state` returned.

    Raises:
        ValueError: when the state is not that of numpy's ``MT19937``.
    """
    if state.get("bit_generator") != "MT19937":
        raise ValueError(f"expected an MT19937 random state, got {state.get('bit_generator')!r}.")
    key = np.asarray(torch.as_tensor(state["key"]).numpy(), dtype=np.int64).astype(np.uint32)
    legacy = ("MT19937", key, int(state["pos"]), int(state["has_gauss"]), float(state["gauss"]))
    (generator.set_state if generator is not None else np.random.set_state)(legacy)


def python_state() -> dict[str, Any]:
    """The state of Python's global ``random``."""
    version, internal, gauss = random.getstate()
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def restore_python_state(state: Mapping[str, Any]) -> None:
    """Give Python's global ``random`` the state :func:`python_state` returned."""
    internal = tuple(int(v) for v in torch.as_tensor(state["internal"]).tolist())
    random.setstate((int(state["version"]), internal, state["gauss"]))
