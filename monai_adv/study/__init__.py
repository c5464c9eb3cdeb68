"""Studies: named arms of bundle overrides, run for several seeds, evaluated with ``run robustness``, and a page.

``python -m monai_adv.study STUDY.json --seeds 0 1 2 --output OUT``; see :mod:`monai_adv.study.__main__`.
"""

from monai_adv.study.report import choose_default, paired_bootstrap, plateau_epoch, summarize, write_study_report
from monai_adv.study.runner import StudyRunner, find_bundle_dir
from monai_adv.study.spec import STUDIES_DIR, Arm, StudySpec, load_study

__all__ = [
    "STUDIES_DIR",
    "Arm",
    "StudyRunner",
    "StudySpec",
    "choose_default",
    "find_bundle_dir",
    "load_study",
    "paired_bootstrap",
    "plateau_epoch",
    "summarize",
    "write_study_report",
]
