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

The removal maps and the official head files (read, write, fold) live in :mod:`franca.models.rasa`, beside the
backbone that applies them; this module trains the steps.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from franca.core.constants import IMAGENET_MEAN, IMAGENET_STD
from franca.core.errors import ConfigError, DataError
from franca.models.rasa import fold_rasa, position_targets, removal_basis

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


def _images_of(batch: Any) -> tuple[Tensor | None, int]:
    """The image tensor [B, 3, H, W] of a loader batch and how many unreadable samples it dropped.

    Accepts a tensor, a :class:`franca.data.images.Batch` (from ``collate_skip_none``), a tuple/list led by the
    images, or a dict with an ``image``/``images`` entry; an empty batch gives ``(None, skipped)``.
    """
    skipped = 0
    if hasattr(batch, "inputs") and hasattr(batch, "num_skipped"):
        batch, skipped = batch.inputs, int(batch.num_skipped)
    if isinstance(batch, Mapping):
        batch = batch.get("image", batch.get("images"))
    elif isinstance(batch, (tuple, list)):
        batch = batch[0] if batch else None
    if batch is None or (isinstance(batch, Tensor) and batch.shape[0] == 0):
        return None, skipped
    if not isinstance(batch, Tensor) or batch.ndim != 4:
        raise DataError(
            "RASA needs a loader of image batches [B, 3, H, W] (or tuples/dicts whose first entry is one)"
        )
    return batch, skipped


class _FeatureSource:
    """Patch features [B, N, D] with their grid, with all removal steps so far applied."""

    num_items: int
    dim: int
    skipped: int = 0  # unreadable images dropped while caching
    stream: _ImageFeatureStream | None = None  # the image pass of a streamed source, for its skip counts

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

    def __init__(self, features: Tensor, grid: Grid) -> None:
        self.features = features
        self.grid = grid
        self.num_items, self.dim = features.shape[0], features.shape[-1]

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
            chunk -= (chunk @ basis.T) @ basis


class _StreamedFeatures(_FeatureSource):
    """Features produced afresh on each pass (re-augmented images); removals are applied as the folded matrix."""

    def __init__(
        self, produce: Callable[[], Iterable[tuple[Tensor, Grid]]], num_items: int, num_batches: int, dim: int
    ) -> None:
        self.produce = produce
        self.num_items, self.dim = num_items, dim
        self._num_batches = num_batches
        self.matrix = torch.eye(dim, dtype=torch.float64)

    def num_batches(self, batch_size: int) -> int:
        return self._num_batches

    def batches(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device
    ) -> Iterator[tuple[Tensor, Grid]]:
        matrix = self.matrix.to(device, torch.float32)
        for features, grid in self.produce():
            yield features.to(device, torch.float32) @ matrix.T, grid

    def remove(self, basis: Tensor) -> None:
        basis = basis.to("cpu", torch.float64)
        self.matrix = (torch.eye(self.dim, dtype=torch.float64) - basis.T @ basis) @ self.matrix


class _ImageFeatureStream:
    """Runs one pass of an image loader through the frozen backbone per call, yielding (patch tokens, grid).

    ``loaded``/``skipped`` count the images of the last complete pass (unreadable files are dropped by the loader's
    ``collate_skip_none`` and counted here).
    """

    def __init__(
        self, model: nn.Module, loader: Iterable[Any], device: torch.device, desc: str, progress: bool
    ) -> None:
        self.model, self.loader, self.device, self.desc, self.progress = model, loader, device, desc, progress
        self.patch_size = int(model.patch_size)
        self.loaded = self.skipped = 0

    def __call__(self) -> Iterator[tuple[Tensor, Grid]]:
        from franca.core.progress import ProgressBar

        total = len(self.loader) if hasattr(self.loader, "__len__") else None
        loaded = skipped = 0
        bar = ProgressBar(
            self.loader, total=total, desc=self.desc, unit="batch", disable=not self.progress, leave=False
        )
        for batch in bar:
            images, dropped = _images_of(batch)
            skipped += dropped
            if images is None:
                continue
            loaded += images.shape[0]
            with torch.no_grad():
                out = self.model.forward_features(images.to(self.device, non_blocking=True))
            grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
            yield out["x_norm_patchtokens"].float(), grid
        self.loaded, self.skipped = loaded, skipped


