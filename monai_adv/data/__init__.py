"""Data for the bundle: checked datalists from folders or JSON, a file-naming loader, and the generated default dataset."""

from monai_adv.data.augmentation import AUGMENTATIONS, training_augmentation
from monai_adv.data.checks import (
    MAX_CLIPPED_FRACTION,
    ImageHeader,
    ValueStats,
    check_datalist,
    exif_orientation,
    has_foreground,
    read_fully,
    read_header,
    read_values,
)
from monai_adv.data.datalist import (
    IMAGE_SUFFIXES,
    MaskToLabels,
    binarize_mask,
    datalist_from_folders,
    dataset_items,
    decathlon_items,
    image_datalist,
    load_datalist,
    split_by_file,
    split_datalist,
)
from monai_adv.data.loading import CheckedLoadImageD, CheckedLoadImaged, CheckedLoadImageDict
from monai_adv.data.synthetic import ensure_synthetic_dataset, make_synthetic_dataset
from monai_adv.data.volumes import ZScored, volume_patches, volume_preprocessing

__all__ = [
    "AUGMENTATIONS",
    "IMAGE_SUFFIXES",
    "MAX_CLIPPED_FRACTION",
    "CheckedLoadImageD",
    "CheckedLoadImageDict",
    "CheckedLoadImaged",
    "ImageHeader",
    "MaskToLabels",
    "ValueStats",
    "ZScored",
    "binarize_mask",
    "check_datalist",
    "datalist_from_folders",
    "dataset_items",
    "decathlon_items",
    "ensure_synthetic_dataset",
    "exif_orientation",
    "has_foreground",
    "image_datalist",
    "load_datalist",
    "make_synthetic_dataset",
    "read_fully",
    "read_header",
    "read_values",
    "split_by_file",
    "split_datalist",
    "training_augmentation",
    "volume_patches",
    "volume_preprocessing",
]
