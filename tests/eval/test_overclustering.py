"""Overclustering: cluster-to-class matching rules, mIoU of matched clusters, k-means backends, scoring a hand-made
clustering, the settings and the protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from franca.core.constants import IMAGENET_MEAN, IMAGENET_STD
from franca.core.errors import ConfigError
from franca.eval.overclustering import (
    OverclusteringSettings,
    cluster_class_counts,
    evaluate_overclustering,
    greedy_precision_matching,
    hungarian_matching,
    kmeans_assign,
    match_clusters,
    overclustering_miou,
    score_overclustering,
)
from franca.eval.segmentation_data import SegmentationDataset
from franca.features import Features

PATCH = 8
GRAY_STEP = 50


def test_greedy_precision_matching_hand_example() -> None:
    # rows: clusters, columns: classes (pixel counts)
    counts = np.array(
        [
            [8, 2, 0],  # precision 0.8 / 0.2 / 0 -> class 0
            [1, 1, 6],  # -> class 2
            [5, 5, 0],  # tie between 0 and 1 -> lowest id, class 0
            [0, 3, 1],  # -> class 1
            [0, 0, 0],  # empty cluster -> class 0
            [40, 60, 0],  # precision 0.4 / 0.6: class 1, although class 0 has more pixels overall
        ]
    )
    assert greedy_precision_matching(counts).tolist() == [0, 2, 0, 1, 0, 1]
    mapping, rule = match_clusters(counts, "auto")  # 6 clusters, 3 classes -> greedy
    assert rule == "greedy" and mapping.tolist() == [0, 2, 0, 1, 0, 1]


def test_hungarian_matching_is_one_to_one_on_iou() -> None:
    # Greedy sends both clusters 0 and 1 to class 0 (cluster 1: precision 0.6 vs 0.4); the IoU-optimal
    # one-to-one matching sends cluster 0 -> class 0 (IoU 10/16), cluster 1 -> class 1 (IoU 4/10), 2 -> 2 (IoU 1):
    # total 2.025, against 0 + 6/20 + 1 for the swap.
    counts = np.array([[10, 0, 0], [6, 4, 0], [0, 0, 5]])
    assert greedy_precision_matching(counts).tolist() == [0, 0, 2]
    assert hungarian_matching(counts).tolist() == [0, 1, 2]
    mapping, rule = match_clusters(counts, "auto")  # K == classes -> Hungarian
    assert rule == "hungarian" and mapping.tolist() == [0, 1, 2]
    # more clusters than classes: the unmatched cluster goes to class 0
    counts = np.array([[0, 9, 0], [0, 1, 0], [0, 0, 7], [8, 0, 0]])
    assert hungarian_matching(counts).tolist() == [1, 0, 2, 0]


def test_cluster_class_counts_and_matched_miou() -> None:
    clusters = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])
    targets = torch.tensor([[0, 0, 1, 255], [1, 1, 2, 2]])
    counts = cluster_class_counts(clusters, targets, num_clusters=4, num_classes=3)
    assert counts.tolist() == [[2, 0, 0], [0, 1, 0], [0, 2, 0], [0, 0, 2]]
    result = overclustering_miou(clusters[None], targets[None], 4, 3, matching="greedy", mask_size=100)
    assert result["mapping"].tolist() == [0, 1, 1, 2] and result["miou"] == pytest.approx(1.0)
    assert result["mask_shape"] == (2, 4)  # each side clipped to the mask's, never upsampled
    # one cluster covering two classes: class 1 gets the cluster (2 of its 3 pixels), class 0 becomes 0 IoU
    merged = torch.tensor([[0, 0, 0, 1]])
    target = torch.tensor([[0, 1, 1, 2]])
    result = overclustering_miou(merged[None], target[None], 2, 3, matching="greedy", mask_size=4)
    # cluster 0 -> class 1 (2/3 precision); class 0 IoU 0, class 1 IoU 2/3, class 2 IoU 0 (cluster 1 -> class 2)
    assert result["mapping"].tolist() == [1, 2]
    assert result["per_class_iou"].tolist() == pytest.approx([0.0, 2 / 3, 1.0])


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_kmeans_backends_recover_separated_blobs(backend: str) -> None:
    if backend == "faiss":
        pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    centres = np.eye(5, dtype=np.float32) * 10
    truth = np.repeat(np.arange(5), 40)
    points = centres[truth] + rng.normal(scale=0.1, size=(200, 5)).astype(np.float32)
    labels = kmeans_assign(points, 5, seed=3, backend=backend)
    # same partition up to renaming: each true blob maps to exactly one cluster and vice versa
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 5 and len({a for a, _ in pairs}) == 5 and len({b for _, b in pairs}) == 5
    assert kmeans_assign(points, 1000, backend=backend).max() < 200  # K clipped to the number of points


class ClassEncodingBackbone(nn.Module):
    """Stand-in backbone: patch token = one-hot class of the patch (its gray level) + noise, or pure noise."""

    patch_size = PATCH
    rasa = None

    def __init__(self, num_classes: int, random_features: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = num_classes
        self.random_features = random_features
        self.dummy = nn.Parameter(torch.zeros(1))
        self.generator = torch.Generator().manual_seed(7)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        red = x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        labels = (F.avg_pool2d(red[:, None], PATCH)[:, 0] * 255.0 / GRAY_STEP).round().long()
        tokens = F.one_hot(labels.clamp(0, self.num_classes - 1), self.num_classes).float().flatten(1, 2)
        noise = torch.randn(tokens.shape, generator=self.generator)
        patch = noise if self.random_features else tokens + 0.01 * noise
        return {"x_norm_patchtokens": patch, "x_norm_clstoken": patch.mean(dim=1)}


@pytest.fixture(scope="module")
def patch_block_data(tmp_path_factory: pytest.TempPathFactory) -> SegmentationDataset:
    """Plain-layout val set: 32 px images, one random class (of 4) per 8 px patch, gray level encoding the class."""
    root = tmp_path_factory.mktemp("overcluster")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for index in range(8):
        mask = np.kron(rng.integers(0, 4, (4, 4)), np.ones((PATCH, PATCH), dtype=np.int64)).astype(np.uint8)
        Image.fromarray(np.stack([mask * GRAY_STEP] * 3, axis=-1)).save(root / "images" / f"{index}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{index}.png")
    return SegmentationDataset(root, size=32, num_classes=4)


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_one_hot_features_give_perfect_overclustering(patch_block_data, backend: str) -> None:
    if backend == "faiss":
        pytest.importorskip("faiss")
    model = ClassEncodingBackbone(num_classes=4)
    settings = OverclusteringSettings(clusters=(4, 12), seeds=(0, 1), backend=backend, mask_size=16)
    results = evaluate_overclustering(model, patch_block_data, settings, batch_size=4).to_dict()
    assert results["k4"]["matching"] == "hungarian" and results["k12"]["matching"] == "greedy"
    assert results["k4"]["miou"] == pytest.approx(100.0)
    assert results["k12"]["miou"] == pytest.approx(100.0)
    assert results["k12"]["miou_per_seed"] == pytest.approx([100.0, 100.0])
    assert results["num_patches"] == 8 * 16 and results["mask_size"] == 16 and results["pca_dim"] == 4


def test_random_features_give_low_overclustering_miou(patch_block_data) -> None:
    model = ClassEncodingBackbone(num_classes=4, random_features=True)
    settings = OverclusteringSettings(clusters=(4,), seeds=(0,), mask_size=32)
    results = evaluate_overclustering(model, patch_block_data, settings).to_dict()
    assert results["k4"]["miou"] < 50.0


def test_score_overclustering_of_a_hand_made_clustering() -> None:
    # 2 images of 2 x 2 patches (2 px each, masks 4 x 4). The top row of each image has one feature A, the bottom row
    # another feature B: K = 2 clusters {top, bottom}. Top row pixels: class 0 (left) and class 1 (right); bottom
    # row: class 2. Greedy matching: top -> class 0 (a 50/50 tie goes to the lower class), bottom -> class 2.
    # IoU0 = 2 / 4 = 1/2 (the predicted 0s cover both top patches), IoU1 = 0, IoU2 = 1: mIoU 50 %.
    grid = torch.zeros(2, 2, 2, 3)
    grid[:, 0] = torch.tensor([1.0, 0.0, 2.0])
    grid[:, 1] = torch.tensor([0.0, 3.0, -1.0])
    patch_classes = torch.tensor([[0, 1], [2, 2]]).expand(2, 2, 2)
    masks = patch_classes.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    settings = OverclusteringSettings(
        clusters=(2,), seeds=(0, 1), pca_dim=None, backend="sklearn", mask_size=100
    )
    result = score_overclustering(grid, masks, settings, num_classes=3, class_names=("a", "b", "c"))
    score = result.scores[2]
    assert score.matching == "greedy" and score.clusters == 2
    assert score.miou_per_seed == pytest.approx([50.0, 50.0]) and score.miou_std == pytest.approx(0.0)
    assert score.per_class_iou == pytest.approx({"a": 50.0, "b": 0.0, "c": 100.0})
    assert (result.num_patches, result.mask_size, result.pca_dim, result.num_val_images) == (8, 4, None, 2)
    results = result.to_dict()
    assert list(results) == [
        "protocol", "k2", "seeds", "num_classes", "pca_dim", "mask_size", "kmeans_backend", "niter", "nredo",
        "num_patches", "num_val_images",
    ]  # fmt: skip
    assert list(results["k2"]) == [
        "miou",
        "miou_std",
        "miou_per_seed",
        "clusters",
        "matching",
        "per_class_iou",
    ]
    from_features = score_overclustering(
        Features(targets=masks.to(torch.uint8), patch=grid, num_skipped=3), None, settings, num_classes=3
    )
    assert from_features.scores[2].miou_per_seed == pytest.approx([50.0, 50.0])
    assert from_features.to_dict()["num_skipped_val"] == 3


def test_overclustering_settings_are_checked() -> None:
    for changes, message in (
        ({"clusters": ()}, "--clusters"),
        ({"clusters": (0, 5)}, "--clusters"),
        ({"matching": "best"}, "--matching"),
        ({"backend": "torch"}, "--kmeans-backend"),
        ({"tokens": "cls"}, "--tokens"),
    ):
        with pytest.raises(ConfigError, match=message):
            OverclusteringSettings(**changes)
