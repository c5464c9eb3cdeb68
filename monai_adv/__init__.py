"""monai-adv: adversarial attacks (FGSM, Inverse FGSM) as data augmentation for MONAI segmentation.

Layout: :mod:`monai_adv.attacks` is the pure torch core; :mod:`monai_adv.transforms`,
:mod:`monai_adv.handlers` and the bundle configs are thin MONAI shells over it;
:mod:`monai_adv.data` provides the bundle's datalists and its generated default dataset.

Subpackages are imported on first access (``monai_adv.transforms``, ``from monai_adv import handlers``),
not when ``monai_adv`` itself is imported, so that ``import monai_adv.attacks`` loads torch alone and
never MONAI, Ignite, MLflow, nibabel or PIL.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__version__ = "0.1.0"

__all__ = ["__version__"]


def __getattr__(name: str) -> ModuleType:
    """Import the subpackage or module ``monai_adv.<name>`` on first access (PEP 562).

    Any module of the package is reachable this way, including ones added later, without this file
    listing them.

    Raises:
        AttributeError: when ``monai_adv`` has no module called ``name``.
    """
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    import pkgutil

    modules = [info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
    return sorted(set(globals()) | set(modules))
