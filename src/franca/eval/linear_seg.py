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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from franca.core.errors import ConfigError
from franca.eval import defaults
from franca.eval.miou import confusion_matrix, miou_from_confusion, pixel_accuracy

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


def train_linear_head(
    train_features: Tensor,
    train_masks: Tensor,
    val_features: Tensor,
    val_masks: Tensor,
    num_classes: int,
    epochs: int = 10,
    batch_size: int = 16,
    optimizer: str = "adamw",
    lr: float | None = None,
    weight_decay: float | None = None,
    momentum: float = 0.9,
    seed: int = 0,
    device: torch.device | None = None,
    ignore_index: int = 255,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the linear head on precomputed features and evaluate it.

    ``*_features`` are patch grids [N, h, w, D] (fp32), ``*_masks`` label maps [N, H, W] (255 = ignore). Returns
    ``miou`` (percent), ``per_class_iou`` [C] (fractions, NaN for absent classes), ``pixel_accuracy`` (percent),
    ``train_loss`` (mean per epoch), the trained ``head`` and the resolved hyper-parameters.
    """
    from franca.core.progress import ProgressBar

    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1 (got {epochs})")
    if train_features.shape[0] != train_masks.shape[0]:
        raise ValueError(f"{train_features.shape[0]} train feature grids but {train_masks.shape[0]} masks")
    device = device or torch.device("cpu")
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    weight_decay = DEFAULT_WEIGHT_DECAY[optimizer] if weight_decay is None else weight_decay
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = LinearSegmentationHead(train_features.shape[-1], num_classes).to(device)
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    num_samples = train_features.shape[0]
    batch_size = max(1, min(batch_size, num_samples))
    steps_per_epoch = (num_samples + batch_size - 1) // batch_size
    total_steps = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / total_steps))

    losses: list[float] = []
    bar = ProgressBar(total=total_steps, desc="linear-seg", unit="step", disable=not progress)
    for _ in range(epochs):
        head.train()
        order = torch.randperm(num_samples, generator=generator)
        epoch_loss, counted = 0.0, 0
        for start in range(0, num_samples, batch_size):
            index = order[start : start + batch_size]
            feats = _grid_to_channels(train_features[index].to(device))
            target = train_masks[index].to(device).long()
            logits = head(feats, tuple(target.shape[-2:]))
            loss = F.cross_entropy(logits, target, ignore_index=ignore_index)
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

    conf = evaluate_linear_head(head, val_features, val_masks, num_classes, batch_size, device, ignore_index)
    miou, iou = miou_from_confusion(conf)
    return {
        "miou": 100.0 * miou,
        "per_class_iou": iou,
        "pixel_accuracy": 100.0 * pixel_accuracy(conf),
        "train_loss": losses,
        "head": head,
        "optimizer": optimizer,
        "lr": lr,
        "weight_decay": weight_decay,
        "epochs": epochs,
        "batch_size": batch_size,
    }


def train_linear_segmentation(
    model: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset,
    epochs: int = 10,
    train_batch_size: int = 16,
    optimizer: str = "adamw",
    lr: float | None = None,
    weight_decay: float | None = None,
    momentum: float = 0.9,
    n_last_blocks: int = 1,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | None = None,
    tokens: str = "auto",
    seed: int = 0,
    num_classes: int | None = None,
    ignore_index: int = 255,
) -> dict[str, Any]:
    """Extract frozen patch features of both splits once, train the linear head, return the val metrics.

    ``batch_size`` is for feature extraction, ``train_batch_size`` for the head's steps. The result holds ``miou``
    (percent), ``per_class_iou`` (class name -> percent, None for classes absent from the val set) and run facts; the
    trained head is under ``head`` (drop it before writing JSON).
    """
    import math

    from franca.data.images import SkipCounter
    from franca.eval.dense_features import collect_dense_features
    from franca.eval.segmentation_data import make_segmentation_loader

    device = device or torch.device("cpu")
    if num_classes is None:
        num_classes = max(
            int(getattr(train_dataset, "num_classes", 0)), int(getattr(val_dataset, "num_classes", 0))
        )
    if num_classes < 1:
        raise ConfigError("the number of classes is unknown; pass num_classes")
    train_counter, val_counter = SkipCounter(), SkipCounter()
    train_features, train_masks = collect_dense_features(
        model,
        make_segmentation_loader(train_dataset, batch_size, num_workers),
        device,
        num_classes,
        tokens,
        n_last_blocks,
        train_counter,
        desc="train features",
    )
    val_features, val_masks = collect_dense_features(
        model,
        make_segmentation_loader(val_dataset, batch_size, num_workers),
        device,
        num_classes,
        tokens,
        n_last_blocks,
        val_counter,
        desc="val features",
    )
    result = train_linear_head(
        train_features,
        train_masks,
        val_features,
        val_masks,
        num_classes,
        epochs=epochs,
        batch_size=train_batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        seed=seed,
        device=device,
        ignore_index=ignore_index,
    )
    class_names = list(getattr(val_dataset, "class_names", []))
    if len(class_names) != num_classes:
        class_names = [f"class_{index}" for index in range(num_classes)]
    iou = result.pop("per_class_iou")
    result.update(
        {
            "protocol": "linear-seg",
            "per_class_iou": {
                name: (None if math.isnan(float(value)) else 100.0 * float(value))
                for name, value in zip(class_names, iou)
            },
            "num_classes": num_classes,
            "n_last_blocks": n_last_blocks,
            "feature_dim": int(train_features.shape[-1]),
            "num_train_images": train_counter.num_loaded,
            "num_val_images": val_counter.num_loaded,
            "num_skipped_train": train_counter.num_skipped,
            "num_skipped_val": val_counter.num_skipped,
        }
    )
    return result


# The protocol's entry under the name every protocol's entry has (``evaluate_<protocol>``); the result holds the
# trained head under ``head`` (drop it before writing JSON).
evaluate_linear_segmentation = train_linear_segmentation
