"""``python -m monai_adv.reproduce``: the paper's experiments on public data, from one command.

See :func:`monai_adv.reproduce.__main__.main` and ``docs/robustness.md``.
"""

from monai_adv.reproduce.pipeline import ARMS, Reproduction, paper_epochs
from monai_adv.reproduce.profiles import PROFILES, Profile

__all__ = ["ARMS", "PROFILES", "Profile", "Reproduction", "paper_epochs"]
