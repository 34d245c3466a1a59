"""Frozen-backbone feature extraction for the image-level evaluation protocols.

:func:`extract_features` runs a backbone over a DataLoader once and returns, per requested kind, one CPU float32
tensor of features plus the labels. The kinds are the inputs the official protocols use:

==================  ================  =====================================================================
kind                shape             what it is
==================  ================  =====================================================================
``cls``             [N, D]            final-normed CLS token (``x_norm_clstoken``): k-NN, log-regression
``cls_concat``      [N, n*D]          final-normed CLS of the last ``n_last_blocks`` blocks, oldest first
                                      (DINOv2 linear probe ``n_last_blocks=4``)
``avgpool``         [N, D]            mean of the final-normed last-block patch tokens
``avgpool_rasa``    [N, D]            the same mean after the attached RASA projection
``patch``           [N, P, D]         final-normed last-block patch tokens (row-major grid)
``patch_rasa``      [N, P, D]         the same after the attached RASA projection
==================  ================  =====================================================================

Images go through the model in ``torch.no_grad`` with bf16 autocast on CUDA and in fp32 on CPU; outputs are cast
to float32 on the CPU. Batches from :func:`franca.data.images.collate_skip_none` (unreadable files dropped) are
counted and reported; plain ``(images, labels)`` batches work as well.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from franca.core.errors import ConfigError, DataError
from franca.core.progress import ProgressBar
from franca.core.runtime import autocast_context

FEATURE_KINDS: tuple[str, ...] = ("cls", "cls_concat", "avgpool", "avgpool_rasa", "patch", "patch_rasa")
_RASA_KINDS = ("avgpool_rasa", "patch_rasa")

logger = logging.getLogger(__name__)


class ExtractedFeatures(NamedTuple):
    """Result of :func:`extract_features`: ``features`` {kind: CPU float32 Tensor}, ``labels`` [N] int64 and
    ``num_skipped`` (unreadable images dropped by ``collate_skip_none``)."""

    features: dict[str, Tensor]
    labels: Tensor
    num_skipped: int


def unpack_batch(batch: object) -> tuple[Tensor | None, Tensor | None, int]:
    """(images, labels, num_skipped) of a DataLoader batch: a franca ``Batch``, a (images, labels) pair or images."""
    if hasattr(batch, "inputs") and hasattr(batch, "num_skipped"):
        return batch.inputs, batch.targets, int(batch.num_skipped)  # type: ignore[attr-defined]
    if batch is None:
        return None, None, 0
    if isinstance(batch, (tuple, list)):
        images = batch[0]
        labels = batch[1] if len(batch) > 1 else None
        return images, (torch.as_tensor(labels) if labels is not None else None), 0
    if isinstance(batch, Tensor):
        return batch, None, 0
    raise DataError(
        f"feature extraction got a batch of type {type(batch).__name__}; expected (images, labels)"
    )


def forward_kinds(
    model: nn.Module, images: Tensor, which: Sequence[str], n_last_blocks: int = 1
) -> dict[str, Tensor]:
    """Compute the requested feature kinds of one batch of images [B, 3, H, W] (no autocast, no grad handling).

    Uses one ``forward_features`` pass, or one ``get_intermediate_layers(n=n_last_blocks, norm=True)`` pass when
    ``cls_concat`` with more than one block is requested (its last block equals ``forward_features``'s outputs).
    """
    need_blocks = "cls_concat" in which and n_last_blocks > 1
    needs_rasa = any(kind in _RASA_KINDS for kind in which)
    rasa = getattr(model, "rasa", None)
    if needs_rasa and rasa is None:
        raise ConfigError("RASA features were requested but the model has no RASA head; pass --rasa HEAD")
    if need_blocks:
        layers = model.get_intermediate_layers(images, n=n_last_blocks, return_class_token=True, norm=True)
        patch, cls = layers[-1]
        cls_concat = torch.cat([class_token for _, class_token in layers], dim=-1)
    else:
        out = model.forward_features(images)
        patch, cls = out["x_norm_patchtokens"], out["x_norm_clstoken"]
        cls_concat = cls
    result: dict[str, Tensor] = {}
    for kind in which:
        if kind == "cls":
            result[kind] = cls
        elif kind == "cls_concat":
            result[kind] = cls_concat
        elif kind == "avgpool":
            result[kind] = patch.mean(dim=1)
        elif kind == "avgpool_rasa":
            result[kind] = rasa(patch).mean(dim=1)
        elif kind == "patch":
            result[kind] = patch
        elif kind == "patch_rasa":
            result[kind] = rasa(patch)
    return result


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str | None = None,
    which: Sequence[str] = ("cls",),
    n_last_blocks: int = 1,
    progress: bool = True,
    description: str = "features",
) -> ExtractedFeatures:
    """Run ``model`` over ``loader``; return ``{kind: CPU float32 Tensor}``, the int64 labels [N] and the skip count.

    ``which`` lists kinds from :data:`FEATURE_KINDS`; ``n_last_blocks`` is the number of blocks whose CLS tokens
    ``cls_concat`` concatenates. Returns :class:`ExtractedFeatures` ``(features, labels, num_skipped)``, where
    ``num_skipped`` counts the unreadable images dropped by ``collate_skip_none`` (also logged when non-zero).
    Raises DataError when the loader yields no readable image at all.
    """
    which = tuple(dict.fromkeys(which))
    unknown = [kind for kind in which if kind not in FEATURE_KINDS]
    if unknown:
        raise ConfigError(f"unknown feature kind {unknown[0]!r}; choose from {', '.join(FEATURE_KINDS)}")
    if n_last_blocks < 1:
        raise ConfigError(f"n_last_blocks must be >= 1, got {n_last_blocks}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    chunks: dict[str, list[Tensor]] = {kind: [] for kind in which}
    label_chunks: list[Tensor] = []
    num_skipped = 0
    num_seen = 0
    dataset = getattr(loader, "dataset", None)
    total = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    bar = ProgressBar(total=total, desc=description, unit="img", disable=not progress, leave=False)
    try:
        for batch in loader:
            images, labels, skipped = unpack_batch(batch)
            num_skipped += skipped
            bar.update(skipped)
            if images is None or (isinstance(images, Tensor) and images.shape[0] == 0):
                continue
            batch_size = images.shape[0]
            if labels is None:
                labels = torch.arange(num_seen, num_seen + batch_size)
            images = images.to(device, non_blocking=True)
            with autocast_context(device):
                outputs = forward_kinds(model, images, which, n_last_blocks)
            for kind, value in outputs.items():
                chunks[kind].append(value.float().cpu())
            label_chunks.append(labels.to(torch.int64).cpu())
            num_seen += batch_size
            bar.update(batch_size)
    finally:
        bar.close()
        model.train(was_training)
    if not label_chunks:
        raise DataError(
            f"{description}: no readable image was found ({num_skipped} unreadable); check the data folder"
        )
    if num_skipped:
        logger.info("%s: skipped %d unreadable image(s), used %d", description, num_skipped, num_seen)
    features = {kind: torch.cat(values) for kind, values in chunks.items()}
    return ExtractedFeatures(features, torch.cat(label_chunks), num_skipped)


def extract_train_val_features(
    model: nn.Module,
    train_dataset: object,
    val_dataset: object,
    which: Sequence[str] = ("cls",),
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[ExtractedFeatures, ExtractedFeatures, torch.device]:
    """The ``which`` features of a train and a val data set (one pass each), and the device they were computed on."""
    from franca.eval.common import make_loader

    device = torch.device(device) if device is not None else next(model.parameters()).device
    train, val = (
        extract_features(
            model,
            make_loader(dataset, batch_size, num_workers),
            device,
            tuple(which),
            progress=progress,
            description=f"{name} features",
        )
        for name, dataset in (("train", train_dataset), ("val", val_dataset))
    )
    return train, val, device
