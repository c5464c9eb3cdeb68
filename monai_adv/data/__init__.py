"""Data for the bundle: datalists from folders or JSON, and the generated default dataset."""

from monai_adv.data.datalist import (
    IMAGE_SUFFIXES,
    binarize_mask,
    datalist_from_folders,
    image_datalist,
    load_datalist,
    split_datalist,
)
from monai_adv.data.synthetic import ensure_synthetic_dataset, make_synthetic_dataset

__all__ = [
    "IMAGE_SUFFIXES",
    "binarize_mask",
    "datalist_from_folders",
    "ensure_synthetic_dataset",
    "image_datalist",
    "load_datalist",
    "make_synthetic_dataset",
    "split_datalist",
]
