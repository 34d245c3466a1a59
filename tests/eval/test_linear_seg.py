"""Linear segmentation head: architecture, training on constructed features, and the model-level wrapper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from franca.eval.linear_seg import LinearSegmentationHead, train_linear_head, train_linear_segmentation
from franca.eval.segmentation_data import IMAGENET_MEAN, IMAGENET_STD, SegmentationDataset

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
    result = train_linear_head(
        train_features,
        train_masks,
        val_features,
        val_masks,
        num_classes=4,
        epochs=15,
        batch_size=8,
        optimizer=optimizer,
        lr=lr,
        progress=False,
    )
    assert result["miou"] > 98.0
    assert result["train_loss"][-1] < result["train_loss"][0]
    assert result["per_class_iou"].shape == (4,)


def test_features_without_class_information_give_low_miou() -> None:
    train_features, train_masks = constructed_split(24, num_classes=4, grid=4, seed=0)
    val_features, val_masks = constructed_split(8, num_classes=4, grid=4, seed=1)
    generator = torch.Generator().manual_seed(5)
    result = train_linear_head(
        torch.randn(train_features.shape, generator=generator),
        train_masks,
        torch.randn(val_features.shape, generator=generator),
        val_masks,
        num_classes=4,
        epochs=5,
        lr=1e-2,
        progress=False,
    )
    assert result["miou"] < 50.0


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
        return {"x_norm_patchtokens": tokens}


def test_train_linear_segmentation_on_datasets(tmp_path: Path) -> None:
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
    result = train_linear_segmentation(
        GrayLevelBackbone(), train, val, epochs=20, train_batch_size=4, lr=5e-2
    )
    assert result["miou"] > 98.0
    assert result["num_train_images"] == 12 and result["num_val_images"] == 4 and result["feature_dim"] == 4
    assert set(result["per_class_iou"]) == {"class_0", "class_1", "class_2", "class_3"}
