"""Overclustering of patch features (the Leopart protocol, as Franca reports it with K = 100 and 300).

Protocol (method doc sections 5-6 and Leopart's ``overcluster.py``):

1. Final-norm patch tokens (no head; RASA tokens when a RASA head is attached) of every val image, resized to
   S x S (Leopart/Franca: 448).
2. Features are standardised (zero mean, unit variance per dimension), reduced by PCA to 50 dimensions
   (``pca_dim``; clipped to the feature dimension and the number of patches; ``None`` skips PCA), then clustered by
   K-means with K clusters (K clipped to the number of patches): ``faiss.Kmeans`` (100 iterations, 5 restarts keeping
   the best objective) when faiss is importable, else scikit-learn ``KMeans`` with the same iterations and restarts
   (``MiniBatchKMeans`` above 200k patches). One clustering per seed (default 5 seeds).
3. The cluster map [h, w] of each image is upsampled with nearest neighbour, and the ground-truth mask downsampled
   with nearest neighbour, to ``mask_size`` x ``mask_size`` (100, or S if smaller). Ignored pixels are dropped.
4. Matching clusters to classes, exactly as Leopart's evaluation code does it, which is what the method doc's
   "greedy precision-based many-to-one, refined with Hungarian" refers to (``matching="auto"``):

   - K > number of classes: **greedy precision-based many-to-one**: every cluster goes to the class with which it
     has the highest precision |cluster and class| / |cluster| (i.e. the class of most of its pixels; ties to the
     lowest class id; a cluster without pixels to class 0). Several clusters may share a class.
   - K = number of classes: **Hungarian** one-to-one matching maximising the total cluster-class IoU
     (``scipy.optimize.linear_sum_assignment``); unmatched clusters (only when K exceeds the classes) go to class 0.

   ``matching="greedy"`` or ``"hungarian"`` forces one rule for every K.
5. mIoU of the matched prediction (one confusion matrix over the val set, :mod:`franca.eval.metrics`; classes absent
   from both target and prediction left out of the mean), averaged over the seeds. Reported in percent.

:class:`OverclusteringSettings` holds the settings, :func:`score_overclustering` scores val patch grids and masks
(tensors, or :class:`~franca.features.Features`) into an :class:`OverclusteringResult`, and
:func:`evaluate_overclustering` extracts the val features with :mod:`franca.features` and scores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from franca.core.errors import ConfigError, check_choice
from franca.core.progress import ProgressBar
from franca.eval import defaults
from franca.eval.common import dataset_features, model_device
from franca.eval.metrics import (
    confusion_matrix,
    mean_and_std,
    miou_from_confusion,
    pca_scores,
    per_class_percent,
)
from franca.eval.segmentation_data import (
    IGNORE_INDEX,
    TOKEN_CHOICES,
    dense_split,
    patch_token,
    segmentation_classes,
)
from franca.features import Features

MATCHING = defaults.MATCHING
BACKENDS = defaults.KMEANS_BACKENDS
DEFAULT_CLUSTERS = defaults.DEFAULT_CLUSTERS
DEFAULT_PCA_DIM = defaults.DEFAULT_PCA_DIM
DEFAULT_MASK_SIZE = defaults.DEFAULT_MASK_SIZE
MINIBATCH_THRESHOLD = 200_000


# ------------------------------------------------------------------------------------------------ matching
def cluster_class_counts(
    clusters: Tensor, targets: Tensor, num_clusters: int, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """Pixel counts [K, C] (int64) of cluster k with ground-truth class c; ignored targets are dropped."""
    clusters = clusters.reshape(-1).long()
    targets = targets.reshape(-1).long()
    valid = targets != ignore_index
    clusters, targets = clusters[valid], targets[valid]
    counts = torch.bincount(clusters * num_classes + targets, minlength=num_clusters * num_classes)
    return counts.reshape(num_clusters, num_classes).cpu().numpy()


def greedy_precision_matching(counts: np.ndarray) -> np.ndarray:
    """Class [K] of each cluster: the one with the highest precision counts[k, c] / sum_c counts[k, c].

    Ties go to the lowest class id and a cluster without pixels to class 0 (as Leopart's strict ``>`` loop).
    """
    totals = counts.sum(axis=1, keepdims=True)
    precision = counts / np.maximum(totals, 1)
    return precision.argmax(axis=1).astype(np.int64)


def hungarian_matching(counts: np.ndarray) -> np.ndarray:
    """Class [K] of each cluster from a one-to-one assignment maximising the summed cluster-class IoU.

    Clusters left unassigned (when K exceeds the number of classes) go to class 0, as in Leopart.
    """
    from scipy.optimize import linear_sum_assignment

    counts = counts.astype(np.float64)
    union = counts.sum(axis=1, keepdims=True) + counts.sum(axis=0, keepdims=True) - counts
    iou = counts / np.maximum(union, 1e-8)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    mapping = np.zeros(counts.shape[0], dtype=np.int64)
    mapping[rows] = cols
    return mapping


def match_clusters(counts: np.ndarray, matching: str = "auto") -> tuple[np.ndarray, str]:
    """(class of each cluster [K], rule used): "auto" = Hungarian when K equals the classes, else greedy."""
    check_choice("matching", matching, MATCHING)
    if matching == "auto":
        matching = "hungarian" if counts.shape[0] == counts.shape[1] else "greedy"
    mapping = hungarian_matching(counts) if matching == "hungarian" else greedy_precision_matching(counts)
    return mapping, matching


def resize_label_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of label maps [N, H, W] to [N, size[0], size[1]] (int64)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.long()
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def overclustering_miou(
    cluster_maps: Tensor,
    masks: Tensor,
    num_clusters: int,
    num_classes: int,
    matching: str = "auto",
    mask_size: int = DEFAULT_MASK_SIZE,
    ignore_index: int = 255,
) -> dict[str, Any]:
    """mIoU of cluster maps [N, h, w] matched to masks [N, H, W] at ``mask_size`` x ``mask_size`` resolution.

    Each side is clipped to the masks' own (never upsampled). Returns ``miou`` (fraction), ``per_class_iou`` [C],
    ``mapping`` [K] (class of each cluster), ``matching`` (rule used) and ``mask_shape`` (evaluated H, W).
    """
    size = (min(mask_size, masks.shape[-2]), min(mask_size, masks.shape[-1]))
    targets = resize_label_maps(masks, size)
    clusters = resize_label_maps(cluster_maps, size)
    counts = cluster_class_counts(clusters, targets, num_clusters, num_classes, ignore_index)
    mapping, used = match_clusters(counts, matching)
    predicted = torch.from_numpy(mapping)[clusters]
    conf = confusion_matrix(predicted, targets, num_classes, ignore_index)
    miou, iou = miou_from_confusion(conf)
    return {"miou": miou, "per_class_iou": iou, "mapping": mapping, "matching": used, "mask_shape": size}


# ------------------------------------------------------------------------------------------------ clustering
def standardize_and_reduce(features: np.ndarray, pca_dim: int | None = DEFAULT_PCA_DIM) -> np.ndarray:
    """Standardise features [P, D] per dimension, then PCA (:func:`franca.eval.metrics.pca_scores`) to
    min(pca_dim, D, P) dimensions; float32 [P, d]."""
    from sklearn.preprocessing import StandardScaler

    reduced = StandardScaler().fit_transform(np.asarray(features, dtype=np.float32))
    if pca_dim is not None:
        reduced = pca_scores(reduced, pca_dim)
    return np.ascontiguousarray(reduced, dtype=np.float32)


def resolve_backend(backend: str) -> str:
    """ "auto" -> faiss when importable, else sklearn."""
    check_choice("k-means backend", backend, BACKENDS)
    if backend == "sklearn":
        return backend
    try:
        import faiss  # noqa: F401
    except ImportError:
        if backend == "faiss":
            raise ConfigError(
                "--kmeans-backend faiss: faiss is not installed; pip install faiss-cpu"
            ) from None
        return "sklearn"
    return "faiss"


def kmeans_assign(
    features: np.ndarray, k: int, seed: int = 0, niter: int = 100, nredo: int = 5, backend: str = "auto"
) -> np.ndarray:
    """K-means cluster index [P] (int64) of every row of features [P, d]; K clipped to P."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    k = max(1, min(k, features.shape[0]))
    backend = resolve_backend(backend)
    if backend == "faiss":
        import faiss

        kmeans = faiss.Kmeans(features.shape[1], k, niter=niter, nredo=nredo, seed=seed, verbose=False)
        kmeans.train(features)
        _, labels = kmeans.index.search(features, 1)
        return labels[:, 0].astype(np.int64)
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if features.shape[0] > MINIBATCH_THRESHOLD:
        model = MiniBatchKMeans(
            n_clusters=k, n_init=nredo, max_iter=niter, random_state=seed, batch_size=4096
        )
    else:
        model = KMeans(n_clusters=k, n_init=nredo, max_iter=niter, random_state=seed)
    return model.fit_predict(features).astype(np.int64)


# ------------------------------------------------------------------------------------------------ protocol
@dataclass(frozen=True)
class OverclusteringSettings:
    """Settings of the overclustering protocol.

    ``clusters``: the values of K (each >= 1; duplicates scored once); ``seeds``: one k-means run per seed (mIoU
    averaged); ``pca_dim``: PCA dimensions after standardisation (None: no PCA); ``mask_size``: side of the evaluated
    masks (clipped to the masks'); ``matching``: ``auto`` / ``greedy`` / ``hungarian``; ``niter`` / ``nredo``:
    k-means iterations and restarts; ``backend``: ``auto`` / ``faiss`` / ``sklearn``; ``tokens``: ``auto`` /
    ``patch`` / ``rasa`` (:func:`~franca.eval.segmentation_data.patch_token`).
    """

    clusters: Sequence[int] = DEFAULT_CLUSTERS
    seeds: Sequence[int] = (0, 1, 2, 3, 4)
    pca_dim: int | None = DEFAULT_PCA_DIM
    mask_size: int = DEFAULT_MASK_SIZE
    matching: str = "auto"
    niter: int = 100
    nredo: int = 5
    backend: str = "auto"
    tokens: str = "auto"
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if not self.clusters or min(self.clusters) < 1:
            raise ConfigError(f"--clusters must be positive numbers (got {list(self.clusters)})")
        check_choice("--matching", self.matching, MATCHING)
        check_choice("--kmeans-backend", self.backend, BACKENDS)
        check_choice("--tokens", self.tokens, TOKEN_CHOICES)


@dataclass(frozen=True)
class ClusterScore:
    """The mIoU (percent) of one K for each seed, the K used (clipped to the patches), the matching rule and the
    per-class IoU averaged over the seeds (percent, None for an absent class)."""

    miou_per_seed: list[float]
    clusters: int
    matching: str
    per_class_iou: dict[str, float | None]

    @property
    def miou(self) -> float:
        """Mean mIoU over the seeds (percent)."""
        return mean_and_std(self.miou_per_seed)[0]

    @property
    def miou_std(self) -> float:
        """Population standard deviation of the mIoU over the seeds."""
        return mean_and_std(self.miou_per_seed)[1]

    def to_dict(self) -> dict[str, Any]:
        """``{"miou", "miou_std", "miou_per_seed", "clusters", "matching", "per_class_iou"}``."""
        return {
            "miou": self.miou,
            "miou_std": self.miou_std,
            "miou_per_seed": list(self.miou_per_seed),
            "clusters": self.clusters,
            "matching": self.matching,
            "per_class_iou": dict(self.per_class_iou),
        }


@dataclass(frozen=True)
class OverclusteringResult:
    """What :func:`score_overclustering` measured: a :class:`ClusterScore` per K, the seeds, the classes, the PCA
    width used (None: no PCA), the evaluated mask side, the k-means backend and its iterations and restarts, the
    number of patches clustered and of val images, and (from Features) the unreadable val images skipped."""

    scores: dict[int, ClusterScore]
    seeds: list[int]
    num_classes: int
    pca_dim: int | None
    mask_size: int
    kmeans_backend: str
    niter: int
    nredo: int
    num_patches: int
    num_val_images: int
    num_skipped_val: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"protocol": "overcluster", "k<K>": ClusterScore dict ..., "seeds", "num_classes", "pca_dim",
        "mask_size", "kmeans_backend", "niter", "nredo", "num_patches", "num_val_images", "num_skipped_val"}`` (the
        last when known)."""
        skipped = {"num_skipped_val": self.num_skipped_val} if self.num_skipped_val is not None else {}
        return {
            "protocol": "overcluster",
            **{f"k{k}": score.to_dict() for k, score in self.scores.items()},
            "seeds": list(self.seeds),
            "num_classes": self.num_classes,
            "pca_dim": self.pca_dim,
            "mask_size": self.mask_size,
            "kmeans_backend": self.kmeans_backend,
            "niter": self.niter,
            "nredo": self.nredo,
            "num_patches": self.num_patches,
            "num_val_images": self.num_val_images,
            **skipped,
        }


def _cluster_scores(
    reduced: np.ndarray,
    grid: tuple[int, int, int],
    masks: Tensor,
    settings: OverclusteringSettings,
    num_classes: int,
    class_names: Sequence[str],
    progress: bool,
) -> dict[int, ClusterScore]:
    """A :class:`ClusterScore` per K: k-means of the reduced patch features [P, d] per seed, cluster maps of shape
    ``grid`` (N, h, w) matched to the masks [N, S, S]."""
    clusters = list(dict.fromkeys(int(k) for k in settings.clusters))
    backend = resolve_backend(settings.backend)
    outcomes: dict[int, list[dict[str, Any]]] = {k: [] for k in clusters}
    jobs = [(k, seed) for k in clusters for seed in (list(settings.seeds) or [0])]
    for k, seed in ProgressBar(jobs, desc="k-means", unit="run", leave=False, disable=not progress):
        k_used = min(k, reduced.shape[0])
        assignment = kmeans_assign(reduced, k_used, seed, settings.niter, settings.nredo, backend)
        cluster_maps = torch.from_numpy(assignment).reshape(grid)
        outcomes[k].append(
            overclustering_miou(
                cluster_maps,
                masks,
                k_used,
                num_classes,
                settings.matching,
                settings.mask_size,
                settings.ignore_index,
            )
        )
    return {
        k: ClusterScore(
            miou_per_seed=[100.0 * outcome["miou"] for outcome in runs],
            clusters=min(k, reduced.shape[0]),
            matching=runs[0]["matching"],
            per_class_iou=per_class_percent(
                torch.stack([outcome["per_class_iou"] for outcome in runs]).mean(dim=0), class_names
            ),
        )
        for k, runs in outcomes.items()
    }


def score_overclustering(
    features: Tensor | Features,
    masks: Tensor | None,
    settings: OverclusteringSettings | None = None,
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    progress: bool = False,
) -> OverclusteringResult:
    """Overclustering mIoU (percent, mean over seeds) of val patch grids [N, h, w, D] against their label masks
    [N, S, S] (tensors, or Features with the masks as targets) for each K of ``settings.clusters``."""
    settings = settings if settings is not None else OverclusteringSettings()
    grids, masks = dense_split(features, masks, "val")
    count, rows, cols, dim = grids.shape
    reduced = standardize_and_reduce(grids.reshape(-1, dim).cpu().numpy(), settings.pca_dim)
    masks = masks.long().cpu()
    names = tuple(class_names or (f"class_{index}" for index in range(num_classes)))
    scores = _cluster_scores(reduced, (count, rows, cols), masks, settings, num_classes, names, progress)
    return OverclusteringResult(
        scores=scores,
        seeds=list(settings.seeds) or [0],
        num_classes=num_classes,
        pca_dim=None if settings.pca_dim is None else int(reduced.shape[1]),
        mask_size=min(settings.mask_size, masks.shape[-1], masks.shape[-2]),
        kmeans_backend=resolve_backend(settings.backend),
        niter=settings.niter,
        nredo=settings.nredo,
        num_patches=int(reduced.shape[0]),
        num_val_images=count,
        num_skipped_val=features.num_skipped if isinstance(features, Features) else None,
    )


@torch.no_grad()
def evaluate_overclustering(
    model: nn.Module,
    val_dataset: Dataset,
    settings: OverclusteringSettings | None = None,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    progress: bool = True,
) -> OverclusteringResult:
    """Extract the val patch features (items ``(image, mask)``; unreadable ones skipped and counted) with
    :mod:`franca.features` and :func:`score_overclustering` them; the classes are the data set's."""
    settings = settings if settings is not None else OverclusteringSettings()
    num_classes, class_names = segmentation_classes(val_dataset, num_classes=num_classes)
    token = patch_token(model, settings.tokens)
    features = dataset_features(
        model,
        val_dataset,
        (token,),
        batch_size,
        num_workers,
        model_device(model, device),
        desc="val features",
        progress=progress,
    )
    return score_overclustering(
        features, None, settings, num_classes=num_classes, class_names=class_names, progress=progress
    )
