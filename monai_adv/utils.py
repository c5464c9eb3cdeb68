"""Former home of the bundle helpers, now in :mod:`monai_adv.bundle`; kept while ``monai_adv/__init__.py`` imports it.

``select`` and ``as_bool`` are gone: the configs use ``monai.utils.look_up_option`` and ``monai.utils.str2bool``.
"""

from monai_adv.bundle.checkpoints import latest_checkpoint, require_file

__all__ = ["latest_checkpoint", "require_file"]
