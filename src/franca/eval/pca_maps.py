"""PCA visualisations of patch features (the DINOv2 / Franca figures).

The patch tokens of all shown images are pooled and their first three principal components, fitted jointly (so the
colours mean the same thing in every image), become RGB after min-max normalisation of each component to [0, 1].
With a ``foreground_threshold`` the DINOv2 demo's recipe is followed: the first component is min-max normalised,
patches above the threshold (below with ``invert_foreground``: the sign of a principal component is arbitrary) are
foreground, the PCA is refitted on the foreground patches only and the background is drawn black. Maps are
upsampled with nearest neighbour to the image size and saved as a PNG grid, one row per image: the (resized) image,
then its map.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from franca.core.errors import DataError

DEFAULT_MARGIN = 4
MIN_FOREGROUND_PATCHES = 3


def _principal_components(features: np.ndarray, count: int) -> np.ndarray:
    """Projections [N, count] of features [N, D] on their first principal components (zeros where undefined)."""
    from sklearn.decomposition import PCA

    usable = min(count, features.shape[1], features.shape[0])
    projected = np.zeros((features.shape[0], count), dtype=np.float64)
    if usable > 0 and features.shape[0] > 1:
        projected[:, :usable] = PCA(n_components=usable, svd_solver="full").fit_transform(features)
    return projected


def _minmax(values: np.ndarray) -> np.ndarray:
    """Min-max normalise each column to [0, 1] (a constant column becomes 0)."""
    low = values.min(axis=0, keepdims=True)
    span = values.max(axis=0, keepdims=True) - low
    return (values - low) / np.where(span > 0, span, 1.0)


def pca_rgb(
    features: Tensor | np.ndarray, foreground_threshold: float | None = None, invert_foreground: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(colours [N, 3] in [0, 1], foreground mask [N] bool) of patch features [N, D] (see the module docstring).

    Without a threshold every patch is foreground. With one, when fewer than 3 patches pass it the threshold is
    ignored (with a warning) rather than drawing an empty map.
    """
    data = features.detach().float().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    data = data.astype(np.float64)
    foreground = np.ones(data.shape[0], dtype=bool)
    if foreground_threshold is not None:
        first = _minmax(_principal_components(data, 1))[:, 0]
        foreground = first < foreground_threshold if invert_foreground else first > foreground_threshold
        if foreground.sum() < MIN_FOREGROUND_PATCHES:
            warnings.warn(
                f"only {int(foreground.sum())} patches pass the foreground threshold {foreground_threshold}; "
                "showing all patches (try another threshold or --invert-foreground)",
                stacklevel=2,
            )
            foreground = np.ones(data.shape[0], dtype=bool)
    colours = np.zeros((data.shape[0], 3), dtype=np.float64)
    colours[foreground] = _minmax(_principal_components(data[foreground], 3))
    return colours, foreground


def compose_grid(
    images: Sequence[Image.Image], maps: Sequence[Image.Image], margin: int = DEFAULT_MARGIN
) -> Image.Image:
    """One row per image, [image | map], on a white canvas with ``margin`` px around and between the tiles.

    All tiles must share one size S x S; the grid is (2S + 3 margin) wide and (n S + (n + 1) margin) high.
    """
    if not images or len(images) != len(maps):
        raise ValueError("need as many maps as images, and at least one")
    width, height = images[0].size
    canvas = Image.new(
        "RGB", (2 * width + 3 * margin, len(images) * height + (len(images) + 1) * margin), "white"
    )
    for row, (image, feature_map) in enumerate(zip(images, maps)):
        top = margin + row * (height + margin)
        canvas.paste(image.convert("RGB"), (margin, top))
        canvas.paste(feature_map.convert("RGB"), (2 * margin + width, top))
    return canvas


