"""Linear semantic segmentation on frozen patch features (DINOv2's mmsegmentation "linear" head).

Protocol (method doc section 6):

- Frozen final-norm patch tokens (or RASA tokens, or the last ``n`` blocks concatenated), **computed once** for the
  train and val images (no augmentation, so no backbone forward during training).
- Head: ``BatchNorm2d(D)`` then a ``1x1 Conv2d(D, C)`` on the patch grid (DINOv2's ``BNHead``, conv initialised
  N(0, 0.01)); logits are upsampled **bilinearly** to the mask size and trained with pixel cross-entropy
  (ignore 255).
- Optimiser: ``adamw`` (default, lr 1e-3, weight decay 1e-4: converges in a few epochs, suited to small CPU runs) or
  ``sgd`` (momentum 0.9, lr 1e-3, weight decay 5e-4: Franca's VOC recipe, which runs 50 epochs at 518 px with random
  resizing); the learning rate decays linearly to 0 per step (mmsegmentation's poly schedule, power 1).
- Val: argmax of the upsampled logits, mIoU from one confusion matrix over the val set (percent).

Not reproduced: Franca's random-resize augmentation and sliding-window / multi-scale testing (features here are
precomputed once at one size).

:class:`LinearSegSettings` holds the settings, :func:`score_linear_seg` trains the head on precomputed patch grids and
masks (tensors, or :class:`~franca.features.Features`) and scores it into a :class:`LinearSegResult`, and
:func:`evaluate_linear_segmentation` extracts the features of both splits with :mod:`franca.features` and scores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from franca.core.errors import ConfigError, check_choice
from franca.core.progress import ProgressBar
from franca.eval import defaults
from franca.eval.common import model_device, split_features
from franca.eval.metrics import confusion_matrix, miou_from_confusion, per_class_percent, pixel_accuracy
from franca.eval.segmentation_data import (
    IGNORE_INDEX,
    TOKEN_CHOICES,
    dense_split,
    patch_token,
    segmentation_classes,
)
from franca.features import Features

OPTIMIZERS = defaults.SEG_OPTIMIZERS
DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-3}
DEFAULT_WEIGHT_DECAY = {"adamw": 1e-4, "sgd": 5e-4}


class LinearSegmentationHead(nn.Module):
    """BatchNorm2d + 1x1 conv over patch features [B, D, h, w] -> logits [B, C, h, w] (optionally upsampled)."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(embed_dim)
        self.conv = nn.Conv2d(embed_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: Tensor, output_size: tuple[int, int] | None = None) -> Tensor:
        """Logits [B, C, h, w], or [B, C, H, W] bilinearly upsampled when ``output_size`` = (H, W) is given."""
        logits = self.conv(self.bn(features))
        if output_size is not None and tuple(logits.shape[-2:]) != tuple(output_size):
            logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
        return logits


