"""RASA: Removal of Absolute Spatial Attributes, a post-training step on a frozen backbone.

RASA finds the directions of the final-norm patch tokens that linearly encode the absolute patch position and
projects them out ([P] section 2.3, method notes section 5). Iteration t = 0 ... T-1:

1. apply all previous removal steps to the frozen features z;
2. train a fresh bias-free ``nn.Linear(D, 2)`` W_t (default init, AdamW without weight decay, cosine LR to 0) to
   regress the normalised grid coordinates y = (row/(h-1), col/(w-1)) of the *output* grid with the loss
   MSE(sigmoid(W_t z), y);
3. with r, c the rows of W_t: u_r = r/|r|, u_c = Gram-Schmidt(c/|c| against u_r), normalised, and
   z <- (I - u_r u_r^T - u_c u_c^T) z (the paper's Eq. 3 has a sign typo, "+ u_c u_c^T").

Every step is a fixed linear map L_t = I - P_t (a symmetric matrix), so the whole head folds into one [D, D] matrix
L = L_{T-1} ... L_0. For column vectors z_rasa = L z; for the row-vector batches [..., D] used everywhere in this
project that is ``z_rasa = z @ L.T``, exactly what :meth:`DinoVisionTransformer.set_rasa` applies to
``x_norm_patchtokens``. The product of projectors is linear but in general not an orthogonal projector: a new W_t
keeps its random initial weights along directions already removed (no gradient reaches them), so u_r and u_c are not
exactly orthogonal to the earlier ones. This is the official behaviour and is the default.

A consequence worth knowing (measured by the closed-form metric of :func:`train_rasa`): after the first step the
features lie in a (D-2)-dimensional subspace, and the kernel of every later step is tilted out of it by those
untrained init components, so every later step is *injective* on the data. The folded L then has rank D-2 whatever T
is: only the first step destroys linear position information, the later ones shrink it (which is what the trained
predictors' falling MSE shows) but a linear read-out can still recover it. ``orthogonal_steps=True`` drops the rows'
components along directions already removed before each removal, so each step removes two new dimensions and L is
the orthogonal projector of rank D-2T; the stored head keeps the official format and layout.

RASA is a post-training step over features: :func:`train_rasa` takes patch features (a
:class:`franca.features.Features`, a tensor [M, N, D] with its grid, or batches of them) or, with a backbone, a
loader of images whose patch tokens :mod:`franca.features` extracts (fp32, no autocast). The removal maps and the
official head files (read, write, fold) live in :mod:`franca.models.rasa`, beside the backbone that applies them; this
module trains the steps, and builds the loaders and writes the files of a run on image files (``franca rasa``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from franca.core.constants import IMAGENET_MEAN, IMAGENET_STD
from franca.core.errors import ConfigError, DataError
from franca.core.io import atomic_write_text
from franca.core.progress import ProgressBar
from franca.core.runtime import resolve_device
from franca.data.images import ImageFileDataset, SkipCounter, collate_skip_none
from franca.features import Features, extract_features, iterate_features
from franca.models.checkpoints import save_backbone
from franca.models.rasa import (
    complement_projector,
    fold_rasa,
    position_targets,
    removal_basis,
    remove_directions,
    save_rasa_head,
)
from franca.models.vision_transformer import DinoVisionTransformer

logger = logging.getLogger(__name__)

# The official RASA training transform normalises with std (0.229, 0.224, 0.255), a typo for ImageNet's 0.225
# (its own validation transform uses 0.225). We use the correct value, IMAGENET_STD.
# Relative ridge used by the closed-form position regression so that directions whose variance is only float
# rounding noise (what remains of removed directions) carry no weight; see _LinearFitStats.
_RIDGE = 1e-10

Grid = tuple[int, int]

# ----------------------------------------------------------------------------------------------------------------
# Augmentations
# ----------------------------------------------------------------------------------------------------------------


def rasa_transform(size: int) -> Callable[[Any], Tensor]:
    """The RASA training augmentation ([R] train_rasa.py), PIL image or tensor -> normalised float [3, size, size].

    RandomResizedCrop(size, scale 0.25-1), ColorJitter(0.32, 0.32, 0.32, 0.08) with p=0.8, grayscale p=0.2,
    Gaussian blur sigma in [0.1, 2] with p=0.5, horizontal and vertical flips p=0.5 each, RandomRotation(+-90 deg,
    nearest, fill 0) with p=0.5, then ImageNet normalisation with the correct std (0.229, 0.224, 0.225).
    """
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.RandomResizedCrop((size, size), scale=(0.25, 1.0), antialias=True),
            v2.RandomApply([v2.ColorJitter(0.32, 0.32, 0.32, 0.08)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            # sigma is in pixels as in the official PIL blur; 13 taps cover +-3 sigma at the largest sigma
            v2.RandomApply([v2.GaussianBlur(kernel_size=13, sigma=(0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomVerticalFlip(p=0.5),
            v2.RandomApply(
                [v2.RandomRotation(90, interpolation=v2.InterpolationMode.NEAREST, fill=0)], p=0.5
            ),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def rasa_eval_transform(size: int) -> Callable[[Any], Tensor]:
    """The deterministic evaluation transform of the official RASA code: resize to size x size, ImageNet normalisation."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.Resize((size, size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# ----------------------------------------------------------------------------------------------------------------
