"""The metrics every evaluation protocol shares: confusion matrices and mIoU, the spread over seeds, and PCA.

**mIoU.** ``conf[t, p]`` counts the pixels of ground-truth class ``t`` predicted as class ``p``; pixels whose target
is ``ignore_index`` are not counted. The IoU of class ``c`` is ``conf[c, c] / (sum_p conf[c, p] + sum_t conf[t, c] -
conf[c, c])``. A class that appears neither in the targets nor in the predictions has an undefined IoU (0/0): it is
reported as NaN (None in result files) and **left out of the mean**, so the mean is over the classes that occur (the
mmsegmentation / DINOv2 convention; Leopart's ``PredsmIoU`` instead counts such a class as 0, which only lowers the
score of data sets that miss a class entirely).

**Spread over seeds.** :func:`mean_and_std`: the mean and the population standard deviation (divided by n, as
``statistics.pstdev``) of one metric measured with several seeds (k-means restarts of one model).
:func:`seed_spread` and :func:`paired_difference` are for comparing *trainings* over seeds: the sample standard
deviation (divided by n - 1, ``statistics.stdev``: the seeds are a sample of the runs one could train) and, for two
models trained with the same seeds, the mean of the per-seed differences with its Student-t confidence interval (the
paired t-test, ``scipy.stats.ttest_rel``).

**PCA**, two solvers with their own numerics, each kept for its callers:

- :func:`pca_fit` / :func:`pca_project` (torch): the covariance accumulated in float64 over row chunks (exact, memory
  O(d^2) whatever the number of rows) and diagonalised with ``eigh``; fitted on one set (the train features) and
  applied to others; each component's sign is fixed so that its largest-magnitude coordinate is positive. Used by
  the PCA-truncated k-NN (:mod:`franca.eval.sliced`).
- :func:`pca_scores` (scikit-learn): the coordinates of a set of rows on its own first principal components, from
  scikit-learn's full SVD (``PCA(svd_solver="full").fit_transform``: ``U * S``, its sign convention). Used by the
  PCA maps (:mod:`franca.eval.pca_maps`) and the overclustering reduction (:mod:`franca.eval.overclustering`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from franca.core.errors import ConfigError


# --------------------------------------------------------------------------------------------------- mIoU
def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Confusion matrix [C, C] (int64, rows = target, columns = prediction) of two label maps of the same shape.

    Pixels whose target is ``ignore_index`` are dropped. Targets or predictions outside ``[0, num_classes)`` (other
    than the ignored target) raise ValueError, since they would otherwise be silently miscounted.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    valid = target != ignore_index
    pred, target = pred[valid], target[valid]
    if target.numel() == 0:
        return torch.zeros(num_classes, num_classes, dtype=torch.long, device=pred.device)
    if int(target.min()) < 0 or int(target.max()) >= num_classes:
        raise ValueError(f"target labels must lie in [0, {num_classes}) or equal {ignore_index}")
    if int(pred.min()) < 0 or int(pred.max()) >= num_classes:
        raise ValueError(f"predicted labels must lie in [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(conf: Tensor) -> Tensor:
    """IoU of every class [C] (float64) from a confusion matrix; NaN for classes absent from target and prediction."""
    conf = conf.double()
    intersection = conf.diagonal()
    union = conf.sum(dim=0) + conf.sum(dim=1) - intersection
    iou = torch.full_like(intersection, float("nan"))
    present = union > 0
    iou[present] = intersection[present] / union[present]
    return iou


def miou_from_confusion(conf: Tensor) -> tuple[float, Tensor]:
    """(mean IoU over the classes present in target or prediction, per-class IoU [C] with NaN for absent classes).

    The mean is a fraction in [0, 1]; NaN when no pixel was counted at all.
    """
    iou = iou_per_class(conf)
    present = ~torch.isnan(iou)
    miou = float(iou[present].mean()) if bool(present.any()) else float("nan")
    return miou, iou


def pixel_accuracy(conf: Tensor) -> float:
    """Fraction of counted pixels whose prediction equals the target (NaN when nothing was counted)."""
    total = float(conf.sum())
    return float(conf.diagonal().sum()) / total if total > 0 else float("nan")


def per_class_percent(iou: Tensor, class_names: Sequence[str]) -> dict[str, float | None]:
    """``{class name: IoU in percent}`` of per-class IoUs [C] (fractions), None for an absent class (NaN)."""
    return {
        name: (None if math.isnan(float(value)) else 100.0 * float(value))
        for name, value in zip(class_names, iou)
    }


# --------------------------------------------------------------------------------------------------- spread
def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, population standard deviation) of a metric over seeds: ``sum / n`` and
    ``sqrt(sum((v - mean)^2) / n)`` (``statistics.pstdev``; 0 for one value). ValueError when there is none."""
    if not values:
        raise ValueError("mean_and_std needs at least one value")
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / len(values))


@dataclass(frozen=True)
class SeedSpread:
    """One metric over the seeds of a training: the values, their mean and sample standard deviation (0 for one)."""

    values: tuple[float, ...]
    mean: float
    std: float

    @property
    def n(self) -> int:
        """How many seeds."""
        return len(self.values)


