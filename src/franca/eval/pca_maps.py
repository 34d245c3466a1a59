"""PCA visualisations of patch features (the DINOv2 / Franca figures).

The patch tokens of all shown images are pooled and their first three principal components, fitted jointly (so the
colours mean the same thing in every image), become RGB after min-max normalisation of each component to [0, 1].
With a ``foreground_threshold`` the DINOv2 demo's recipe is followed: the first component is min-max normalised,
patches above the threshold (below with ``invert_foreground``: the sign of a principal component is arbitrary) are
foreground, the PCA is refitted on the foreground patches only and the background is drawn black. Maps are
upsampled with nearest neighbour to the image size and saved as a PNG grid, one row per image: the (resized) image,
then its map. The principal components are scikit-learn's (:func:`franca.eval.metrics.pca_scores`).

:class:`PcaSettings` holds the settings, :func:`score_pca` turns patch grids into :class:`PcaMaps` (pure), and
:func:`evaluate_pca` reads images, extracts their patch features with :mod:`franca.features`, draws the grid and saves
it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from franca.core.errors import ConfigError, DataError, check_choice
from franca.data.images import UnreadableImageError, load_image
from franca.eval.common import check_input_size, model_device
from franca.eval.metrics import pca_scores
from franca.eval.segmentation_data import RESIZE_MODES, TOKEN_CHOICES, patch_token, resize_square
from franca.features import TensorImages, extract_features

DEFAULT_MARGIN = 4
MIN_FOREGROUND_PATCHES = 3


def _principal_components(features: np.ndarray, count: int) -> np.ndarray:
    """Projections [N, count] (float64) of features [N, D] on their first principal components (zeros where
    undefined: fewer components than ``count``, or fewer than 2 rows)."""
    projected = np.zeros((features.shape[0], count), dtype=np.float64)
    scores = pca_scores(features, count)
    projected[:, : scores.shape[1]] = scores
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


@dataclass(frozen=True)
class PcaSettings:
    """Settings of the PCA maps: the image side ``size`` (a multiple of the patch size), the optional
    ``foreground_threshold`` (and ``invert_foreground``), ``tokens`` (``auto`` / ``patch`` / ``rasa``, see
    :func:`~franca.eval.segmentation_data.patch_token`), ``resize_mode`` (``resize`` / ``crop``) and the grid's
    ``margin`` in pixels."""

    size: int = 224
    foreground_threshold: float | None = None
    invert_foreground: bool = False
    tokens: str = "auto"
    resize_mode: str = "resize"
    margin: int = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"--size must be positive (got {self.size})")
        check_choice("--resize-mode", self.resize_mode, RESIZE_MODES)
        check_choice("--tokens", self.tokens, TOKEN_CHOICES)


@dataclass(frozen=True)
class PcaMaps:
    """The maps of N images: ``colours`` [N, h, w, 3] uint8 and ``foreground`` [N, h, w] bool."""

    colours: np.ndarray
    foreground: np.ndarray

    def images(self, size: int) -> list[Image.Image]:
        """Each map as a ``size`` x ``size`` RGB image, upsampled with nearest neighbour (one flat block a patch)."""
        return [
            Image.fromarray(colour).resize((size, size), Image.Resampling.NEAREST) for colour in self.colours
        ]


def score_pca(patch: Tensor | np.ndarray, settings: PcaSettings | None = None) -> PcaMaps:
    """The PCA maps of patch grids [N, h, w, D]: the first three principal components of all their patches, fitted
    jointly, as RGB (see the module docstring); ``settings`` gives the foreground threshold."""
    settings = settings if settings is not None else PcaSettings()
    count, rows, cols, dim = patch.shape
    colours, foreground = pca_rgb(
        patch.reshape(-1, dim), settings.foreground_threshold, settings.invert_foreground
    )
    colours = (colours.reshape(count, rows, cols, 3) * 255.0).round().astype(np.uint8)
    return PcaMaps(colours, foreground.reshape(count, rows, cols))


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


def _read_images(
    images: Sequence[str | os.PathLike | Image.Image], size: int, resize_mode: str
) -> tuple[Tensor, int]:
    """(the readable images resized to S x S as uint8 [n, 3, S, S], the number of unreadable ones skipped with a
    warning); DataError when none is readable."""
    tensors, skipped = [], 0
    for item in images:
        try:
            image = item.convert("RGB") if isinstance(item, Image.Image) else load_image(item)
        except UnreadableImageError as error:
            warnings.warn(f"skipping unreadable image: {error}", stacklevel=3)
            skipped += 1
            continue
        tensors.append(resize_square(TF.pil_to_tensor(image), size, resize_mode))
    if not tensors:
        raise DataError(f"none of the {len(images)} images could be read; nothing to show")
    return torch.stack(tensors), skipped


@torch.no_grad()
def pca_feature_maps(
    model: nn.Module,
    images: Sequence[str | os.PathLike | Image.Image],
    settings: PcaSettings | None = None,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Image.Image:
    """PNG-ready grid (PIL RGB image) of each image beside the RGB map of its patch features' first 3 components.

    ``images`` are paths or PIL images; unreadable paths are skipped with a warning (DataError when none is left).
    The number of images shown and skipped is stored in ``grid.info["num_images"]`` / ``["num_skipped"]``.
    """
    settings = settings if settings is not None else PcaSettings()
    check_input_size(settings.size, int(model.patch_size))
    pixels, skipped = _read_images(images, settings.size, settings.resize_mode)
    token = patch_token(model, settings.tokens)
    features = extract_features(
        model,
        TensorImages(pixels, batch_size=batch_size),
        (token,),
        model_device(model, device),
        desc="pca",
        progress=progress,
    )
    maps = score_pca(features[token], settings).images(settings.size)
    shown = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels]
    grid = compose_grid(shown, maps, settings.margin)
    grid.info["num_images"] = len(shown)
    grid.info["num_skipped"] = skipped
    return grid


def save_grid(grid: Image.Image, output_dir: str | os.PathLike, filename: str = "pca_maps.png") -> Path:
    """Save a grid image as PNG in ``output_dir`` (created if needed); returns the path."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    grid.save(path, format="PNG")
    return path


@dataclass(frozen=True)
class PcaResult:
    """What :func:`evaluate_pca` wrote: the PNG grid's path, the images shown and skipped, the side and threshold."""

    grid: Path
    num_images: int
    num_skipped: int
    size: int
    foreground_threshold: float | None

    def to_dict(self) -> dict[str, Any]:
        """``{"protocol": "pca", "grid", "num_images", "num_skipped", "size", "foreground_threshold"}``."""
        return {
            "protocol": "pca",
            "grid": str(self.grid),
            "num_images": self.num_images,
            "num_skipped": self.num_skipped,
            "size": self.size,
            "foreground_threshold": self.foreground_threshold,
        }


def evaluate_pca(
    model: nn.Module,
    images: Sequence[str | os.PathLike | Image.Image],
    output_dir: str | os.PathLike,
    settings: PcaSettings | None = None,
    *,
    filename: str = "pca_maps.png",
    device: torch.device | str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> PcaResult:
    """Draw the PCA maps of ``images`` (:func:`pca_feature_maps`) and save them as ``output_dir/filename`` (PNG)."""
    settings = settings if settings is not None else PcaSettings()
    grid = pca_feature_maps(model, images, settings, device=device, batch_size=batch_size, progress=progress)
    path = save_grid(grid, output_dir, filename)
    return PcaResult(
        path, grid.info["num_images"], grid.info["num_skipped"], settings.size, settings.foreground_threshold
    )
