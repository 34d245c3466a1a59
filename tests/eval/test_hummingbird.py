"""HummingBird: patch label distributions, the label bank, label fusion, scoring on hand-made banks whose neighbours
are known, streaming against holding, and the model-level protocol."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from franca.core.constants import IMAGENET_MEAN, IMAGENET_STD
from franca.core.errors import ConfigError, DataError
from franca.eval.hummingbird import (
    HummingbirdScorer,
    HummingbirdSettings,
    evaluate_hummingbird,
    label_bank,
    patch_label_distributions,
    score_hummingbird,
    seeded_subset,
)
from franca.eval.segmentation_data import SegmentationDataset
from franca.features import extract_features

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


def test_label_bank_keeps_labelled_patches_and_draws_seeded_subsets() -> None:
    masks = torch.full((2, 4, 8), 255, dtype=torch.uint8)  # 2 images of 1 x 2 patches of 4 px
    masks[0, :, :4] = 1  # image 0, patch 0: class 1
    masks[1, 0, 4:] = 0  # image 1, patch 1: class 0 (4 pixels), the rest ignored
    bank = label_bank(masks, patch_size=4, num_classes=2)
    assert bank.indices.tolist() == [0, 3] and bank.num_labelled == 2 and bank.num_patches == 4
    assert bank.distributions.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    generator = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 3, (6, 8, 8), generator=generator, dtype=torch.uint8)
    masks[0] = 255  # 4 unlabelled patches
    full = label_bank(masks, 4, 3, chunk=4)
    assert full.indices.tolist() == list(range(4, 24)) and full.num_labelled == 20
    subset = label_bank(masks, 4, 3, memory_size=7, seed=5, chunk=2)
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(5))[:7].sort().values
    assert torch.equal(subset.indices, full.indices[expected]) and subset.num_labelled == 20
    assert torch.equal(subset.distributions, full.distributions[expected])
    assert seeded_subset(20, 20, 0) is None and seeded_subset(20, None, 0) is None
    with pytest.raises(DataError, match="empty"):
        label_bank(torch.full((1, 4, 4), 255), 4, 3)


def test_fusion_weights_are_a_softmax_of_the_cosines_over_the_k_nearest() -> None:
    angle = math.acos(0.98)
    bank = torch.tensor([[2.0, 0.0, 0.0], [math.cos(angle), math.sin(angle), 0.0], [0.0, 3.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.0, 0.0, 1.0]])
    query = torch.tensor([[5.0, 0.0, 0.0]])
    # cosines 1, 0.98, 0; weights softmax(cos / 0.02) over the k nearest
    searches = ["torch"] + (["faiss"] if faiss_installed() else [])
    for k in (2, 3):
        logits = [1.0 / 0.02, 0.98 / 0.02, 0.0][:k]
        exps = [math.exp(v - logits[0]) for v in logits]
        weights = [e / sum(exps) for e in exps]
        expected = [sum(w * float(labels[i, c]) for i, w in enumerate(weights)) for c in range(3)]
        for search in searches:
            settings = HummingbirdSettings(k=k, temperature=0.02, search=search)
            (out,) = HummingbirdScorer(bank, labels, settings, num_classes=3).distributions(query)
            assert out.shape == (1, 3)
            assert out[0].tolist() == pytest.approx(expected, abs=1e-6)
    e = math.e
    assert expected == pytest.approx([e / (1 + e) + 0.25 / (1 + e), 0.75 / (1 + e), 0.0], abs=1e-6)


def faiss_installed() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def test_faiss_scorer_equals_torch_scorer() -> None:
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(500, 16, generator=generator)
    labels = torch.softmax(torch.randn(500, 5, generator=generator), dim=1)
    queries = torch.randn(40, 16, generator=generator)
    small_chunks = HummingbirdSettings(search="torch", query_chunk=7, bank_chunk=64)
    (torch_out,) = HummingbirdScorer(bank, labels, small_chunks, num_classes=5).distributions(queries)
    (faiss_out,) = HummingbirdScorer(
        bank, labels, HummingbirdSettings(search="faiss"), num_classes=5
    ).distributions(queries)
    assert torch.allclose(torch_out, faiss_out, atol=1e-5)


def two_class_split(columns: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch grids [N, 1, 2, 2] (one row of two 8 px patches) whose feature is the one-hot class of the patch, and
    their masks [N, 8, 16] with that class in each patch."""
    classes = torch.tensor(columns)  # [N, 2]
    grids = F.one_hot(classes, 2).float()[:, None]  # [N, 1, 2, 2]
    masks = classes.repeat_interleave(8, dim=1)[:, None, :].expand(-1, 8, -1).contiguous()  # [N, 8, 16]
    return grids, masks


