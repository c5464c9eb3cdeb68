"""The random states a training draws from, as a checkpoint entry: a continued training draws what an uninterrupted
one would have drawn.

``--resume true`` runs the bundle's ``initialize`` again, which seeds everything from ``--seed``
(``set_determinism``, the transforms' states through MONAI's ``DataLoader``, the adversarial handler). Without
the states of the moment the checkpoint was written, the epochs after a resume would replay the first epochs'
shuffles, crops and noise. The entry keeps torch's, numpy's and Python's global generators (torch's also draws
each epoch's shuffle and the seeds of any DataLoader workers) and the ``RandomState`` of every MONAI
``Randomizable`` in the training transforms, which draw in this process when ``num_workers`` is 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable, Transform

from monai_adv.random_state import numpy_state, python_state, restore_numpy_state, restore_python_state

__all__ = ["RandomStates"]


def _random_states(root: Any, seen: set[int] | None = None) -> Iterator[np.random.RandomState]:
    """Every ``RandomState`` of the MONAI transforms reachable from ``root``, once each, in a fixed order."""
    seen = set() if seen is None else seen
    if id(root) in seen:
        return
    seen.add(id(root))
    if isinstance(root, (list, tuple)):
        for item in root:
            yield from _random_states(item, seen)
        return
    if isinstance(root, Mapping):
        for item in root.values():
            yield from _random_states(item, seen)
        return
    if not isinstance(root, Transform):
        return
    if isinstance(root, Randomizable) and isinstance(root.R, np.random.RandomState) and id(root.R) not in seen:
        seen.add(id(root.R))
        yield root.R
    # nested transforms: a Compose's list, a dictionary transform's array transform (RandCropByPosNegLabeld.cropper)
    for name, value in vars(root).items():
        if name != "R" and isinstance(value, (Transform, list, tuple, Mapping)):
            yield from _random_states(value, seen)


class RandomStates:
    """A checkpointable object (``state_dict`` / ``load_state_dict``) holding the global random generators and those
    of the given transforms.

    Args:
        transforms: the training transforms (a ``Compose``, or a list of transforms); their ``Randomizable`` parts
            are found recursively.

    Example (bundle config)::

        "save_dict": {..., "random_states": {"_target_": "monai_adv.bundle.RandomStates",
                                             "transforms": "@train#preprocessing"}}
    """

    def __init__(self, transforms: Any = None) -> None:
        self.transforms = transforms
        self.logger = logging.getLogger("monai_adv.RandomStates")

    def state_dict(self) -> dict[str, Any]:
        """The states now: torch (CPU, and every CUDA device once CUDA is in use), numpy, Python, the transforms."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return {"torch": torch.get_rng_state(), "cuda": list(cuda), "numpy": numpy_state(), "python": python_state(),
                "transforms": [numpy_state(r) for r in _random_states(self.transforms)]}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the states :meth:`state_dict` returned.

        Raises:
            ValueError: when the transforms hold another number of random states than when the checkpoint was
                written (other transforms: ``--augment`` differs), naming both counts.
        """
        generators = list(_random_states(self.transforms))
        saved = list(state.get("transforms", []))
        if len(saved) != len(generators):
            raise ValueError(
                f"the checkpoint holds {len(saved)} random states of training transforms, the training transforms "
                f"now have {len(generators)}: it was written with other transforms (e.g. another --augment)."
            )
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
        cuda = list(state.get("cuda", []))
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in cuda])
        elif cuda:
            self.logger.warning("the checkpoint's CUDA random states are for %d devices; not restored", len(cuda))
        restore_numpy_state(state["numpy"])
        restore_python_state(state["python"])
        for generator, entry in zip(generators, saved):
            restore_numpy_state(entry, generator)
