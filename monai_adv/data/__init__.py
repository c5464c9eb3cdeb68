"""Data for the bundle: checked datalists from folders or JSON, a file-naming loader, and the generated default dataset."""

from monai_adv.data.checks import ImageHeader, check_datalist, has_foreground, read_fully, read_header
from monai_adv.data.datalist import (
    IMAGE_SUFFIXES,
    binarize_mask,
    datalist_from_folders,
    image_datalist,
    load_datalist,
    split_datalist,
)
from monai_adv.data.loading import CheckedLoadImageD, CheckedLoadImaged, CheckedLoadImageDict
from monai_adv.data.synthetic import ensure_synthetic_dataset, make_synthetic_dataset

__all__ = [
    "IMAGE_SUFFIXES",
    "CheckedLoadImageD",
    "CheckedLoadImageDict",
    "CheckedLoadImaged",
    "ImageHeader",
    "binarize_mask",
    "check_datalist",
    "datalist_from_folders",
    "ensure_synthetic_dataset",
    "has_foreground",
    "image_datalist",
    "load_datalist",
    "make_synthetic_dataset",
    "read_fully",
    "read_header",
    "split_datalist",
]
