"""MONAI transforms over the :mod:`monai_adv.attacks` core: array (FGSM, InvFGSM) and dictionary forms."""

from monai_adv.transforms.array import FGSM, GradientSign, InvFGSM
from monai_adv.transforms.dictionary import (
    FGSMD,
    FGSMd,
    FGSMDict,
    GradientSignd,
    InvFGSMD,
    InvFGSMd,
    InvFGSMDict,
)

__all__ = [
    "FGSM",
    "FGSMD",
    "FGSMDict",
    "FGSMd",
    "GradientSign",
    "GradientSignd",
    "InvFGSM",
    "InvFGSMD",
    "InvFGSMDict",
    "InvFGSMd",
]
