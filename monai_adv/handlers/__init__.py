"""Ignite handlers: the training-loop shell over :mod:`monai_adv.transforms`."""

from monai_adv.handlers.adversarial_augmentation import AdversarialAugmentationHandler, EpochMean

__all__ = ["AdversarialAugmentationHandler", "EpochMean"]