def _grid_to_channels(features: Tensor) -> Tensor:
    """[B, h, w, D] -> [B, D, h, w]."""
    return features.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def evaluate_linear_head(
    head: nn.Module,
    features: Tensor,
    masks: Tensor,
    num_classes: int,
    batch_size: int = 32,
    device: torch.device | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """Confusion matrix [C, C] of the head's predictions on features [N, h, w, D] against masks [N, H, W]."""
    device = device or torch.device("cpu")
    head.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for start in range(0, features.shape[0], batch_size):
        feats = _grid_to_channels(features[start : start + batch_size].to(device))
        target = masks[start : start + batch_size].to(device).long()
        logits = head(feats, tuple(target.shape[-2:]))
        conf += confusion_matrix(logits.argmax(dim=1), target, num_classes, ignore_index).cpu()
    return conf


@dataclass(frozen=True)
class LinearSegSettings:
    """Settings of the linear segmentation head.

    ``epochs`` (>= 1) over the precomputed train features, ``batch_size`` images per step, ``optimizer`` ``adamw`` or
    ``sgd`` with its ``lr`` and ``weight_decay`` (None: the optimiser's default, see ``DEFAULT_LR`` /
    ``DEFAULT_WEIGHT_DECAY``) and SGD ``momentum``; ``n_last_blocks``: patch tokens of that many last blocks
    concatenated; ``tokens``: ``auto`` / ``patch`` / ``rasa`` (:func:`~franca.eval.segmentation_data.patch_token`);
    ``seed`` of the head's initialisation and of the batch order.
    """

    epochs: int = 10
    batch_size: int = 16
    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    n_last_blocks: int = 1
    tokens: str = "auto"
    seed: int = 0
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 1:
            raise ConfigError(f"--train-batch-size must be at least 1 (got {self.batch_size})")
        if self.n_last_blocks < 1:
            raise ConfigError(f"--n-last-blocks must be at least 1 (got {self.n_last_blocks})")
        check_choice("--tokens", self.tokens, TOKEN_CHOICES)

    @property
    def resolved_lr(self) -> float:
        """The learning rate used: ``lr`` or the optimiser's default."""
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    @property
    def resolved_weight_decay(self) -> float:
        """The weight decay used: ``weight_decay`` or the optimiser's default."""
        return DEFAULT_WEIGHT_DECAY[self.optimizer] if self.weight_decay is None else self.weight_decay


@dataclass(frozen=True)
class LinearSegResult:
    """What :func:`score_linear_seg` measured: val mIoU and pixel accuracy (percent), per-class IoU (percent, None
    for a class absent from the val set), the mean train loss per epoch, the hyper-parameters used, the sizes, the
    trained ``head`` (not in :meth:`to_dict`) and (from Features) the unreadable images skipped."""

    miou: float
    per_class_iou: dict[str, float | None]
    pixel_accuracy: float
    train_loss: list[float]
    optimizer: str
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    num_classes: int
    n_last_blocks: int
    feature_dim: int
    num_train_images: int
    num_val_images: int
    head: nn.Module
    num_skipped_train: int | None = None
    num_skipped_val: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"miou", "per_class_iou", "pixel_accuracy", "train_loss", "optimizer", "lr", "weight_decay", "epochs",
        "batch_size", "protocol": "linear-seg", "num_classes", "n_last_blocks", "feature_dim", "num_train_images",
        "num_val_images", "num_skipped_train", "num_skipped_val"}`` (the last two when known)."""
        skipped = {
            key: value
            for key, value in (
                ("num_skipped_train", self.num_skipped_train),
                ("num_skipped_val", self.num_skipped_val),
            )
            if value is not None
        }
        return {
            "miou": self.miou,
            "per_class_iou": dict(self.per_class_iou),
            "pixel_accuracy": self.pixel_accuracy,
            "train_loss": list(self.train_loss),
            "optimizer": self.optimizer,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "protocol": "linear-seg",
            "num_classes": self.num_classes,
            "n_last_blocks": self.n_last_blocks,
            "feature_dim": self.feature_dim,
            "num_train_images": self.num_train_images,
            "num_val_images": self.num_val_images,
            **skipped,
        }


def _optimizer(head: nn.Module, settings: LinearSegSettings) -> torch.optim.Optimizer:
    lr, weight_decay = settings.resolved_lr, settings.resolved_weight_decay
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(head.parameters(), lr=lr, momentum=settings.momentum, weight_decay=weight_decay)


def _train_head(
    head: nn.Module,
    features: Tensor,
    masks: Tensor,
    settings: LinearSegSettings,
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> list[float]:
    """Train ``head`` on patch grids [N, h, w, D] and masks [N, S, S]: ``settings.epochs`` seeded shuffles in steps of
    ``batch_size`` images, the learning rate decaying linearly to 0 per step. Returns the mean loss per epoch."""
    generator = torch.Generator().manual_seed(settings.seed)
    opt = _optimizer(head, settings)
    num_samples = features.shape[0]
    total_steps = settings.epochs * ((num_samples + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / total_steps))
    losses: list[float] = []
    bar = ProgressBar(total=total_steps, desc="linear-seg", unit="step", disable=not progress)
    for _ in range(settings.epochs):
        head.train()
        order = torch.randperm(num_samples, generator=generator)
        epoch_loss, counted = 0.0, 0
        for start in range(0, num_samples, batch_size):
            index = order[start : start + batch_size]
            target = masks[index].to(device).long()
            logits = head(_grid_to_channels(features[index].to(device)), tuple(target.shape[-2:]))
            loss = F.cross_entropy(logits, target, ignore_index=settings.ignore_index)
            opt.zero_grad(set_to_none=True)
            if torch.isfinite(loss):  # an all-ignored batch gives NaN: nothing to learn from it
                loss.backward()
                opt.step()
                epoch_loss += float(loss.detach())
                counted += 1
            schedule.step()
            bar.update(1)
        losses.append(epoch_loss / max(counted, 1))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    return losses


def score_linear_seg(
    train: Tensor | Features,
    train_masks: Tensor | None,
    val: Tensor | Features,
    val_masks: Tensor | None,
    settings: LinearSegSettings | None = None,
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> LinearSegResult:
    """Train the linear head on precomputed features and score it on val.

    ``train`` / ``val`` are patch grids [N, h, w, D] (fp32) with label masks [N, S, S] (255 = ignore), or Features
    with the masks as targets. The head is initialised with ``torch.manual_seed(settings.seed)`` and trained on
    ``device`` (default: the CPU).
    """
    settings = settings if settings is not None else LinearSegSettings()
    train_features, train_masks = dense_split(train, train_masks, "train")
    val_features, val_masks = dense_split(val, val_masks, "val")
    device = torch.device(device) if device is not None else torch.device("cpu")
    batch_size = max(1, min(settings.batch_size, train_features.shape[0]))
    torch.manual_seed(settings.seed)
    head = LinearSegmentationHead(train_features.shape[-1], num_classes).to(device)
    losses = _train_head(head, train_features, train_masks, settings, batch_size, device, progress)
    conf = evaluate_linear_head(
        head, val_features, val_masks, num_classes, batch_size, device, settings.ignore_index
    )
    miou, iou = miou_from_confusion(conf)
    names = tuple(class_names or (f"class_{index}" for index in range(num_classes)))
    return LinearSegResult(
        miou=100.0 * miou,
        per_class_iou=per_class_percent(iou, names),
        pixel_accuracy=100.0 * pixel_accuracy(conf),
        train_loss=losses,
        optimizer=settings.optimizer,
        lr=settings.resolved_lr,
        weight_decay=settings.resolved_weight_decay,
        epochs=settings.epochs,
        batch_size=batch_size,
        num_classes=num_classes,
        n_last_blocks=settings.n_last_blocks,
        feature_dim=int(train_features.shape[-1]),
        num_train_images=int(train_features.shape[0]),
        num_val_images=int(val_features.shape[0]),
        head=head,
        num_skipped_train=train.num_skipped if isinstance(train, Features) else None,
        num_skipped_val=val.num_skipped if isinstance(val, Features) else None,
    )


def evaluate_linear_segmentation(
    model: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset,
    settings: LinearSegSettings | None = None,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    progress: bool = True,
) -> LinearSegResult:
    """Extract the frozen patch features of both splits once (items ``(image, mask)``; ``batch_size`` images per
    forward pass), train the head and score it (:func:`score_linear_seg`).

    ``num_classes`` defaults to the largest of the two data sets' ``num_classes``; the class names are the val set's.
    """
    settings = settings if settings is not None else LinearSegSettings()
    device = model_device(model, device)
    num_classes, class_names = segmentation_classes(val_dataset, train_dataset, num_classes)
    token = patch_token(model, settings.tokens, settings.n_last_blocks)
    train, val = split_features(
        model,
        train_dataset,
        val_dataset,
        (token,),
        batch_size,
        num_workers,
        device,
        settings.n_last_blocks,
        progress,
    )
    return score_linear_seg(
        train,
        None,
        val,
        None,
        settings,
        num_classes=num_classes,
        class_names=class_names,
        device=device,
        progress=progress,
    )
