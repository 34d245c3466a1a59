"""The demo's settings for franca.eval's scoring functions (adapters over precomputed features)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from franca.apps.demo.data import DemoData
from franca.apps.demo.settings import NUM_SHAPE_CLASSES, EvalSettings
from franca.data.synth import CLASS_NAMES
from franca.eval.hummingbird import HummingbirdSettings, score_hummingbird
from franca.eval.knn import knn_classify
from franca.eval.linear import train_linear_probe
from franca.eval.overclustering import OverclusteringSettings, score_overclustering
from franca.eval.pca_maps import score_pca
from franca.eval.sliced import sliced_knn
from franca.features import Features
from franca.rasa import train_rasa

# The features of a split come from franca.features (TensorImages over the uint8 images, ImageNet-normalised on the
# device) and every protocol is franca.eval's scoring; the functions below only pick the demo's settings.
FEATURE_TOKENS: tuple[str, ...] = ("cls", "patch", "pooled")
SEGMENTATION_CLASS_NAMES: tuple[str, ...] = ("background", *CLASS_NAMES)


def _search_device(device: torch.device) -> torch.device:
    """Where the nearest-neighbour searches run: the GPU when the demo runs on one, else the CPU (with the exact
    torch search for HummingBird: on CPU it beat faiss ``IndexFlatIP`` by ~2x for the shapes here, tens of thousands
    of queries against a 32k bank)."""
    return device if device.type == "cuda" else torch.device("cpu")


def run_knn(train: Features, val: Features, settings: EvalSettings, device: torch.device) -> dict[str, Any]:
    """k-NN top-1/top-5 on the CLS token (train split as memory; the features' targets are the class labels)."""
    results = knn_classify(
        train.cls,
        train.targets,
        val.cls,
        val.targets,
        ks=(settings.knn_k,),
        temperature=settings.knn_temperature,
        num_classes=NUM_SHAPE_CLASSES,
        device=_search_device(device),
    )
    return {**results, "top1": results[f"k{settings.knn_k}"]["top1"]}


def run_linear(
    train: Features, val: Features, settings: EvalSettings, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """Linear probe on precomputed CLS (+ mean patch) features; head chosen on a held-out part of train."""
    return train_linear_probe(
        {"cls_blocks": train.cls, "pooled": train.pooled},
        train.targets,
        {"cls_blocks": val.cls, "pooled": val.pooled},
        val.targets,
        feature_sets=settings.linear_feature_sets,
        learning_rates=settings.linear_lrs,
        epochs=settings.linear_epochs,
        batch_size=settings.linear_batch_size,
        holdout_fraction=settings.linear_holdout,
        num_classes=NUM_SHAPE_CLASSES,
        embed_dim=int(train.cls.shape[1]),
        seed=seed,
        device=device,
    )


def run_sliced(
    train: Features, val: Features, settings: EvalSettings, device: torch.device, pca: bool = True
) -> dict[str, Any]:
    """k-NN on the first m dims of the CLS token (and on its top-m PCA directions) for m = d/16 ... d."""
    return sliced_knn(
        train.cls,
        train.targets,
        val.cls,
        val.targets,
        ks=(settings.knn_k,),
        temperature=settings.knn_temperature,
        pca=pca,
        num_classes=NUM_SHAPE_CLASSES,
        device=_search_device(device),
    )


def sliced_curve(results: dict[str, Any], series: str, k: int) -> dict[int, float]:
    """{dims: top-1} of one series ("sliced" or "pca") of a :func:`franca.eval.sliced.sliced_knn` result."""
    return {int(m): float(results[series][str(m)][f"k{k}"]["top1"]) for m in results["dims"]}


def run_hummingbird(
    train_patch: Tensor,
    val_patch: Tensor,
    data: DemoData,
    settings: EvalSettings,
    device: torch.device,
    projection: Tensor | None = None,
) -> dict[str, Any]:
    """HummingBird mIoU (percent) of val patch grids [N, h, w, D] against the demo's memory bank of train patches.

    ``projection`` [D, D] (a folded RASA matrix) maps bank and query features as ``z @ projection.T`` first.
    """
    result = score_hummingbird(
        train_patch,
        data.train.masks,
        val_patch,
        data.val.masks,
        HummingbirdSettings(
            k=settings.hummingbird_k, temperature=settings.hummingbird_temperature, search="torch"
        ),
        num_classes=data.num_classes,
        bank=data.bank,
        class_names=SEGMENTATION_CLASS_NAMES,
        device=_search_device(device),
        projection=projection,
    )
    return {
        "miou": result.miou,
        "pixel_accuracy": result.pixel_accuracy,
        "per_class_iou": result.per_class_iou,
        "k": result.k,
        "temperature": result.temperature,
        "memory_patches": result.memory_patches_total,
        "labelled_train_patches": data.bank.num_labelled,
        "num_val_images": result.num_val_images,
        "tokens": "rasa" if projection is not None else "patch",
    }


def run_overclustering(
    val_patch: Tensor, val_masks: Tensor, settings: EvalSettings, num_classes: int
) -> dict[str, Any]:
    """Overclustering mIoU (percent, mean over seeds) of the val patch features for each K, at the mask size."""
    overclustering = OverclusteringSettings(
        clusters=settings.overcluster_ks,
        seeds=settings.overcluster_seeds,
        pca_dim=settings.overcluster_pca_dim,
        mask_size=int(val_masks.shape[-1]),
        niter=settings.kmeans_iterations,
        nredo=settings.kmeans_restarts,
    )
    result = score_overclustering(val_patch, val_masks, overclustering, num_classes=num_classes)
    results: dict[str, Any] = {
        f"k{k}": {"miou": score.miou, "miou_std": score.miou_std, "miou_per_seed": score.miou_per_seed}
        for k, score in result.scores.items()
    }
    results.update(
        seeds=result.seeds,
        pca_dim=result.pca_dim,
        kmeans_iterations=settings.kmeans_iterations,
        kmeans_restarts=settings.kmeans_restarts,
        num_patches=result.num_patches,
    )
    return results


def run_rasa(
    train_patch: Tensor,
    val_patch: Tensor,
    settings: EvalSettings,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
) -> Any:
    """RASA on frozen patch features: trained on a seeded subset of train images, R^2 measured on the val split."""
    count, rows, cols, dim = train_patch.shape
    generator = torch.Generator().manual_seed(seed)
    subset = (
        torch.randperm(count, generator=generator)[: min(count, settings.rasa_train_images)].sort().values
    )
    return train_rasa(
        None,
        train_patch[subset].reshape(-1, rows * cols, dim),
        eval_data=val_patch.reshape(-1, rows * cols, dim),
        grid=(rows, cols),
        iterations=settings.rasa_iterations,
        epochs_per_iteration=settings.rasa_epochs,
        lr=settings.rasa_lr,
        batch_size=settings.rasa_batch_size,
        device=device,
        seed=seed,
        progress=progress,
    )


def pca_map_images(patch: Tensor, size: int) -> list[np.ndarray]:
    """RGB maps [size, size, 3] uint8 of the first 3 principal components of patch grids [n, h, w, D], fitted jointly."""
    return [np.asarray(image) for image in score_pca(patch).images(size)]


def colour_mask(mask: Tensor) -> np.ndarray:
    """A label mask [S, S] (0 background, 1..10 shapes, 255 ignore) as an RGB image [S, S, 3] uint8."""
    values = mask.numpy().astype(np.int64)
    rgb = np.full((*values.shape, 3), 255, dtype=np.uint8)
    valid = values < len(MASK_PALETTE)
    rgb[valid] = MASK_PALETTE[values[valid]]
    return rgb


MASK_PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
    ],
    dtype=np.uint8,
)