def _cache(stream: Iterable[tuple[Tensor, Grid]], what: str) -> _CachedFeatures:
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


def _feature_source(
    model: nn.Module | None,
    data: Any,
    *,
    grid: Grid | None,
    cache: bool,
    device: torch.device,
    batch_size: int,
    what: str,
    progress: bool,
) -> _FeatureSource:
    """Wrap images (with a model) or precomputed features (without) as a cached or streamed feature source."""
    if model is not None:
        produce = _ImageFeatureStream(model, data, device, f"RASA features ({what})", progress)
        if cache:
            source = _cache(produce(), what)
            source.skipped = produce.skipped
            return source
        if not hasattr(data, "__len__"):
            raise ConfigError(
                f"{what}: streaming features (no cache) needs a loader with a length, e.g. a DataLoader"
            )
        num_items = len(data.dataset) if hasattr(data, "dataset") else len(data) * batch_size
        source = _StreamedFeatures(produce, num_items, len(data), int(model.embed_dim))
        source.stream = produce
        return source

    def with_grid(features: Tensor) -> tuple[Tensor, Grid]:
        if not isinstance(features, Tensor) or features.ndim != 3:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise DataError(f"{what}: feature batches must be tensors [B, N, D], got {shape}")
        return features, grid or _square_grid(features.shape[1])

    if isinstance(data, Tensor):
        features, feature_grid = with_grid(data)
        return _CachedFeatures(features.detach().to("cpu", torch.float32).clone(), feature_grid)
    if cache:
        return _cache((with_grid(f) for f in data), what)
    if iter(data) is data or not hasattr(data, "__len__") or len(data) == 0:
        raise ConfigError(
            f"{what}: streaming features (no cache) needs a non-empty list of [B, N, D] batches"
        )
    batches = [with_grid(f) for f in data]
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


