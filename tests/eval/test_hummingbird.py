"""HummingBird core (retrieval, label fusion, patch label distributions), mIoU helper and the model-level protocol."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from franca.eval.hummingbird import (
    evaluate_hummingbird,
    exact_topk_inner_product,
    hummingbird_segment,
    patch_label_distributions,
)
from franca.eval.miou import confusion_matrix, miou_from_confusion
from franca.eval.segmentation_data import IMAGENET_MEAN, IMAGENET_STD, SegmentationDataset

PATCH = 8
GRAY_STEP = 40  # class c is drawn with gray level c * GRAY_STEP


# ------------------------------------------------------------------------------------------------ helpers
class ClassEncodingBackbone(nn.Module):
    """Stand-in backbone whose patch tokens are the one-hot class of the patch (read from its gray level) + noise.

    With ``random_features`` the tokens are pure noise instead, which carries no label information.
    """

    def __init__(self, num_classes: int, noise: float = 0.01, random_features: bool = False) -> None:
        super().__init__()
        self.patch_size = PATCH
        self.embed_dim = num_classes
        self.num_classes = num_classes
        self.noise = noise
        self.random_features = random_features
        self.rasa = None
        self.dummy = nn.Parameter(torch.zeros(1))
        self.generator = torch.Generator().manual_seed(123)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, _, height, width = x.shape
        red = x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # back to [0, 1]
        pooled = F.avg_pool2d(red[:, None], PATCH)[:, 0]  # [B, h, w]
        labels = (pooled * 255.0 / GRAY_STEP).round().long().clamp(0, self.num_classes - 1)
        tokens = F.one_hot(labels, self.num_classes).float().reshape(batch, -1, self.num_classes)
        noise = torch.randn(tokens.shape, generator=self.generator)
        if self.random_features:
            tokens = noise
        else:
            tokens = tokens + self.noise * noise
        return {"x_norm_patchtokens": tokens, "x_norm_clstoken": tokens.mean(dim=1)}


def write_stripe_tree(root: Path, num_images: int, num_classes: int, size: int = 32, seed: int = 0) -> Path:
    """Plain layout (images/ + masks/) whose masks have one random class per patch column (vertical stripes).

    Stripes keep bilinear upsampling of patch predictions exact at the pixel level (no four-patch corners).
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for index in range(num_images):
        column_classes = rng.integers(0, num_classes, size // PATCH)
        mask = np.repeat(np.repeat(column_classes[None, :], size, axis=0), PATCH, axis=1).astype(np.uint8)
        gray = (mask * GRAY_STEP).astype(np.uint8)
        Image.fromarray(np.stack([gray] * 3, axis=-1)).save(root / "images" / f"img_{index:03d}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"img_{index:03d}.png")
    return root


# ------------------------------------------------------------------------------------------------ mIoU
def test_confusion_matrix_and_miou_hand_example() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = confusion_matrix(pred, target, num_classes=4)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0], expected[0, 1] = 1, 1  # class 0: one right, one predicted as 1
    expected[1, 1] = 3  # class 1: three right (the ignored pixel is not counted)
    expected[2, 2], expected[2, 0] = 1, 1  # class 2: one right, one predicted as 0
    assert torch.equal(conf, expected)
    miou, iou = miou_from_confusion(conf)
    # IoU0 = 1 / (2 + 2 - 1) = 1/3; IoU1 = 3 / (3 + 4 - 3) = 3/4; IoU2 = 1 / (2 + 1 - 1) = 1/2; class 3 absent.
    assert iou[:3].tolist() == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert math.isnan(float(iou[3]))
    assert miou == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)


def test_confusion_matrix_rejects_out_of_range_labels() -> None:
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), num_classes=3)


# ------------------------------------------------------------------------------------------------ labels
def test_patch_label_distributions_fractions_and_ignore() -> None:
    mask = torch.full((1, 4, 8), 255, dtype=torch.long)
    # left 4x4 patch: 8 pixels class 0, 4 class 2, 4 ignored -> fractions 2/3, 0, 1/3
    mask[0, 0:2, 0:4] = 0
    mask[0, 2, 0:4] = 2
    # right 4x4 patch: all ignored except 1 pixel of class 1 -> (0, 1, 0)
    mask[0, 3, 7] = 1
    distributions, counts = patch_label_distributions(mask, patch_size=4, num_classes=3)
    assert distributions.shape == (1, 1, 2, 3)
    assert distributions[0, 0, 0].tolist() == pytest.approx([2 / 3, 0.0, 1 / 3])
    assert distributions[0, 0, 1].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert counts[0, 0].tolist() == [12.0, 1.0]
    empty, empty_counts = patch_label_distributions(torch.full((1, 4, 4), 255), patch_size=4, num_classes=3)
    assert empty.abs().sum() == 0 and empty_counts.sum() == 0


