"""Helpers the bundle configs call (``bundles/adversarial_unet_segmentation/configs/*.json``).

Not part of the augmentation library: they keep one bundle root's training state safe.

- :mod:`monai_adv.bundle.checkpoints`: atomic checkpoint writing, finding a readable checkpoint to resume
  from, checking input files.
- :mod:`monai_adv.bundle.settings`: checks of command-line settings (``--image_size``).
- :mod:`monai_adv.bundle.training_run`: the identity of a training (one MLflow run each), the lock that keeps
  two trainings out of one bundle root, and the adversarial parameters handed to MLflow.
- :mod:`monai_adv.bundle.metrics`: class names (from ``dataset.json``) and IoU/Dice handlers per class.
- :mod:`monai_adv.bundle.random_states`: the random states a checkpoint keeps, so that a resumed training draws
  what an uninterrupted one would.
- :mod:`monai_adv.bundle.history`: what a training cost and measured per epoch, in ``training_history.json``.
- :mod:`monai_adv.bundle.tracking`: MLflow tracking that cannot hang a training, and the best model logged into
  the training's run as an MLflow model.
"""

from monai_adv.bundle.checkpoints import (
    AtomicCheckpointSaver,
    KeepPreviousDiskSaver,
    check_checkpoint_fits,
    checkpoint_entries,
    latest_checkpoint,
    require_file,
)
from monai_adv.bundle.guards import StopOnNonFiniteLoss
from monai_adv.bundle.history import TrainingHistory
from monai_adv.bundle.locks import FolderLock
from monai_adv.bundle.metrics import class_names, per_class_metrics
from monai_adv.bundle.random_states import RandomStates
from monai_adv.bundle.settings import (
    ADV_METHODS,
    check_settings,
    intensity_range,
    intensity_scaling,
    memory_format,
    spatial_size,
)
from monai_adv.bundle.tracking import TrackingGuard, bound_http_retries, check_tracking_server, log_best_model
from monai_adv.bundle.training_run import TrainingRun, check_mlflow_handlers, prepare_mlflow_handlers

__all__ = [
    "ADV_METHODS",
    "AtomicCheckpointSaver",
    "FolderLock",
    "KeepPreviousDiskSaver",
    "RandomStates",
    "StopOnNonFiniteLoss",
    "TrackingGuard",
    "TrainingHistory",
    "TrainingRun",
    "bound_http_retries",
    "check_checkpoint_fits",
    "check_mlflow_handlers",
    "check_settings",
    "check_tracking_server",
    "checkpoint_entries",
    "class_names",
    "intensity_range",
    "intensity_scaling",
    "latest_checkpoint",
    "log_best_model",
    "memory_format",
    "per_class_metrics",
    "prepare_mlflow_handlers",
    "require_file",
    "spatial_size",
]