def test_score_hummingbird_on_a_hand_made_bank() -> None:
    # train: every patch's feature is the one-hot of its class, so each val patch's nearest bank entries are the
    # patches of its own class: a perfect segmentation.
    train, train_masks = two_class_split([[0, 1], [1, 1], [0, 0]])
    val, val_masks = two_class_split([[1, 0], [0, 0]])
    settings = HummingbirdSettings(k=2, search="torch")
    result = score_hummingbird(
        train, train_masks, val, val_masks, settings, num_classes=2, class_names=("a", "b")
    )
    assert result.miou == pytest.approx(100.0) and result.pixel_accuracy == pytest.approx(100.0)
    assert result.per_class_iou == pytest.approx({"a": 100.0, "b": 100.0})
    assert (result.memory_size, result.memory_patches_total, result.num_val_images) == (6, 6, 2)
    # flipped val features point at the other class: every pixel is wrong, both IoUs are 0
    flipped = score_hummingbird(train, train_masks, 1 - val, val_masks, settings, num_classes=2)
    assert flipped.miou == pytest.approx(0.0) and flipped.pixel_accuracy == pytest.approx(0.0)
    # a bank of the class-0 train patches only (flat patches 0, 4, 5): every val pixel is predicted 0
    bank = label_bank(train_masks, 8, 2)
    only_zero = dataclasses.replace(
        bank, indices=bank.indices[[0, 4, 5]], distributions=bank.distributions[[0, 4, 5]]
    )
    result = score_hummingbird(train, train_masks, val, val_masks, settings, num_classes=2, bank=only_zero)
    # val pixels: class 0 in 3 of 4 patch columns, class 1 in 1; prediction 0 everywhere -> IoU0 = 3/4, IoU1 = 0
    assert result.per_class_iou == pytest.approx({"class_0": 75.0, "class_1": 0.0})
    assert result.miou == pytest.approx(37.5) and result.memory_size == 3


def test_streaming_equals_scoring_held_features_and_a_projection_acts_on_both_sides() -> None:
    generator = torch.Generator().manual_seed(3)
    masks = torch.randint(0, 3, (10, 16, 16), generator=generator)
    grids = torch.randn(10, 2, 2, 6, generator=generator)
    train, train_masks, val, val_masks = grids[:6], masks[:6], grids[6:], masks[6:]
    settings = HummingbirdSettings(k=5, memory_size=10, seeds=(0, 1), search="torch")
    held = score_hummingbird(train, train_masks, val, val_masks, settings, num_classes=3)
    bank = label_bank(train_masks, 8, 3)
    scorer = HummingbirdScorer(
        train.reshape(-1, 6)[bank.indices], bank.distributions, settings, num_classes=3
    )
    for start in (0, 1, 3):  # val images in uneven batches
        stop = {0: 1, 1: 3, 3: 4}[start]
        scorer.update(val[start:stop], val_masks[start:stop])
    streamed = scorer.result()
    assert streamed.to_dict() == held.to_dict()
    assert held.seeds == [0, 1] and held.memory_subsampled and len(held.miou_per_seed) == 2
    projection = torch.linalg.qr(torch.randn(6, 6, generator=generator))[0]
    rotated = score_hummingbird(
        train @ projection.T, train_masks, val @ projection.T, val_masks, settings, num_classes=3
    )
    projected = score_hummingbird(
        train, train_masks, val, val_masks, settings, num_classes=3, projection=projection
    )
    assert projected.miou_per_seed == pytest.approx(rotated.miou_per_seed)


def test_settings_are_checked() -> None:
    for changes, message in (
        ({"k": 0}, "--k"),
        ({"temperature": 0.0}, "--temperature"),
        ({"memory_size": 0}, "--memory-size"),
        ({"search": "annoy"}, "--search"),
        ({"tokens": "cls"}, "--tokens"),
    ):
        with pytest.raises(ConfigError, match=message):
            HummingbirdSettings(**changes)


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
    results = evaluate_hummingbird(
        model, train, val, HummingbirdSettings(k=30, search="torch"), batch_size=4
    ).to_dict()
    assert results["miou"] == pytest.approx(100.0)
    assert results["memory_patches_total"] == 10 * 16
    assert results["num_val_images"] == 6 and results["num_train_images"] == 10
    assert not results["memory_subsampled"]


def test_random_features_give_low_miou(stripe_data) -> None:
    train, val = stripe_data
    model = ClassEncodingBackbone(num_classes=4, random_features=True)
    results = evaluate_hummingbird(model, train, val, HummingbirdSettings(k=30), batch_size=4).to_dict()
    assert results["miou"] < 50.0


def test_subsampled_memory_averages_seeds(stripe_data) -> None:
    train, val = stripe_data
    model = ClassEncodingBackbone(num_classes=4)
    settings = HummingbirdSettings(k=5, memory_size=60, seeds=(0, 1, 2))
    results = evaluate_hummingbird(model, train, val, settings, batch_size=4).to_dict()
    assert results["memory_subsampled"] and results["memory_size"] == 60
    assert results["seeds"] == [0, 1, 2] and len(results["miou_per_seed"]) == 3
    assert results["miou"] == pytest.approx(sum(results["miou_per_seed"]) / 3)
    assert results["miou"] > 90.0


def test_model_level_result_equals_scoring_the_extracted_features(stripe_data) -> None:
    """The streamed protocol gives what :func:`score_hummingbird` gives on the same features held in memory."""
    from franca.eval.common import make_loader

    train, val = stripe_data
    model = ClassEncodingBackbone(num_classes=4, noise=0.3)
    settings = HummingbirdSettings(k=7, memory_size=100, seeds=(3, 4), search="torch")
    model.generator.manual_seed(9)
    streamed = evaluate_hummingbird(model, train, val, settings, batch_size=4, progress=False)
    model.generator.manual_seed(9)  # the same noise again: train first, then val, in the same batches
    held_train = extract_features(model, make_loader(train, 4), ("patch",), progress=False)
    held_val = extract_features(model, make_loader(val, 4), ("patch",), progress=False)
    held = score_hummingbird(held_train, None, held_val, None, settings, num_classes=4)
    expected, got = held.to_dict(), streamed.to_dict()
    assert got.pop("per_class_iou") == pytest.approx(expected.pop("per_class_iou"))
    assert got.pop("miou_per_seed") == pytest.approx(expected.pop("miou_per_seed"))
    for key, value in expected.items():
        assert got[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert (got["num_train_images"], got["num_skipped_train"], got["num_unlabelled_train_patches"]) == (
        10,
        0,
        0,
    )