# Feature sources
# ----------------------------------------------------------------------------------------------------------------


def _square_grid(num_tokens: int) -> Grid:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ConfigError(f"{num_tokens} patch tokens do not form a square grid; pass grid=(rows, cols)")
    return side, side


class _FeatureSource:
    """Patch features [B, N, D] with their grid, with all removal steps so far applied."""

    num_items: int
    dim: int

    @property
    def skipped(self) -> int:
        """Unreadable images dropped while extracting the features (the last complete pass when streamed)."""
        return 0

    def num_batches(self, batch_size: int) -> int:
        raise NotImplementedError

    def batches(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device
    ) -> Iterator[tuple[Tensor, Grid]]:
        raise NotImplementedError

    def remove(self, basis: Tensor) -> None:
        """Apply one more removal step, given by its orthonormal basis [k, D]."""
        raise NotImplementedError


class _CachedFeatures(_FeatureSource):
    """Features held in CPU memory [M, N, D]; removals are applied to them in place (the iterative path)."""

    def __init__(self, features: Tensor, grid: Grid, skipped: int = 0) -> None:
        self.features = features
        self.grid = grid
        self.num_items, self.dim = features.shape[0], features.shape[-1]
        self._skipped = skipped

    @property
    def skipped(self) -> int:
        return self._skipped

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(self.num_items / batch_size)

    def batches(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device
    ) -> Iterator[tuple[Tensor, Grid]]:
        order = torch.randperm(self.num_items, generator=generator) if generator is not None else None
        for start in range(0, self.num_items, batch_size):
            chunk = (
                self.features[start : start + batch_size]
                if order is None
                else self.features[order[start : start + batch_size]]
            )
            yield chunk.to(device, non_blocking=True), self.grid

    def remove(self, basis: Tensor) -> None:
        basis = basis.to("cpu", self.features.dtype)
        for start in range(0, self.num_items, 256):
            chunk = self.features[start : start + 256]
            chunk.copy_(remove_directions(chunk, basis))


class _StreamedFeatures(_FeatureSource):
    """Features produced afresh on each pass (re-augmented images); removals are applied as the folded matrix."""

    def __init__(
        self, produce: Callable[[], Iterable[tuple[Tensor, Grid]]], num_items: int, num_batches: int, dim: int
    ) -> None:
        self.produce = produce
        self.num_items, self.dim = num_items, dim
        self._num_batches = num_batches
        self.matrix = torch.eye(dim, dtype=torch.float64)

    @property
    def skipped(self) -> int:
        return int(getattr(self.produce, "skipped", 0))

    def num_batches(self, batch_size: int) -> int:
        return self._num_batches

    def batches(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device
    ) -> Iterator[tuple[Tensor, Grid]]:
        matrix = self.matrix.to(device, torch.float32)
        for features, grid in self.produce():
            yield features.to(device, torch.float32) @ matrix.T, grid

    def remove(self, basis: Tensor) -> None:
        self.matrix = complement_projector(basis.to("cpu", torch.float64)) @ self.matrix


