"""monai-adv: adversarial attacks (FGSM, Inverse FGSM) as data augmentation for MONAI segmentation."""

__version__ = "0.1.0"