def test_patch_label_distributions_match_a_loop_reference_on_batches() -> None:
    generator = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 5, (3, 8, 12), generator=generator)
    masks[masks == 4] = 255
    distributions, _ = patch_label_distributions(masks, patch_size=4, num_classes=4)
    for b in range(3):
        for i in range(2):
            for j in range(3):
                patch = masks[b, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].reshape(-1)
                patch = patch[patch != 255]
                expected = [float((patch == c).sum()) / max(patch.numel(), 1) for c in range(4)]
                assert distributions[b, i, j].tolist() == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------ core
def test_hummingbird_segment_hand_computed_weights() -> None:
    angle = math.acos(0.98)
    bank = torch.tensor([[2.0, 0.0, 0.0], [math.cos(angle), math.sin(angle), 0.0], [0.0, 3.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.0, 0.0, 1.0]])
    query = torch.tensor([[5.0, 0.0, 0.0]])
    # cosines 1, 0.98, 0; weights softmax(cos / 0.02) over the k nearest
    for k in (2, 3):
        logits = [1.0 / 0.02, 0.98 / 0.02, 0.0][:k]
        exps = [math.exp(v - logits[0]) for v in logits]
        weights = [e / sum(exps) for e in exps]
        expected = [sum(w * float(labels[i, c]) for i, w in enumerate(weights)) for c in range(3)]
        for search in ("torch", "faiss"):
            out = hummingbird_segment(bank, labels, query, k=k, temperature=0.02, search=search)
            assert out.shape == (1, 3)
            assert out[0].tolist() == pytest.approx(expected, abs=1e-6)
    e = math.e
    assert expected == pytest.approx([e / (1 + e) + 0.25 / (1 + e), 0.75 / (1 + e), 0.0], abs=1e-6)


def test_faiss_search_equals_torch_search() -> None:
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(500, 16, generator=generator)
    labels = torch.softmax(torch.randn(500, 5, generator=generator), dim=1)
    queries = torch.randn(40, 16, generator=generator)
    torch_out = hummingbird_segment(bank, labels, queries, k=30, search="torch", query_chunk=7, bank_chunk=64)
    faiss_out = hummingbird_segment(bank, labels, queries, k=30, search="faiss")
    assert torch.allclose(torch_out, faiss_out, atol=1e-5)


def test_chunked_search_equals_unchunked_reference() -> None:
    generator = torch.Generator().manual_seed(2)
    bank = F.normalize(torch.randn(300, 8, generator=generator), dim=1)
    queries = F.normalize(torch.randn(50, 8, generator=generator), dim=1)
    reference_scores, reference_indices = (queries @ bank.T).topk(10, dim=1)
    scores, indices = exact_topk_inner_product(bank, queries, k=10, query_chunk=7, bank_chunk=13)
    assert torch.equal(indices, reference_indices)
    assert torch.allclose(scores, reference_scores, atol=1e-6)
    # k larger than a bank chunk and than the bank itself
    scores, indices = exact_topk_inner_product(bank[:20], queries, k=50, query_chunk=64, bank_chunk=6)
    assert indices.shape == (50, 20)
    assert torch.equal(indices, (queries @ bank[:20].T).topk(20, dim=1).indices)


# ------------------------------------------------------------------------------------------------ protocol
@pytest.fixture(scope="module")
def stripe_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[SegmentationDataset, SegmentationDataset]:
    base = tmp_path_factory.mktemp("hb")
    train = write_stripe_tree(base / "train", num_images=10, num_classes=4, seed=0)
    val = write_stripe_tree(base / "val", num_images=6, num_classes=4, seed=1)
    return (
        SegmentationDataset(train, size=32, num_classes=4),
        SegmentationDataset(val, size=32, num_classes=4),
    )


def test_one_hot_features_give_perfect_miou(stripe_data) -> None:
    train, val = stripe_data
    model = ClassEncodingBackbone(num_classes=4)
    results = evaluate_hummingbird(model, train, val, k=30, batch_size=4, search="torch")
    assert results["miou"] == pytest.approx(100.0)
    assert results["memory_patches_total"] == 10 * 16
    assert results["num_val_images"] == 6 and results["num_train_images"] == 10
    assert not results["memory_subsampled"]


def test_random_features_give_low_miou(stripe_data) -> None:
    train, val = stripe_data
    model = ClassEncodingBackbone(num_classes=4, random_features=True)
    results = evaluate_hummingbird(model, train, val, k=30, batch_size=4)
    assert results["miou"] < 50.0


def test_subsampled_memory_averages_seeds(stripe_data) -> None:
    train, val = stripe_data
    model = ClassEncodingBackbone(num_classes=4)
    results = evaluate_hummingbird(model, train, val, k=5, memory_size=60, seeds=[0, 1, 2], batch_size=4)
    assert results["memory_subsampled"] and results["memory_size"] == 60
    assert results["seeds"] == [0, 1, 2] and len(results["miou_per_seed"]) == 3
    assert results["miou"] == pytest.approx(sum(results["miou_per_seed"]) / 3)
    assert results["miou"] > 90.0