class _ImagePasses:
    """One pass of an image loader through the frozen backbone per call (fp32, no autocast), yielding the patch
    tokens [B, h*w, D] of each batch with their grid (h, w); ``skipped`` counts the unreadable images of the last
    complete pass."""

    def __init__(
        self, model: nn.Module, loader: Iterable[Any], device: torch.device, desc: str, progress: bool
    ) -> None:
        self.model, self.loader, self.device, self.desc, self.progress = model, loader, device, desc, progress
        self.skipped = 0

    def __call__(self) -> Iterator[tuple[Tensor, Grid]]:
        counter = SkipCounter()
        stream = iterate_features(
            self.model,
            self.loader,
            ("patch",),
            self.device,
            autocast=False,
            counter=counter,
            desc=self.desc,
            progress=self.progress,
        )
        for tokens, _ in stream:
            patch = tokens["patch"]  # [B, h, w, D]
            yield patch.flatten(1, 2), (int(patch.shape[1]), int(patch.shape[2]))
        self.skipped = counter.num_skipped


def _from_features(features: Features, grid: Grid | None, what: str, copy: bool) -> _CachedFeatures:
    """The patch tokens of ``features`` [M, h, w, D] as a cache [M, h*w, D] (a copy when ``copy``: removals are
    applied in place)."""
    patch = features["patch"]
    if grid is not None and tuple(grid) != features.grid:
        raise ConfigError(f"{what}: grid={tuple(grid)} but the features' patch grid is {features.grid}")
    patch = patch.detach().to("cpu", torch.float32).flatten(1, 2)
    return _CachedFeatures(patch.clone() if copy else patch, features.grid, skipped=features.num_skipped)


def _image_source(
    model: nn.Module,
    loader: Any,
    *,
    cache: bool,
    device: torch.device,
    batch_size: int,
    what: str,
    progress: bool,
) -> _FeatureSource:
    """The patch tokens of a loader of images: extracted once (``cache``) or afresh on every pass."""
    desc = f"RASA features ({what})"
    if cache:
        features = extract_features(
            model, loader, ("patch",), device, autocast=False, desc=desc, progress=progress
        )
        return _from_features(features, None, what, copy=False)
    if not hasattr(loader, "__len__"):
        raise ConfigError(
            f"{what}: streaming features (no cache) needs a loader with a length, e.g. a DataLoader"
        )
    num_items = len(loader.dataset) if hasattr(loader, "dataset") else len(loader) * batch_size
    return _StreamedFeatures(
        _ImagePasses(model, loader, device, desc, progress), num_items, len(loader), int(model.embed_dim)
    )


def _with_grid(features: Any, grid: Grid | None, what: str) -> tuple[Tensor, Grid]:
    """A feature batch [B, N, D] with its grid (``grid``, else square); DataError for anything else."""
    if not isinstance(features, Tensor) or features.ndim != 3:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise DataError(f"{what}: feature batches must be tensors [B, N, D], got {shape}")
    return features, grid or _square_grid(features.shape[1])


def _cache(stream: Iterable[tuple[Tensor, Grid]], what: str) -> _CachedFeatures:
    """Feature batches [B, N, D] with their grids, concatenated on the CPU; DataError when the grids differ."""
    chunks: list[Tensor] = []
    grid: Grid | None = None
    for features, batch_grid in stream:
        if grid is not None and batch_grid != grid:
            raise DataError(
                f"{what}: batches have different patch grids {grid} and {batch_grid}; use one image size"
            )
        grid = batch_grid
        chunks.append(features.detach().to("cpu", torch.float32))
    if grid is None:
        raise DataError(f"{what}: no features; the data set is empty or every image failed to load")
    return _CachedFeatures(torch.cat(chunks), grid)


