"""The profiles of the reproduction and the studies (defined in :mod:`monai_adv.study.profiles`)."""

from monai_adv.study.profiles import PROFILES, Profile

__all__ = ["PROFILES", "Profile"]