def seed_spread(values: Sequence[float]) -> SeedSpread:
    """Mean and sample standard deviation (``statistics.stdev``, n - 1) of a metric over seeds; ValueError if empty."""
    if not values:
        raise ValueError("seed_spread needs at least one value")
    values = tuple(float(value) for value in values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return SeedSpread(values, statistics.fmean(values), std)


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over seeds trained in pairs (the same seed for both): mean, sample std and the t interval.

    ``ci_low``/``ci_high``: the ``confidence`` interval of the mean difference, ``mean -/+ t * std / sqrt(n)`` with
    the Student-t quantile of n - 1 degrees of freedom (None with fewer than 2 seeds). ``separated``: the interval
    excludes 0, i.e. the paired t-test rejects "no difference" at 1 - ``confidence``. ``exceeds_spread``: the mean
    difference is larger than its own seed-to-seed spread (a cruder, interval-free reading).
    """

    differences: tuple[float, ...]
    mean: float
    std: float
    confidence: float
    ci_low: float | None
    ci_high: float | None

    @property
    def n(self) -> int:
        """How many seed pairs."""
        return len(self.differences)

    @property
    def separated(self) -> bool:
        """Whether the confidence interval excludes 0 (False with fewer than 2 pairs)."""
        if self.ci_low is None or self.ci_high is None:
            return False
        return self.ci_low > 0 or self.ci_high < 0

    @property
    def exceeds_spread(self) -> bool:
        """Whether |mean difference| is larger than the differences' standard deviation (False for one pair)."""
        return self.n > 1 and abs(self.mean) > self.std


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """The per-seed differences ``a[i] - b[i]`` summarised (see :class:`PairedDifference`); needs scipy."""
    if len(a) != len(b) or not a:
        raise ValueError(
            f"paired_difference needs two equally long, non-empty lists (got {len(a)} and {len(b)})"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    spread = seed_spread([float(x) - float(y) for x, y in zip(a, b)])
    low = high = None
    if spread.n > 1:
        from scipy.stats import t as student_t

        half = float(student_t.ppf(0.5 + confidence / 2, spread.n - 1)) * spread.std / math.sqrt(spread.n)
        low, high = spread.mean - half, spread.mean + half
    return PairedDifference(spread.values, spread.mean, spread.std, confidence, low, high)


# --------------------------------------------------------------------------------------------------- PCA
def pca_fit(train_feats: Tensor, chunk_size: int = 65536) -> tuple[Tensor, Tensor, Tensor]:
    """PCA of ``train_feats`` [n, d]: (mean [d], components [d, d] one direction per row, explained variance [d]).

    The covariance is accumulated in float64 over row chunks (exact, memory O(d^2) whatever n) and diagonalised with
    ``torch.linalg.eigh``; components are sorted by decreasing variance and each one's sign is fixed so that its
    largest-magnitude coordinate is positive (deterministic output). Returned in float32.
    """
    if train_feats.ndim != 2 or train_feats.shape[0] < 2:
        raise ConfigError(
            f"PCA needs at least 2 train samples of 2-D features, got {tuple(train_feats.shape)}"
        )
    n, d = train_feats.shape
    mean = torch.zeros(d, dtype=torch.float64)
    for start in range(0, n, chunk_size):
        mean += train_feats[start : start + chunk_size].double().sum(dim=0)
    mean /= n
    cov = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, n, chunk_size):
        centred = train_feats[start : start + chunk_size].double() - mean
        cov += centred.T @ centred
    cov /= n - 1
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    order = torch.argsort(eigenvalues, descending=True)
    variance = eigenvalues[order].clamp_min(0)
    components = eigenvectors[:, order].T.contiguous()
    pivots = components.abs().argmax(dim=1)
    signs = torch.sign(components.gather(1, pivots.view(-1, 1))).squeeze(1)
    signs[signs == 0] = 1
    components = components * signs.view(-1, 1)
    return mean.float(), components.float(), variance.float()


def pca_project(feats: Tensor, mean: Tensor, components: Tensor, dims: int) -> Tensor:
    """``(feats - mean) @ components[:dims].T``: [n, d] -> [n, dims] coordinates on the top principal directions."""
    return (feats.float() - mean) @ components[:dims].T


def pca_scores(data: np.ndarray, n_components: int) -> np.ndarray:
    """Coordinates [N, m] of the rows of ``data`` [N, D] on their own first m = min(n_components, N, D) principal
    components (scikit-learn ``PCA(svd_solver="full").fit_transform``, in ``data``'s dtype).

    Fewer than 2 rows have no principal direction: their coordinates are zeros.
    """
    count = min(int(n_components), data.shape[0], data.shape[1])
    if data.shape[0] < 2 or count < 1:
        return np.zeros((data.shape[0], max(count, 0)), dtype=data.dtype)
    from sklearn.decomposition import PCA

    return PCA(n_components=count, svd_solver="full").fit_transform(data)
