"""Linear segmentation head: architecture, training on constructed features, a hand-set head scored against a
direct computation, the settings, and the model-level entry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from franca.core.constants import IMAGENET_MEAN, IMAGENET_STD
from franca.core.errors import ConfigError
from franca.eval.linear_seg import (
    LinearSegmentationHead,
    LinearSegSettings,
    evaluate_linear_head,
    evaluate_linear_segmentation,
    score_linear_seg,
)
from franca.eval.segmentation_data import SegmentationDataset
from franca.features import Features

PATCH = 4


def constructed_split(num_images: int, num_classes: int, grid: int, seed: int, extra_dims: int = 4):
    """Patch features whose first channels are the one-hot class of the patch (+ noise), and their masks.

    Classes vary per patch column only (vertical stripes), so bilinear upsampling of the logits is exact at pixels.
    """
    generator = torch.Generator().manual_seed(seed)
    column_classes = torch.randint(0, num_classes, (num_images, grid), generator=generator)
    patch_classes = column_classes[:, None, :].expand(num_images, grid, grid)
    features = F.one_hot(patch_classes, num_classes).float()
    features = torch.cat([features, torch.zeros(num_images, grid, grid, extra_dims)], dim=-1)
    features = features + 0.1 * torch.randn(features.shape, generator=generator)
    masks = patch_classes.repeat_interleave(PATCH, dim=1).repeat_interleave(PATCH, dim=2)
    return features, masks


def test_head_is_batchnorm_then_1x1_conv_with_bilinear_upsampling() -> None:
    head = LinearSegmentationHead(embed_dim=6, num_classes=3).eval()
    assert isinstance(head.bn, nn.BatchNorm2d) and head.conv.kernel_size == (1, 1)
    features = torch.randn(2, 6, 4, 4)
    small = head(features)
    reference = F.conv2d(
        F.batch_norm(features, head.bn.running_mean, head.bn.running_var, head.bn.weight, head.bn.bias),
        head.conv.weight,
        head.conv.bias,
    )
    assert torch.allclose(small, reference, atol=1e-6)
    large = head(features, (16, 16))
    assert torch.allclose(large, F.interpolate(reference, size=(16, 16), mode="bilinear"), atol=1e-6)


@pytest.mark.parametrize("optimizer,lr", [("adamw", 1e-2), ("sgd", 0.5)])
def test_features_encoding_the_class_give_near_perfect_miou(optimizer: str, lr: float) -> None:
    train_features, train_masks = constructed_split(24, num_classes=4, grid=4, seed=0)
    val_features, val_masks = constructed_split(8, num_classes=4, grid=4, seed=1)
    val_masks[:, 0, :] = 255  # ignored pixels must not count
    settings = LinearSegSettings(epochs=15, batch_size=8, optimizer=optimizer, lr=lr)
    result = score_linear_seg(train_features, train_masks, val_features, val_masks, settings, num_classes=4)
    assert result.miou > 98.0
    assert result.train_loss[-1] < result.train_loss[0] and len(result.train_loss) == 15
    assert list(result.per_class_iou) == ["class_0", "class_1", "class_2", "class_3"]
    assert (result.lr, result.optimizer, result.batch_size, result.feature_dim) == (lr, optimizer, 8, 8)


def test_features_without_class_information_give_low_miou() -> None:
    train_features, train_masks = constructed_split(24, num_classes=4, grid=4, seed=0)
    val_features, val_masks = constructed_split(8, num_classes=4, grid=4, seed=1)
    generator = torch.Generator().manual_seed(5)
    result = score_linear_seg(
        torch.randn(train_features.shape, generator=generator),
        train_masks,
        torch.randn(val_features.shape, generator=generator),
        val_masks,
        LinearSegSettings(epochs=5, lr=1e-2),
        num_classes=4,
    )
    assert result.miou < 50.0


class GrayLevelBackbone(nn.Module):
    """Stand-in backbone: the patch token is the one-hot of the patch's gray level / 60 (classes 0..3)."""

    patch_size = PATCH
    embed_dim = 4
    rasa = None

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        red = x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        labels = (F.avg_pool2d(red[:, None], PATCH)[:, 0] * 255.0 / 60).round().long().clamp(0, 3)
        tokens = F.one_hot(labels, 4).float().flatten(1, 2)
        return {"x_norm_patchtokens": tokens, "x_norm_clstoken": tokens.mean(dim=1)}