def _given_source(data: Any, *, grid: Grid | None, cache: bool, what: str) -> _FeatureSource:
    """Precomputed patch features: a :class:`Features`, a tensor [M, N, D] or an iterable of batches [B, N, D].

    A :class:`Features` or a tensor is copied into a cache; batches are cached, or kept and replayed on every pass.
    """
    if isinstance(data, Features):
        return _from_features(data, grid, what, copy=True)
    if isinstance(data, Tensor):
        features, feature_grid = _with_grid(data, grid, what)
        return _CachedFeatures(features.detach().to("cpu", torch.float32).clone(), feature_grid)
    if cache:
        return _cache((_with_grid(f, grid, what) for f in data), what)
    if iter(data) is data or not hasattr(data, "__len__") or len(data) == 0:
        raise ConfigError(
            f"{what}: streaming features (no cache) needs a non-empty list of [B, N, D] batches"
        )
    batches = [_with_grid(f, grid, what) for f in data]
    return _StreamedFeatures(
        lambda: iter(batches), sum(f.shape[0] for f, _ in batches), len(batches), batches[0][0].shape[-1]
    )


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


class _LinearFitStats:
    """Streaming sufficient statistics of a least-squares fit with bias, z [n, D] -> y [n, 2], in float64.

    Holds X^T X and X^T Y for X = [z, 1], plus the sums of y and y^2, so that a fit on one set and its residual on
    another follow exactly without keeping the features.
    """

    def __init__(self, dim: int, device: torch.device) -> None:
        self.gram = torch.zeros(dim + 1, dim + 1, dtype=torch.float64, device=device)
        self.cross = torch.zeros(dim + 1, 2, dtype=torch.float64, device=device)
        self.y_sum = torch.zeros(2, dtype=torch.float64, device=device)
        self.y_sq = torch.zeros(2, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, z: Tensor, y: Tensor) -> None:
        x = torch.cat(
            [z.to(torch.float64), torch.ones(z.shape[0], 1, dtype=torch.float64, device=z.device)], dim=1
        )
        y = y.to(torch.float64)
        self.gram += x.T @ x
        self.cross += x.T @ y
        self.y_sum += y.sum(0)
        self.y_sq += (y * y).sum(0)
        self.count += z.shape[0]

    def solve(self) -> Tensor:
        """Coefficients [D+1, 2] (bias last) of the ridge-stabilised least-squares fit on these statistics.

        Solved on centred statistics with a ridge of 1e-10 x the mean feature variance (the bias is not penalised):
        directions whose variance is float rounding noise, such as those already removed, get no weight, while any
        direction that really varies is fitted as by plain least squares.
        """
        n = self.count
        mean_z = self.gram[-1, :-1] / n
        mean_y = self.y_sum / n
        cov = self.gram[:-1, :-1] - n * torch.outer(mean_z, mean_z)
        cov_zy = self.cross[:-1] - n * torch.outer(mean_z, mean_y)
        ridge = _RIDGE * max(float(cov.diagonal().mean()), 1e-30)
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        beta = torch.linalg.lstsq((cov + ridge * eye).cpu(), cov_zy.cpu(), driver="gelsd").solution.to(
            cov.device
        )
        bias = mean_y - mean_z @ beta
        return torch.cat([beta, bias.unsqueeze(0)], dim=0)

    def residual(self, coef: Tensor) -> float:
        """Sum over both coordinates of the squared residuals of ``coef`` [D+1, 2] on these statistics."""
        quad = (coef * (self.gram @ coef)).sum(0)
        return float((self.y_sq - 2 * (coef * self.cross).sum(0) + quad).sum().clamp_min(0))

    def total(self) -> float:
        """Sum over both coordinates of the squared deviations of y from its mean."""
        return float((self.y_sq - self.y_sum**2 / max(self.count, 1)).sum())


