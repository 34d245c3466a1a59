"""Data: reading images robustly, data sets and samplers, and the multi-crop / evaluation augmentations.

Names are imported lazily so that ``import franca.data`` costs no more than torch and PIL (torchvision, used by the
augmentations, and webdataset are only imported when needed).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "IMAGE_EXTENSIONS": "franca.data.images",
    "TRANSPARENT_BACKGROUND": "franca.data.images",
    "Batch": "franca.data.images",
    "ImageFileDataset": "franca.data.images",
    "SkipCounter": "franca.data.images",
    "UnreadableImageError": "franca.data.images",
    "collate_skip_none": "franca.data.images",
    "decode_image": "franca.data.images",
    "list_images": "franca.data.images",
    "load_image": "franca.data.images",
    "ImageFolderDataset": "franca.data.datasets",
    "InfiniteSampler": "franca.data.datasets",
    "WebDatasetImages": "franca.data.datasets",
    "build_unlabeled_dataset": "franca.data.datasets",
    "MultiCropAugmentation": "franca.data.augmentations",
    "eval_transform": "franca.data.augmentations",
    "IMAGENET_MEAN": "franca.data.augmentations",
    "IMAGENET_STD": "franca.data.augmentations",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'franca.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
