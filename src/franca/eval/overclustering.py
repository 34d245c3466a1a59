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
5. mIoU of the matched prediction (one confusion matrix over the val set, :mod:`franca.eval.miou`; classes absent
   from both target and prediction left out of the mean), averaged over the seeds. Reported in percent.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from franca.core.errors import ConfigError
from franca.eval import defaults
from franca.eval.miou import confusion_matrix, miou_from_confusion

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
    if matching not in MATCHING:
        raise ConfigError(f"matching {matching!r} is not one of {', '.join(MATCHING)}")
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
    """Standardise features [P, D] per dimension, then PCA to min(pca_dim, D, P) dimensions; float32 [P, d]."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    reduced = StandardScaler().fit_transform(np.asarray(features, dtype=np.float32))
    if pca_dim is not None:
        dim = min(pca_dim, reduced.shape[1], reduced.shape[0])
        reduced = PCA(n_components=dim, svd_solver="full").fit_transform(reduced)
    return np.ascontiguousarray(reduced, dtype=np.float32)


def resolve_backend(backend: str) -> str:
    """ "auto" -> faiss when importable, else sklearn."""
    if backend not in BACKENDS:
        raise ConfigError(f"k-means backend {backend!r} is not one of {', '.join(BACKENDS)}")
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


# ------------------------------------------------------------------------------------------------ model level
@torch.no_grad()
def evaluate_overclustering(
    model: nn.Module,
    val_dataset: Dataset,
    clusters: list[int] | tuple[int, ...] = DEFAULT_CLUSTERS,
    seeds: list[int] | tuple[int, ...] = (0, 1, 2, 3, 4),
    pca_dim: int | None = DEFAULT_PCA_DIM,
    mask_size: int = DEFAULT_MASK_SIZE,
    matching: str = "auto",
    niter: int = 100,
    nredo: int = 5,
    backend: str = "auto",
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | None = None,
    tokens: str = "auto",
    num_classes: int | None = None,
    ignore_index: int = 255,
) -> dict[str, Any]:
    """Run the overclustering protocol on the val set; one entry ``k<K>`` per K with mIoU (percent) over seeds."""
    from franca.core.progress import ProgressBar
    from franca.data.images import SkipCounter
    from franca.eval.dense_features import collect_dense_features
    from franca.eval.segmentation_data import make_segmentation_loader

    if not clusters or min(clusters) < 1:
        raise ConfigError(f"--clusters must be positive numbers (got {list(clusters)})")
    clusters = list(dict.fromkeys(int(k) for k in clusters))
    seeds = list(seeds) or [0]
    device = device or torch.device("cpu")
    num_classes = int(num_classes or getattr(val_dataset, "num_classes", 0))
    if num_classes < 1:
        raise ConfigError("the number of classes is unknown; pass num_classes")
    counter = SkipCounter()
    loader = make_segmentation_loader(val_dataset, batch_size, num_workers)
    grids, masks = collect_dense_features(
        model, loader, device, num_classes, tokens, 1, counter, "val features"
    )
    num_images, rows, cols, dim = grids.shape
    reduced = standardize_and_reduce(grids.reshape(-1, dim).numpy(), pca_dim)
    masks = masks.long()
    backend_used = resolve_backend(backend)
    class_names = list(getattr(val_dataset, "class_names", []))
    if len(class_names) != num_classes:
        class_names = [f"class_{index}" for index in range(num_classes)]

    results: dict[str, Any] = {"protocol": "overcluster"}
    jobs = [(k, seed) for k in clusters for seed in seeds]
    per_k: dict[int, list[dict[str, Any]]] = {k: [] for k in clusters}
    for k, seed in ProgressBar(jobs, desc="k-means", unit="run", leave=False):
        k_used = min(k, reduced.shape[0])
        assignment = kmeans_assign(reduced, k_used, seed, niter, nredo, backend_used)
        cluster_maps = torch.from_numpy(assignment).reshape(num_images, rows, cols)
        per_k[k].append(
            overclustering_miou(cluster_maps, masks, k_used, num_classes, matching, mask_size, ignore_index)
        )
    for k, outcomes in per_k.items():
        values = [100.0 * outcome["miou"] for outcome in outcomes]
        mean = sum(values) / len(values)
        iou = torch.stack([outcome["per_class_iou"] for outcome in outcomes]).mean(dim=0)
        results[f"k{k}"] = {
            "miou": mean,
            "miou_std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)),
            "miou_per_seed": values,
            "clusters": min(k, reduced.shape[0]),
            "matching": outcomes[0]["matching"],
            "per_class_iou": {
                name: (None if math.isnan(float(v)) else 100.0 * float(v))
                for name, v in zip(class_names, iou)
            },
        }
    results.update(
        {
            "seeds": seeds,
            "num_classes": num_classes,
            "pca_dim": None if pca_dim is None else int(reduced.shape[1]),
            "mask_size": min(mask_size, masks.shape[-1], masks.shape[-2]),
            "kmeans_backend": backend_used,
            "niter": niter,
            "nredo": nredo,
            "num_patches": int(reduced.shape[0]),
            "num_val_images": counter.num_loaded,
            "num_skipped_val": counter.num_skipped,
        }
    )
    return results