class _Evaluator:
    """Accumulates, over one pass of the metric features, the trained predictor's error and the closed-form fit.

    Items (images) alternate between two folds; the closed-form regression is fitted on one fold and scored on the
    other, both ways (2-fold cross-validation), so its R^2 is not inflated by fitting noise. With a single item it
    falls back to an in-sample fit.
    """

    def __init__(self, dim: int, device: torch.device) -> None:
        self.folds = [_LinearFitStats(dim, device), _LinearFitStats(dim, device)]
        self.pred_sse = 0.0
        self.items = 0

    def add(self, z_after: Tensor, targets: Tensor, prediction: Tensor | None = None) -> None:
        """z_after [B, N, D] (features after removal), targets [N, 2], predictor outputs [B, N, 2] (optional)."""
        batch = z_after.shape[0]
        fold_of = torch.arange(self.items, self.items + batch, device=z_after.device) % 2
        for fold, stats in enumerate(self.folds):
            picked = z_after[fold_of == fold]
            if picked.shape[0]:
                stats.add(picked.reshape(-1, z_after.shape[-1]), targets.repeat(picked.shape[0], 1))
        if prediction is not None:
            self.pred_sse += float(((prediction.float() - targets) ** 2).sum())
        self.items += batch

    def _pooled_total(self) -> tuple[float, int]:
        count = sum(stats.count for stats in self.folds)
        y_sum = sum(stats.y_sum for stats in self.folds)
        y_sq = sum(stats.y_sq for stats in self.folds)
        return float((y_sq - y_sum**2 / max(count, 1)).sum()), count

    def linear(self) -> dict[str, float]:
        """R^2 and per-coordinate MSE of the closed-form fit, cross-validated over the two folds."""
        first, second = self.folds
        if second.count == 0:
            residual, total = first.residual(first.solve()), first.total()
        else:
            residual = second.residual(first.solve()) + first.residual(second.solve())
            total = first.total() + second.total()
        count = first.count + second.count
        return {"linear_r2": 1.0 - residual / max(total, 1e-30), "linear_mse": residual / (2 * max(count, 1))}

    def predictor(self) -> dict[str, float]:
        """R^2 and per-coordinate MSE of the trained predictor sigmoid(W z) on all items."""
        total, count = self._pooled_total()
        return {
            "predictor_r2": 1.0 - self.pred_sse / max(total, 1e-30),
            "predictor_mse": self.pred_sse / (2 * max(count, 1)),
        }


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RasaResult:
    """What :func:`train_rasa` produced.

    ``weights``: the T removal steps [2, D] in order (the last one is the official ``pos_pred``); ``matrix``: the
    folded [D, D] map (``z_rasa = z @ matrix.T``); ``baseline``: the closed-form position R^2/MSE before any removal;
    ``metrics``: one dict per iteration (see :func:`train_rasa`); ``settings``: the recipe and where metrics were
    measured.
    """

    weights: list[Tensor]
    matrix: Tensor
    metrics: list[dict[str, float]]
    baseline: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary: settings, baseline and per-iteration metrics (not the tensors)."""
        return {
            "settings": dict(self.settings),
            "baseline": dict(self.baseline),
            "iterations": list(self.metrics),
        }

    def curve(self) -> list[dict[str, float]]:
        """Closed-form position R^2/MSE per number of removal steps, step 0 being before any removal.

        Each dict has ``iteration``, ``linear_r2`` and ``linear_mse`` (the input of :func:`franca.report.plot_rasa_r2`).
        """
        points = [
            {
                "iteration": 0,
                "linear_r2": self.baseline["linear_r2"],
                "linear_mse": self.baseline["linear_mse"],
            }
        ]
        points += [
            {"iteration": m["iteration"], "linear_r2": m["linear_r2"], "linear_mse": m["linear_mse"]}
            for m in self.metrics
        ]
        return points

    def to_json(self, indent: int = 2) -> str:
        """The :meth:`to_dict` summary as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)


@dataclass(frozen=True)
class _Recipe:
    iterations: int
    epochs_per_iteration: int
    lr: float
    weight_decay: float
    batch_size: int
    cache_features: bool
    orthogonal_steps: bool

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.epochs_per_iteration < 1:
            raise ConfigError("RASA needs iterations >= 1 and epochs per iteration >= 1")
        if self.lr <= 0:
            raise ConfigError(f"RASA learning rate must be positive, got {self.lr}")


class _PositionTargets(dict):
    """{grid (h, w): :func:`position_targets` [h*w, 2] on ``device``}, each computed on first use."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    def __missing__(self, grid: Grid) -> Tensor:
        self[grid] = position_targets(*grid, device=self.device)
        return self[grid]


def _device(device: torch.device | str | None, model: nn.Module | None) -> torch.device:
    """``device``; for None or ``auto`` the model's device, or without a model CUDA when available."""
    if (device is None or device == "auto") and model is not None:
        return next(model.parameters()).device
    return resolve_device(device)