def test_evaluate_linear_segmentation_on_datasets(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir(parents=True)
        for index in range(count):
            mask = np.repeat(np.repeat(rng.integers(0, 4, (1, 4)), 16, axis=0), PATCH, axis=1).astype(
                np.uint8
            )
            Image.fromarray(np.stack([mask * 60] * 3, axis=-1)).save(
                tmp_path / split / "images" / f"{index}.png"
            )
            Image.fromarray(mask, mode="L").save(tmp_path / split / "masks" / f"{index}.png")
    train = SegmentationDataset(tmp_path, split="train", size=16, num_classes=4)
    val = SegmentationDataset(tmp_path, split="val", size=16, num_classes=4)
    settings = LinearSegSettings(epochs=20, batch_size=4, lr=5e-2)
    result = evaluate_linear_segmentation(GrayLevelBackbone(), train, val, settings, progress=False)
    results = result.to_dict()
    assert results["miou"] > 98.0 and isinstance(result.head, LinearSegmentationHead)
    assert (
        results["num_train_images"] == 12 and results["num_val_images"] == 4 and results["feature_dim"] == 4
    )
    assert set(results["per_class_iou"]) == {"class_0", "class_1", "class_2", "class_3"}
    assert list(results) == [
        "miou", "per_class_iou", "pixel_accuracy", "train_loss", "optimizer", "lr", "weight_decay", "epochs",
        "batch_size", "protocol", "num_classes", "n_last_blocks", "feature_dim", "num_train_images",
        "num_val_images", "num_skipped_train", "num_skipped_val",
    ]  # fmt: skip
    assert (results["num_skipped_train"], results["num_skipped_val"], results["weight_decay"]) == (0, 0, 1e-4)


def test_evaluate_linear_head_counts_pixels_of_a_hand_set_head() -> None:
    """A head whose conv copies channel c into logit c (BatchNorm at identity) predicts the argmax channel: its
    confusion matrix is the one of the argmax of the bilinearly upsampled features, computed here directly."""
    generator = torch.Generator().manual_seed(4)
    head = LinearSegmentationHead(embed_dim=3, num_classes=3).eval()
    with torch.no_grad():
        head.conv.weight.copy_(torch.eye(3)[:, :, None, None])
    features = torch.randn(5, 2, 2, 3, generator=generator)
    masks = torch.randint(0, 3, (5, 8, 8), generator=generator)
    masks[0, 0] = 255
    conf = evaluate_linear_head(head, features, masks, 3, batch_size=2)
    upsampled = F.interpolate(features.permute(0, 3, 1, 2) / (1 + 1e-5) ** 0.5, size=(8, 8), mode="bilinear")
    predicted, valid = upsampled.argmax(dim=1), masks != 255
    expected = torch.zeros(3, 3, dtype=torch.long)
    for target, prediction in zip(masks[valid].tolist(), predicted[valid].tolist()):
        expected[target, prediction] += 1
    assert torch.equal(conf, expected)


def test_score_linear_seg_reads_features_and_settings_are_checked() -> None:
    train_features, train_masks = constructed_split(12, num_classes=3, grid=4, seed=2)
    val_features, val_masks = constructed_split(4, num_classes=3, grid=4, seed=3)
    settings = LinearSegSettings(epochs=2, batch_size=64, optimizer="sgd")
    train = Features(targets=train_masks.to(torch.uint8), patch=train_features, num_skipped=1)
    val = Features(targets=val_masks.to(torch.uint8), patch=val_features, num_skipped=2)
    from_features = score_linear_seg(train, None, val, None, settings, num_classes=3)
    from_tensors = score_linear_seg(
        train_features, train_masks, val_features, val_masks, settings, num_classes=3
    )
    assert from_features.miou == pytest.approx(from_tensors.miou)
    assert from_features.batch_size == 12  # clipped to the train images
    assert (from_features.lr, from_features.weight_decay) == (1e-3, 5e-4)  # the SGD defaults
    assert (from_features.num_skipped_train, from_features.num_skipped_val) == (1, 2)
    for changes, message in (
        ({"optimizer": "adam"}, "optimizer"),
        ({"epochs": 0}, "--epochs"),
        ({"batch_size": 0}, "--train-batch-size"),
        ({"n_last_blocks": 0}, "--n-last-blocks"),
        ({"tokens": "cls"}, "--tokens"),
    ):
        with pytest.raises(ConfigError, match=message):
            LinearSegSettings(**changes)
