"""Confusion matrices and mean intersection-over-union, shared by every dense protocol.

Convention (documented once, used everywhere): ``conf[t, p]`` counts the pixels of ground-truth class ``t`` predicted
as class ``p``; pixels whose target is ``ignore_index`` are not counted. The IoU of class ``c`` is
``conf[c, c] / (sum_p conf[c, p] + sum_t conf[t, c] - conf[c, c])``. A class that appears neither in the targets
nor in the predictions has an undefined IoU (0/0): it is reported as NaN and **left out of the mean**, so the
mean is over the classes that occur (the mmsegmentation / DINOv2 convention; Leopart's ``PredsmIoU`` instead
counts such a class as 0, which only lowers the score of data sets that miss a class entirely).
"""

from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Confusion matrix [C, C] (int64, rows = target, columns = prediction) of two label maps of the same shape.

    Pixels whose target is ``ignore_index`` are dropped. Targets or predictions outside ``[0, num_classes)`` (other
    than the ignored target) raise ValueError, since they would otherwise be silently miscounted.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    valid = target != ignore_index
    pred, target = pred[valid], target[valid]
    if target.numel() == 0:
        return torch.zeros(num_classes, num_classes, dtype=torch.long, device=pred.device)
    if int(target.min()) < 0 or int(target.max()) >= num_classes:
        raise ValueError(f"target labels must lie in [0, {num_classes}) or equal {ignore_index}")
    if int(pred.min()) < 0 or int(pred.max()) >= num_classes:
        raise ValueError(f"predicted labels must lie in [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(conf: Tensor) -> Tensor:
    """IoU of every class [C] (float64) from a confusion matrix; NaN for classes absent from target and prediction."""
    conf = conf.double()
    intersection = conf.diagonal()
    union = conf.sum(dim=0) + conf.sum(dim=1) - intersection
    iou = torch.full_like(intersection, float("nan"))
    present = union > 0
    iou[present] = intersection[present] / union[present]
    return iou


def miou_from_confusion(conf: Tensor) -> tuple[float, Tensor]:
    """(mean IoU over the classes present in target or prediction, per-class IoU [C] with NaN for absent classes).

    The mean is a fraction in [0, 1]; NaN when no pixel was counted at all.
    """
    iou = iou_per_class(conf)
    present = ~torch.isnan(iou)
    miou = float(iou[present].mean()) if bool(present.any()) else float("nan")
    return miou, iou


def pixel_accuracy(conf: Tensor) -> float:
    """Fraction of counted pixels whose prediction equals the target (NaN when nothing was counted)."""
    total = float(conf.sum())
    return float(conf.diagonal().sum()) / total if total > 0 else float("nan")