def _sources(
    model: nn.Module | None,
    data: Any,
    eval_data: Any,
    grid: Grid | None,
    recipe: _Recipe,
    device: torch.device,
    progress: bool,
) -> tuple[_FeatureSource, _FeatureSource]:
    """The training features and those the metrics are measured on (the training ones without ``eval_data``)."""
    if model is not None:
        model.eval().requires_grad_(False).to(device)

    def source(items: Any, what: str) -> _FeatureSource:
        if model is None:
            return _given_source(items, grid=grid, cache=recipe.cache_features, what=what)
        return _image_source(
            model,
            items,
            cache=recipe.cache_features,
            device=device,
            batch_size=recipe.batch_size,
            what=what,
            progress=progress,
        )

    train = source(data, "training data")
    return train, (source(eval_data, "held-out data") if eval_data is not None else train)


def _evaluate(
    source: _FeatureSource,
    batch_size: int,
    device: torch.device,
    weight: Tensor | None = None,
    basis: Tensor | None = None,
) -> _Evaluator:
    """One pass over ``source``: the predictor ``weight`` on the current features, the fit after removing ``basis``."""
    evaluator = _Evaluator(source.dim, device)
    targets = _PositionTargets(device)
    with torch.no_grad():
        for z, grid in source.batches(batch_size, None, device):
            prediction = torch.sigmoid(z @ weight.T) if weight is not None else None
            z_after = z if basis is None else remove_directions(z, basis)
            evaluator.add(z_after, targets[grid], prediction)
    return evaluator


def _train_epoch(
    predictor: nn.Linear,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[tuple[Tensor, Grid]],
    targets: _PositionTargets,
    bar: ProgressBar,
) -> float:
    """One epoch of MSE(sigmoid(W z), y) over ``batches``, a scheduler step per batch; the mean loss per image."""
    loss_sum, loss_items = 0.0, 0
    for z, grid in batches:
        loss = F.mse_loss(torch.sigmoid(predictor(z)), targets[grid].expand(z.shape[0], -1, -1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += float(loss.detach()) * z.shape[0]
        loss_items += z.shape[0]
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / loss_items:.5f}")
    return loss_sum / max(loss_items, 1)


def _fit_predictor(
    source: _FeatureSource,
    recipe: _Recipe,
    device: torch.device,
    generator: torch.Generator,
    desc: str,
    progress: bool,
) -> tuple[Tensor, float]:
    """Train a fresh bias-free ``nn.Linear(D, 2)`` (AdamW, cosine LR to 0 per step) to regress the patch positions.

    Returns its weight [2, D] and the mean loss of its last epoch.
    """
    predictor = nn.Linear(source.dim, 2, bias=False).to(device)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    total_steps = source.num_batches(recipe.batch_size) * recipe.epochs_per_iteration
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1), eta_min=0.0)
    targets = _PositionTargets(device)
    bar = ProgressBar(total=total_steps, desc=desc, unit="step", disable=not progress, leave=False)
    loss = 0.0
    for _ in range(recipe.epochs_per_iteration):
        batches = source.batches(recipe.batch_size, generator, device)
        loss = _train_epoch(predictor, optimizer, scheduler, batches, targets, bar)
    bar.close()
    return predictor.weight.detach().clone(), loss


def _step_weight(weight: Tensor, removed: Tensor | None, orthogonal: bool) -> Tensor:
    """The weight [2, D] a step removes: ``weight``, or for orthogonal steps its rows without their components along
    the directions already removed (``removed`` [k, D] float64; what is left there is the untrained init)."""
    if not orthogonal or removed is None:
        return weight
    return remove_directions(weight.double().cpu(), removed).float().to(weight.device)


