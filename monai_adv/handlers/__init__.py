"""Ignite handlers: the training-loop shell over :mod:`monai_adv.transforms`."""

from monai_adv.handlers.adversarial_augmentation import AdversarialAugmentationHandler

__all__ = ["AdversarialAugmentationHandler"]