def _prepare(image: Image.Image, size: int, resize_mode: str) -> tuple[Image.Image, Tensor]:
    """(displayed S x S RGB image, normalised tensor [3, S, S]) with the evaluation resize / crop."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from franca.eval.segmentation_data import IMAGENET_MEAN, IMAGENET_STD

    tensor = TF.pil_to_tensor(image)
    if resize_mode == "crop":
        tensor = TF.center_crop(
            TF.resize(tensor, size, InterpolationMode.BILINEAR, antialias=True), [size, size]
        )
    else:
        tensor = TF.resize(tensor, [size, size], InterpolationMode.BILINEAR, antialias=True)
    shown = Image.fromarray(tensor.permute(1, 2, 0).numpy())
    normalised = TF.normalize(tensor.float() / 255.0, list(IMAGENET_MEAN), list(IMAGENET_STD))
    return shown, normalised


@torch.no_grad()
def pca_feature_maps(
    model: nn.Module,
    images: Sequence[str | os.PathLike | Image.Image],
    size: int = 224,
    foreground_threshold: float | None = None,
    invert_foreground: bool = False,
    tokens: str = "auto",
    device: torch.device | None = None,
    resize_mode: str = "resize",
    batch_size: int = 8,
    margin: int = DEFAULT_MARGIN,
) -> Image.Image:
    """PNG-ready grid (PIL RGB image) of each image beside the RGB map of its patch features' first 3 components.

    ``images`` are paths or PIL images; unreadable paths are skipped with a warning (DataError when none is left).
    The number of images shown and skipped is stored in ``grid.info["num_images"]`` / ``["num_skipped"]``.
    """
    from franca.data.images import UnreadableImageError, load_image
    from franca.eval.common import check_input_size
    from franca.eval.dense_features import extract_patch_grid

    check_input_size(size, int(model.patch_size))
    device = device or next(model.parameters()).device
    shown, tensors, skipped = [], [], 0
    for item in images:
        try:
            image = item.convert("RGB") if isinstance(item, Image.Image) else load_image(item)
        except UnreadableImageError as error:
            warnings.warn(f"skipping unreadable image: {error}", stacklevel=2)
            skipped += 1
            continue
        display, tensor = _prepare(image, size, resize_mode)
        shown.append(display)
        tensors.append(tensor)
    if not tensors:
        raise DataError(f"none of the {len(images)} images could be read; nothing to show")
    grids = [
        extract_patch_grid(model, torch.stack(tensors[start : start + batch_size]).to(device), tokens).cpu()
        for start in range(0, len(tensors), batch_size)
    ]
    features = torch.cat(grids)
    count, rows, cols, dim = features.shape
    colours, _ = pca_rgb(features.reshape(-1, dim), foreground_threshold, invert_foreground)
    colours = (colours.reshape(count, rows, cols, 3) * 255.0).round().astype(np.uint8)
    maps = [Image.fromarray(colour).resize((size, size), Image.Resampling.NEAREST) for colour in colours]
    grid = compose_grid(shown, maps, margin)
    grid.info["num_images"] = len(shown)
    grid.info["num_skipped"] = skipped
    return grid


def save_pca_maps(
    model: nn.Module,
    images: Sequence[str | os.PathLike | Image.Image],
    output_dir: str | os.PathLike,
    filename: str = "pca_maps.png",
    **kwargs: Any,
) -> Path:
    """Write :func:`pca_feature_maps` as ``output_dir/filename`` (PNG) and return the path."""
    return save_grid(pca_feature_maps(model, images, **kwargs), output_dir, filename)


def save_grid(grid: Image.Image, output_dir: str | os.PathLike, filename: str = "pca_maps.png") -> Path:
    """Save a grid image as PNG in ``output_dir`` (created if needed); returns the path."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    grid.save(path, format="PNG")
    return path


def evaluate_pca(
    model: nn.Module,
    images: Sequence[str | os.PathLike | Image.Image],
    output_dir: str | os.PathLike,
    filename: str = "pca_maps.png",
    size: int = 224,
    foreground_threshold: float | None = None,
    invert_foreground: bool = False,
    tokens: str = "auto",
    device: torch.device | None = None,
    resize_mode: str = "resize",
    batch_size: int = 8,
) -> dict[str, Any]:
    """Draw the PCA maps of ``images`` (:func:`pca_feature_maps`), save them as ``output_dir/filename``.

    Returns ``{"protocol": "pca", "grid" (the PNG's path), "num_images", "num_skipped", "size",
    "foreground_threshold"}``.
    """
    grid = pca_feature_maps(
        model,
        images,
        size=size,
        foreground_threshold=foreground_threshold,
        invert_foreground=invert_foreground,
        tokens=tokens,
        device=device,
        resize_mode=resize_mode,
        batch_size=batch_size,
    )
    path = save_grid(grid, output_dir, filename)
    return {
        "protocol": "pca",
        "grid": str(path),
        "num_images": grid.info["num_images"],
        "num_skipped": grid.info["num_skipped"],
        "size": size,
        "foreground_threshold": foreground_threshold,
    }