def _iteration(
    index: int,
    train: _FeatureSource,
    metric_source: _FeatureSource,
    recipe: _Recipe,
    device: torch.device,
    generator: torch.Generator,
    removed: Tensor | None,
    progress: bool,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Iteration ``index``: fit a predictor, make it a removal step, measure it, apply it to the features.

    Returns the step's weight [2, D] (CPU), its orthonormal basis [k, D] (float64, CPU) and its metrics.
    """
    started = time.perf_counter()
    desc = f"RASA iteration {index + 1}/{recipe.iterations}"
    weight, loss = _fit_predictor(train, recipe, device, generator, desc, progress)
    step_weight = _step_weight(weight, removed, recipe.orthogonal_steps)
    basis = removal_basis(step_weight)
    evaluator = _evaluate(metric_source, recipe.batch_size, device, weight, basis.to(device, torch.float32))
    train.remove(basis)
    if metric_source is not train:
        metric_source.remove(basis)
    entry = {
        "iteration": index + 1,
        "removed_steps": index + 1,
        "train_loss": loss,
        **evaluator.predictor(),
        **evaluator.linear(),
        "seconds": time.perf_counter() - started,
    }
    logger.debug(
        "%s: loss %.5f, predictor R^2 %.4f, position R^2 left %.4f",
        desc,
        loss,
        entry["predictor_r2"],
        entry["linear_r2"],
    )
    return step_weight.cpu(), basis, entry


def _settings(recipe: _Recipe, train: _FeatureSource, metric_source: _FeatureSource) -> dict[str, Any]:
    return {
        **asdict(recipe),
        "metrics_on": "training data" if metric_source is train else "held-out data",
        "linear_fit": "least squares with bias, 2-fold cross-validated over images, ridge 1e-10 x mean variance",
        "train_items": train.num_items,
        "skipped_images": train.skipped,
        "metric_items": metric_source.num_items,
        "embed_dim": train.dim,
    }


def train_rasa(
    model: nn.Module | None,
    data: Any,
    *,
    eval_data: Any = None,
    grid: Grid | None = None,
    iterations: int = 8,
    epochs_per_iteration: int = 5,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    cache_features: bool = True,
    orthogonal_steps: bool = False,
    seed: int | None = None,
    progress: bool = True,
) -> RasaResult:
    """Train a T-step RASA head on patch features of a frozen backbone; returns a :class:`RasaResult`.

    Inputs:

    - with ``model=None``, ``data`` holds the features: a :class:`franca.features.Features` with ``patch`` tokens
      [M, h, w, D], a tensor [M, N, D] on the grid ``grid`` (default: square), or an iterable of such batches
      [B, N, D];
    - with a ``model`` (a :class:`DinoVisionTransformer`, frozen and put in eval mode here), ``data`` is a loader of
      augmented image batches [B, 3, H, W] (e.g. :func:`rasa_transform` images; ``(images, targets)`` pairs,
      franca ``Batch`` objects and ``{"image": ...}`` dicts are fine) whose final-norm patch tokens are extracted
      with :func:`franca.features.extract_features` (fp32, no autocast), on grid (H/p, W/p).

    ``cache_features=True`` (default, the fast choice on CPU) extracts features once and trains every epoch and
    iteration on that single augmented view, applying each removal to the cache in place; memory is M x N x D floats.
    ``cache_features=False`` re-runs the loader (and so re-augments, as the paper does) every epoch through
    :func:`franca.features.iterate_features` and applies the removals as the folded matrix. The batch size is
    ``batch_size``, else the loader's, else 128.

    Each iteration trains a fresh bias-free ``nn.Linear(D, 2)`` (default init) with AdamW (``weight_decay``, paper:
    0), LR ``lr`` on a per-step cosine schedule to 0, loss MSE(sigmoid(W z), y), then appends it as a removal step.

    ``orthogonal_steps=True`` (not the official method; see the module notes) makes each removal plane orthogonal to
    the earlier ones, so that every step removes linear position information rather than only the first.

    Metrics are measured on ``eval_data`` (same kind as ``data``; cached when caching) if given, else on the training
    features; ``settings['metrics_on']`` says which. ``baseline`` holds the closed-form position fit before any
    removal; after iteration t, ``metrics[t]`` holds ``train_loss`` (mean over the last epoch), ``predictor_r2``/
    ``predictor_mse`` of the new predictor on the features it was trained on (removals 0..t-1 applied) and
    ``linear_r2``/``linear_mse`` of a fresh closed-form least-squares fit with bias (2-fold cross-validated over
    images) from the features after removals 0..t to the positions, i.e. how much linearly decodable absolute
    position is left. MSEs are per coordinate, as the training loss. With ``progress``, progress bars show; each
    iteration logs one DEBUG line (logger ``franca.rasa``; ``franca rasa`` prints the whole table at the end).
    """
    recipe = _Recipe(
        iterations,
        epochs_per_iteration,
        lr,
        weight_decay,
        int(batch_size or getattr(data, "batch_size", None) or 128),
        cache_features,
        orthogonal_steps,
    )
    if seed is not None:
        torch.manual_seed(seed)
    device = _device(device, model)
    train, metric_source = _sources(model, data, eval_data, grid, recipe, device, progress)
    baseline = _evaluate(metric_source, recipe.batch_size, device).linear()
    logger.debug("RASA: before removal, closed-form position R^2 %.4f", baseline["linear_r2"])
    generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
    weights, metrics = _removal_steps(train, metric_source, recipe, device, generator, progress)
    return RasaResult(
        weights=weights,
        matrix=fold_rasa(weights),
        metrics=metrics,
        baseline=baseline,
        settings=_settings(recipe, train, metric_source),
    )


def _removal_steps(
    train: _FeatureSource,
    metric_source: _FeatureSource,
    recipe: _Recipe,
    device: torch.device,
    generator: torch.Generator,
    progress: bool,
) -> tuple[list[Tensor], list[dict[str, float]]]:
    """The recipe's removal steps in order (:func:`_iteration` each): their weights [2, D] and metrics."""
    weights: list[Tensor] = []
    metrics: list[dict[str, float]] = []
    removed: Tensor | None = None  # float64 [k, D]: bases of the removal steps so far
    for index in range(recipe.iterations):
        weight, basis, entry = _iteration(
            index, train, metric_source, recipe, device, generator, removed, progress
        )
        removed = basis if removed is None else torch.cat([removed, basis])
        weights.append(weight)
        metrics.append(entry)
    return weights, metrics


# ----------------------------------------------------------------------------------------------------------------
# Runs on image files (``franca rasa``)
# ----------------------------------------------------------------------------------------------------------------


class RasaFiles(NamedTuple):
    """The files :func:`save_rasa_outputs` wrote."""

    head: Path  # the official head layout (franca.models.rasa.save_rasa_head)
    metrics: Path  # RasaResult.to_dict() with the run's settings, as JSON
    backbone: Path  # the backbone with the folded RASA matrix attached (franca.load_backbone)


def rasa_loaders(
    train_paths: Sequence[Path],
    heldout_paths: Sequence[Path],
    size: int,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader | None]:
    """Loaders of RASA training images (:func:`rasa_transform`, shuffled with ``seed``) and held-out images
    (:func:`rasa_eval_transform`, in order; None without held-out paths), [B, 3, size, size] per batch.

    Unreadable files are dropped by ``collate_skip_none`` and counted where the features are extracted.
    """
    loader = DataLoader(
        ImageFileDataset(list(train_paths), rasa_transform(size)),
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
    )
    if not heldout_paths:
        return loader, None
    eval_loader = DataLoader(
        ImageFileDataset(list(heldout_paths), rasa_eval_transform(size)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        pin_memory=pin_memory,
    )
    return loader, eval_loader


def save_rasa_outputs(
    result: RasaResult,
    model: DinoVisionTransformer,
    output_dir: str | os.PathLike,
    settings: Mapping[str, Any],
    source: str | os.PathLike,
) -> RasaFiles:
    """Write ``output_dir/rasa_head.pth``, ``rasa_metrics.json`` and ``backbone_rasa.safetensors``.

    The metrics file is :meth:`RasaResult.to_dict` with ``settings`` (the run's data, size, seed...) added to its
    settings. The folded matrix is attached to ``model`` (:meth:`set_rasa`, replacing any there) and ``model`` moved
    to the CPU to be saved with ``source`` (the backbone checkpoint) in its metadata.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    head = save_rasa_head(result.weights, output_dir / "rasa_head.pth")
    summary = result.to_dict()
    summary["settings"].update(settings)
    metrics = atomic_write_text(output_dir / "rasa_metrics.json", json.dumps(summary, indent=2) + "\n")
    model.set_rasa(result.matrix)
    backbone = save_backbone(
        model.cpu(),
        output_dir / "backbone_rasa.safetensors",
        metadata={"rasa_iterations": str(len(result.weights)), "rasa_source": str(source)},
    )
    return RasaFiles(head, metrics, backbone)