def _resolve_device(device: torch.device | str | None, model: nn.Module | None) -> torch.device:
    if device is None or device == "auto":
        if model is not None:
            return next(model.parameters()).device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _evaluate(
    source: _FeatureSource,
    batch_size: int,
    device: torch.device,
    dim: int,
    weight: Tensor | None,
    basis: Tensor | None,
) -> _Evaluator:
    """One pass over ``source``: the predictor ``weight`` on the current features, the fit after removing ``basis``."""
    evaluator = _Evaluator(dim, device)
    targets_by_grid: dict[Grid, Tensor] = {}
    with torch.no_grad():
        for z, grid in source.batches(batch_size, None, device):
            if grid not in targets_by_grid:
                targets_by_grid[grid] = position_targets(*grid, device=device)
            targets = targets_by_grid[grid]
            prediction = torch.sigmoid(z @ weight.T) if weight is not None else None
            z_after = z if basis is None else z - (z @ basis.T) @ basis
            evaluator.add(z_after, targets, prediction)
    return evaluator


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
    """Train a T-step RASA head on a frozen backbone (or on given patch features); returns a :class:`RasaResult`.

    Inputs:

    - with a ``model`` (a :class:`DinoVisionTransformer`, frozen and put in eval mode here), ``data`` is a loader of
      augmented image batches [B, 3, H, W] (e.g. :func:`rasa_transform` images; tuples/dicts led by the images are
      fine) and the features are its final-norm patch tokens ``x_norm_patchtokens`` [B, N, D] on grid (H/p, W/p);
    - with ``model=None``, ``data`` is a feature tensor [M, N, D] or an iterable of feature batches [B, N, D] on the
      grid ``grid`` (default: square).

    ``cache_features=True`` (default, the fast choice on CPU) extracts features once and trains every epoch and
    iteration on that single augmented view, applying each removal to the cache in place; memory is M x N x D floats.
    ``cache_features=False`` re-runs the loader (and so re-augments, as the paper does) every epoch and applies the
    removals as the folded matrix. The batch size is ``batch_size``, else the loader's, else 128.

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
    position is left. MSEs are per coordinate, as the training loss.
    """
    from franca.core.progress import ProgressBar

    if iterations < 1 or epochs_per_iteration < 1:
        raise ConfigError("RASA needs iterations >= 1 and epochs per iteration >= 1")
    if lr <= 0:
        raise ConfigError(f"RASA learning rate must be positive, got {lr}")
    if seed is not None:
        torch.manual_seed(seed)
    device = _resolve_device(device, model)
    if model is not None:
        model.eval().requires_grad_(False).to(device)
    recipe = _Recipe(
        iterations,
        epochs_per_iteration,
        lr,
        weight_decay,
        int(batch_size or getattr(data, "batch_size", None) or 128),
        cache_features,
        orthogonal_steps,
    )
    common = {"grid": grid, "cache": cache_features, "device": device, "batch_size": recipe.batch_size}
    train = _feature_source(model, data, what="training data", progress=progress, **common)
    heldout = eval_data is not None
    metric_source = (
        _feature_source(model, eval_data, what="held-out data", progress=progress, **common)
        if heldout
        else train
    )
    dim = train.dim

    baseline = _evaluate(metric_source, recipe.batch_size, device, dim, None, None).linear()
    generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
    weights: list[Tensor] = []
    metrics: list[dict[str, float]] = []
    removed: Tensor | None = None  # float64 [k, D]: bases of the removal steps so far
    steps_per_epoch = train.num_batches(recipe.batch_size)
    if progress:
        ProgressBar.write(f"RASA: before removal, closed-form position R^2 {baseline['linear_r2']:.4f}")
    for iteration in range(iterations):
        started = time.perf_counter()
        predictor = nn.Linear(dim, 2, bias=False).to(device)
        optimizer = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=weight_decay)
        total_steps = steps_per_epoch * epochs_per_iteration
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(total_steps, 1), eta_min=0.0
        )
        targets_by_grid: dict[Grid, Tensor] = {}
        bar = ProgressBar(
            total=total_steps,
            desc=f"RASA iteration {iteration + 1}/{iterations}",
            unit="step",
            disable=not progress,
            leave=False,
        )
        epoch_loss = 0.0
        for _ in range(epochs_per_iteration):
            loss_sum, loss_items = 0.0, 0
            for z, batch_grid in train.batches(recipe.batch_size, generator, device):
                if batch_grid not in targets_by_grid:
                    targets_by_grid[batch_grid] = position_targets(*batch_grid, device=device)
                targets = targets_by_grid[batch_grid]
                loss = F.mse_loss(torch.sigmoid(predictor(z)), targets.expand(z.shape[0], -1, -1))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += float(loss.detach()) * z.shape[0]
                loss_items += z.shape[0]
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / loss_items:.5f}")
            epoch_loss = loss_sum / max(loss_items, 1)
        bar.close()
        weight = predictor.weight.detach().clone()
        step_weight = weight
        if orthogonal_steps and removed is not None:
            # drop the rows' components along directions already removed (the untrained remains of the init)
            w64 = weight.double().cpu()
            step_weight = (w64 - (w64 @ removed.T) @ removed).float().to(weight.device)
        basis = removal_basis(step_weight)  # float64 [2, D]
        removed = basis if removed is None else torch.cat([removed, basis])
        evaluator = _evaluate(
            metric_source, recipe.batch_size, device, dim, weight, basis.to(device, torch.float32)
        )
        train.remove(basis)
        if metric_source is not train:
            metric_source.remove(basis)
        weights.append(step_weight.cpu())
        entry = {
            "iteration": iteration + 1,
            "removed_steps": iteration + 1,
            "train_loss": epoch_loss,
            **evaluator.predictor(),
            **evaluator.linear(),
            "seconds": time.perf_counter() - started,
        }
        metrics.append(entry)
        if progress:
            ProgressBar.write(
                f"RASA iteration {iteration + 1}/{iterations}: loss {epoch_loss:.5f}, predictor R^2 "
                f"{entry['predictor_r2']:.4f}, position R^2 left {entry['linear_r2']:.4f}"
            )
    settings = {
        **asdict(recipe),
        "metrics_on": "held-out data" if heldout else "training data",
        "linear_fit": "least squares with bias, 2-fold cross-validated over images, ridge 1e-10 x mean variance",
        "train_items": train.num_items,
        "skipped_images": train.stream.skipped if train.stream is not None else train.skipped,
        "metric_items": metric_source.num_items,
        "embed_dim": dim,
    }
    return RasaResult(
        weights=weights, matrix=fold_rasa(weights), metrics=metrics, baseline=baseline, settings=settings
    )
