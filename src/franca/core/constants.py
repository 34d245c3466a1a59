"""Constants shared across franca, defined once.

``IMAGENET_MEAN`` and ``IMAGENET_STD`` are the per-channel RGB normalisation of inputs in [0, 1] that every Franca and
DINOv2 release was trained with (and that franca's training and evaluation transforms use); the model registry
(:mod:`franca.models.registry`) records them for each set of weights.
"""

from __future__ import annotations

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
