"""monai-adv: adversarial attacks (FGSM, Inverse FGSM) as data augmentation for MONAI segmentation.

Layout: :mod:`monai_adv.attacks` is the pure torch core; :mod:`monai_adv.transforms`,
:mod:`monai_adv.handlers` and the bundle configs are thin MONAI shells over it;
:mod:`monai_adv.data` provides the bundle's datalists and its generated default dataset.
"""

__version__ = "0.1.0"

from monai_adv import attacks, data, handlers, transforms, utils  # noqa: E402  (importable as monai_adv.x)

__all__ = ["__version__", "attacks", "data", "handlers", "transforms", "utils"]
