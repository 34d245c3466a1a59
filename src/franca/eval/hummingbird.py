"""HummingBird in-context semantic segmentation (open-hummingbird-eval, as Franca runs it).

Protocol (method doc section 6):

1. **Memory bank** from the train split: every patch's L2-normalised feature (final-norm patch tokens, or RASA tokens
   when a RASA head is attached) with its **label distribution**: the fraction of each class among the patch's
   pixels, ignore pixels (255) excluded. Patches whose pixels are all ignored carry no label and are left out of the
   bank (open-hummingbird-eval instead counts ignore pixels as background). Franca keeps **all** patches
   (``memory_size=None``, the default); a ``memory_size`` below the number of labelled patches draws a seeded uniform
   subset per seed (open-hummingbird-eval samples with class-frequency scores instead) and the mIoU is averaged over
   the seeds. Train images are resized deterministically (no augmentation epoch).
2. **Retrieval**: for every val patch, its ``k = 30`` nearest bank entries by cosine similarity, by exact search
   (:mod:`franca.eval.search`: torch, chunked with bounded memory, or faiss ``IndexFlatIP``; Franca used GPU faiss
   approximating ScaNN, an approximate search).
3. **Label fusion**: weights ``softmax(cos / 0.02)`` over the k neighbours; the patch's predicted distribution is the
   weighted sum of the neighbours' distributions (open-hummingbird-eval's cross-attention with beta = 0.02).
4. The ``[h, w, C]`` prediction is upsampled bilinearly to the mask size, argmax per pixel, and the mIoU is computed
   over the whole val set from one confusion matrix (:mod:`franca.eval.metrics`; classes absent from both target and
   prediction are left out of the mean). Reported in percent.

Franca evaluates at 518 x 518 (``--size 518``); this module's default is 224 for CPU runs.

:class:`HummingbirdSettings` holds the settings; :class:`HummingbirdScorer` streams val patch grids against a memory
bank (so the val features are never all held) into a :class:`HummingbirdResult`; :func:`score_hummingbird` scores
patch grids held in memory (with a :class:`LabelBank`, e.g. a seeded subset of the labelled train patches shared by
several models); :func:`evaluate_hummingbird` extracts the features with :mod:`franca.features` and scores them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from franca.core.errors import ConfigError, DataError, check_choice
from franca.data.images import SkipCounter
from franca.eval import defaults
from franca.eval.common import make_loader, model_device
from franca.eval.metrics import (
    confusion_matrix,
    mean_and_std,
    miou_from_confusion,
    per_class_percent,
    pixel_accuracy,
)
from franca.eval.search import SEARCH_CHOICES, ExactSearcher
from franca.eval.segmentation_data import (
    IGNORE_INDEX,
    TOKEN_CHOICES,
    dense_split,
    patch_token,
    segmentation_classes,
)
from franca.features import Features, iterate_features

DEFAULT_K = defaults.HUMMINGBIRD_K
DEFAULT_TEMPERATURE = defaults.HUMMINGBIRD_TEMPERATURE
QUERY_CHUNK = 1024  # val patches searched at once
BANK_CHUNK = 16384  # bank patches scanned at once by the torch search
UPSAMPLE_CHUNK = 128  # images whose [C, S, S] predictions are upsampled at once


# ------------------------------------------------------------------------------------------------ labels
def patch_label_distributions(
    masks: Tensor, patch_size: int, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Per-patch class fractions of label masks.

    ``masks`` [B, H, W] (H, W multiples of ``patch_size``) -> (distributions [B, H/p, W/p, C] float32, valid pixel
    counts [B, H/p, W/p]). Each distribution sums to 1 over the patch's non-ignored pixels; a patch whose pixels are
    all ignored gets all zeros and count 0.
    """
    batch, height, width = masks.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"mask size {height}x{width} is not a multiple of the patch size {patch_size}")
    masks = masks.long()
    valid = masks != ignore_index
    if bool(((masks[valid] < 0) | (masks[valid] >= num_classes)).any()):
        raise ValueError(f"mask labels must lie in [0, {num_classes}) or equal {ignore_index}")
    labels = torch.where(valid, masks, torch.full_like(masks, num_classes))  # ignore -> an extra bin, dropped
    rows, cols = height // patch_size, width // patch_size
    device = masks.device
    patch_of_pixel = (torch.arange(height, device=device) // patch_size)[:, None] * cols + (
        torch.arange(width, device=device) // patch_size
    )[None, :]
    patch_index = (
        torch.arange(batch, device=device)[:, None, None] * (rows * cols) + patch_of_pixel
    )  # [B, H, W]
    bins = (patch_index * (num_classes + 1) + labels).reshape(-1)
    counts = torch.bincount(bins, minlength=batch * rows * cols * (num_classes + 1))
    counts = counts.reshape(batch, rows, cols, num_classes + 1)[..., :num_classes].float()
    totals = counts.sum(dim=-1)
    distributions = counts / totals.clamp(min=1.0).unsqueeze(-1)
    return distributions, totals


def labelled_patches(
    masks: Tensor, patch_size: int, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """(indices [K] of the patches with a labelled pixel, flat into the [B * h * w] patches of ``masks`` [B, H, W],
    row-major; their label distributions [K, C]) (see :func:`patch_label_distributions`)."""
    distributions, counts = patch_label_distributions(masks, patch_size, num_classes, ignore_index)
    indices = torch.nonzero(counts.reshape(-1) > 0).flatten()
    return indices, distributions.reshape(-1, num_classes)[indices]


def seeded_subset(total: int, size: int | None, seed: int) -> Tensor | None:
    """Sorted indices [size] of a uniform random subset of ``range(total)`` drawn with ``seed``; None (keep all) when
    ``size`` is None or at least ``total``."""
    if size is None or size >= total:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:size].sort().values


@dataclass(frozen=True)
class LabelBank:
    """The labelled train patches a memory bank is made of, from the masks alone (the features come later, so one
    bank serves several models): ``indices`` [M] flat into the [N * h * w] patches (row-major), their label
    ``distributions`` [M, C], ``num_labelled`` (labelled patches before any subsampling) and ``num_patches`` (all)."""

    indices: Tensor
    distributions: Tensor
    num_labelled: int
    num_patches: int


def label_bank(
    masks: Tensor,
    patch_size: int,
    num_classes: int,
    memory_size: int | None = None,
    seed: int = 0,
    ignore_index: int = IGNORE_INDEX,
    chunk: int = 1024,
) -> LabelBank:
    """The :class:`LabelBank` of train masks [N, H, W]: every labelled patch, or a uniform subset of ``memory_size``
    of them drawn with ``seed`` (:func:`seeded_subset`). Masks are read ``chunk`` images at a time."""
    if masks.ndim != 3:
        raise DataError(f"label masks must be [N, H, W], got {tuple(masks.shape)}")
    per_image = (masks.shape[1] // patch_size) * (masks.shape[2] // patch_size)
    indices, distributions = [], []
    for start in range(0, masks.shape[0], chunk):
        found, dist = labelled_patches(masks[start : start + chunk], patch_size, num_classes, ignore_index)
        indices.append(found + start * per_image)
        distributions.append(dist)
    index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)
    if index.numel() == 0:
        raise DataError("the HummingBird memory bank is empty: no train patch has a labelled pixel")
    distribution, num_labelled = torch.cat(distributions), int(index.numel())
    subset = seeded_subset(num_labelled, memory_size, seed)
    if subset is not None:
        index, distribution = index[subset], distribution[subset]
    return LabelBank(index, distribution, num_labelled, masks.shape[0] * per_image)


def fuse_labels(
    similarities: Tensor, neighbour_labels: Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> Tensor:
    """Label fusion: softmax(similarities [Q, k] / T) weights times neighbour distributions [Q, k, C] -> [Q, C]."""
    weights = torch.softmax(similarities.float() / temperature, dim=1)
    return torch.einsum("qk,qkc->qc", weights, neighbour_labels.float())


# ------------------------------------------------------------------------------------------------ settings, result
@dataclass(frozen=True)
class HummingbirdSettings:
    """Settings of HummingBird.

    ``k`` neighbours per patch (>= 1, clipped to the bank size), ``temperature`` of the fusion softmax (> 0),
    ``memory_size``: patches per bank (None: all labelled train patches; else one seeded subset per seed of ``seeds``,
    mIoU averaged), ``tokens``: ``auto`` / ``patch`` / ``rasa`` (see :func:`~franca.eval.segmentation_data.
    patch_token`), ``search``: ``auto`` / ``torch`` / ``faiss`` (:mod:`franca.eval.search`), ``query_chunk`` /
    ``bank_chunk``: rows per step of the torch search.
    """

    k: int = DEFAULT_K
    temperature: float = DEFAULT_TEMPERATURE
    memory_size: int | None = None
    seeds: Sequence[int] = (0,)
    tokens: str = "auto"
    search: str = "auto"
    ignore_index: int = IGNORE_INDEX
    query_chunk: int = QUERY_CHUNK
    bank_chunk: int = BANK_CHUNK

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"--k must be at least 1 (got {self.k})")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be positive (got {self.temperature})")
        if self.memory_size is not None and self.memory_size < 1:
            raise ConfigError(f"--memory-size must be at least 1 (got {self.memory_size})")
        check_choice("--search", self.search, SEARCH_CHOICES)
        check_choice("--tokens", self.tokens, TOKEN_CHOICES)


@dataclass(frozen=True)
class HummingbirdResult:
    """What HummingBird measured: the mIoU of each bank (percent; one per seed when subsampled), the pixel accuracy
    and per-class IoU (percent, None for an absent class) averaged over the banks, the settings used, the bank sizes,
    the search backend, and (from :func:`evaluate_hummingbird`) the images read and skipped."""

    miou_per_seed: list[float]
    pixel_accuracy: float
    per_class_iou: dict[str, float | None]
    num_classes: int
    k: int
    temperature: float
    memory_size: int
    memory_patches_total: int
    seeds: list[int]
    search: str
    num_val_images: int
    num_train_images: int | None = None
    num_skipped_train: int | None = None
    num_skipped_val: int | None = None
    num_unlabelled_train_patches: int | None = None

    @property
    def miou(self) -> float:
        """mIoU in percent, the mean over the banks."""
        return mean_and_std(self.miou_per_seed)[0]

    @property
    def miou_std(self) -> float:
        """Population standard deviation of the mIoU over the banks (0 for one bank)."""
        return mean_and_std(self.miou_per_seed)[1]

    @property
    def memory_subsampled(self) -> bool:
        """Whether each bank is a seeded subset of the labelled train patches."""
        return bool(self.seeds)

    def to_dict(self) -> dict[str, Any]:
        """``{"protocol": "hummingbird", "miou", "miou_std", "miou_per_seed", "pixel_accuracy", "per_class_iou",
        "num_classes", "k", "temperature", "memory_size", "memory_patches_total", "memory_subsampled", "seeds",
        "search", "num_train_images", "num_val_images", "num_skipped_train", "num_skipped_val",
        "num_unlabelled_train_patches"}`` (the last five that are known)."""
        facts = {
            "num_train_images": self.num_train_images,
            "num_val_images": self.num_val_images,
            "num_skipped_train": self.num_skipped_train,
            "num_skipped_val": self.num_skipped_val,
            "num_unlabelled_train_patches": self.num_unlabelled_train_patches,
        }
        return {
            "protocol": "hummingbird",
            "miou": self.miou,
            "miou_std": self.miou_std,
            "miou_per_seed": list(self.miou_per_seed),
            "pixel_accuracy": self.pixel_accuracy,
            "per_class_iou": dict(self.per_class_iou),
            "num_classes": self.num_classes,
            "k": self.k,
            "temperature": self.temperature,
            "memory_size": self.memory_size,
            "memory_patches_total": self.memory_patches_total,
            "memory_subsampled": self.memory_subsampled,
            "seeds": list(self.seeds),
            "search": self.search,
            **{key: value for key, value in facts.items() if value is not None},
        }


# ------------------------------------------------------------------------------------------------ scoring
@dataclass
class _Bank:
    """One searchable memory bank: its seed (None: the full bank), search index, labels [M, C] and confusion."""

    seed: int | None
    searcher: ExactSearcher
    labels: Tensor
    conf: Tensor


class HummingbirdScorer:
    """HummingBird over a memory bank, fed val patch grids batch by batch (:meth:`update`), so that the val features
    are never all held; :meth:`result` gives the :class:`HummingbirdResult`.

    ``bank_features`` [M, D] (raw patch features) and ``bank_labels`` [M, C] (label distributions) are the labelled
    train patches. With ``settings.memory_size`` below M, one bank per seed of ``settings.seeds`` is drawn
    (:func:`seeded_subset`). ``projection`` [D, D] (a folded RASA matrix) maps bank and query features as
    ``z @ projection.T`` before their L2 normalisation; ``normalized=True`` says the bank features are ready
    (projected if need be, and normalised), which saves a copy of a large bank. Searching, fusion and upsampling run
    on ``device`` (default: the bank's).
    """

    def __init__(
        self,
        bank_features: Tensor,
        bank_labels: Tensor,
        settings: HummingbirdSettings | None = None,
        *,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        device: torch.device | str | None = None,
        projection: Tensor | None = None,
        normalized: bool = False,
    ) -> None:
        if bank_features.shape[0] != bank_labels.shape[0]:
            raise ValueError(f"{bank_features.shape[0]} bank features but {bank_labels.shape[0]} bank labels")
        if bank_features.shape[0] == 0:
            raise DataError("the HummingBird memory bank is empty: no train patch has a labelled pixel")
        self.settings = settings if settings is not None else HummingbirdSettings()
        self.num_classes = int(num_classes)
        self.class_names = tuple(class_names or (f"class_{index}" for index in range(self.num_classes)))
        self.device = torch.device(device) if device is not None else bank_features.device
        self.projection = projection
        self.total = int(bank_features.shape[0])
        self.num_images = 0
        self.banks: list[_Bank] = []
        seeds = list(self.settings.seeds) or [0]
        subsets = [(seed, seeded_subset(self.total, self.settings.memory_size, seed)) for seed in seeds]
        if subsets[0][1] is None:  # the whole bank: deterministic, one run
            subsets = [(None, None)]
        for seed, subset in subsets:
            features = bank_features if subset is None else bank_features[subset]
            labels = bank_labels if subset is None else bank_labels[subset]
            features = features if normalized else self._prepare(features)
            searcher = ExactSearcher(
                features,
                self.settings.search,
                self.device,
                self.settings.bank_chunk,
                self.settings.query_chunk,
            )
            conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
            self.banks.append(_Bank(seed, searcher, labels.to(self.device), conf))

    def _prepare(self, features: Tensor) -> Tensor:
        """Projected (when a projection is set) and L2-normalised features [n, D] (float32)."""
        features = features.float()
        if self.projection is not None:
            features = features @ self.projection.to(features.device, features.dtype).T
        return F.normalize(features, dim=-1)

    @torch.no_grad()
    def distributions(self, queries: Tensor) -> list[Tensor]:
        """Predicted label distributions [Q, C] of query patches [Q, D] (raw features), one per bank."""
        queries = self._prepare(queries)
        predictions = []
        for bank in self.banks:
            similarities, indices = bank.searcher.search(queries, self.settings.k)
            neighbour_labels = bank.labels[indices.to(self.device)]  # [Q, k, C]
            predictions.append(
                fuse_labels(similarities.to(self.device), neighbour_labels, self.settings.temperature)
            )
        return predictions

    @torch.no_grad()
    def update(self, grids: Tensor, masks: Tensor) -> None:
        """Score a batch: patch grids [B, h, w, D] against label masks [B, S, S] (255 = ignore)."""
        batch, rows, cols, dim = grids.shape
        if masks.ndim != 3 or masks.shape[0] != batch:
            raise DataError(f"{batch} val patch grids but masks of shape {tuple(masks.shape)}")
        masks = masks.to(self.device).long()
        for bank, predicted in zip(self.banks, self.distributions(grids.reshape(-1, dim))):
            predicted = predicted.reshape(batch, rows, cols, self.num_classes).permute(0, 3, 1, 2)
            for start in range(0, batch, UPSAMPLE_CHUNK):
                target = masks[start : start + UPSAMPLE_CHUNK]
                upsampled = F.interpolate(
                    predicted[start : start + UPSAMPLE_CHUNK],
                    size=target.shape[-2:],
                    mode="bilinear",
                    align_corners=False,
                )
                conf = confusion_matrix(
                    upsampled.argmax(dim=1), target, self.num_classes, self.settings.ignore_index
                )
                bank.conf += conf.cpu()
        self.num_images += batch

    def result(self) -> HummingbirdResult:
        """The :class:`HummingbirdResult` of every batch given to :meth:`update`; DataError when there was none."""
        if self.num_images == 0:
            raise DataError("HummingBird scored no val image; every sample was skipped")
        per_seed, ious = [], []
        for bank in self.banks:
            miou, iou = miou_from_confusion(bank.conf)
            per_seed.append(100.0 * miou)
            ious.append(iou)
        subsampled = self.banks[0].seed is not None
        return HummingbirdResult(
            miou_per_seed=per_seed,
            pixel_accuracy=100.0 * sum(pixel_accuracy(bank.conf) for bank in self.banks) / len(self.banks),
            per_class_iou=per_class_percent(torch.stack(ious).mean(dim=0), self.class_names),
            num_classes=self.num_classes,
            k=self.settings.k,
            temperature=self.settings.temperature,
            memory_size=int(self.settings.memory_size) if subsampled else self.total,
            memory_patches_total=self.total,
            seeds=[bank.seed for bank in self.banks if bank.seed is not None],
            search=self.banks[0].searcher.backend,
            num_val_images=self.num_images,
        )


def score_hummingbird(
    train: Tensor | Features,
    train_masks: Tensor | None,
    val: Tensor | Features,
    val_masks: Tensor | None,
    settings: HummingbirdSettings | None = None,
    *,
    num_classes: int,
    bank: LabelBank | None = None,
    class_names: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    projection: Tensor | None = None,
) -> HummingbirdResult:
    """HummingBird of val patch grids [N', h, w, D] with masks [N', S, S] against train grids [N, h, w, D] with masks
    [N, S, S] (tensors, or Features with their masks as targets), all held in memory.

    The memory bank is ``bank`` (a :class:`LabelBank` of the train masks, e.g. a seeded subset shared by several
    models) or every labelled train patch; ``settings.memory_size`` subsamples it further per seed. See
    :class:`HummingbirdScorer` for ``projection`` and ``device`` (default: the val features').
    """
    settings = settings if settings is not None else HummingbirdSettings()
    train_grids, train_masks = dense_split(train, train_masks, "train")
    val_grids, val_masks = dense_split(val, val_masks, "val")
    if bank is None:
        patch_size = train_masks.shape[-1] // train_grids.shape[2]
        bank = label_bank(train_masks, patch_size, num_classes, ignore_index=settings.ignore_index)
    features = train_grids.reshape(-1, train_grids.shape[-1])[bank.indices]
    scorer = HummingbirdScorer(
        features,
        bank.distributions,
        settings,
        num_classes=num_classes,
        class_names=class_names,
        device=device if device is not None else val_grids.device,
        projection=projection,
    )
    scorer.update(val_grids, val_masks)
    return scorer.result()


# ------------------------------------------------------------------------------------------------ model level
@dataclass(frozen=True)
class MemoryBank:
    """The labelled train patches' L2-normalised features [M, D] and label distributions [M, C] (CPU), with the
    train images read and skipped and the patches left out for having no labelled pixel."""

    features: Tensor
    labels: Tensor
    num_images: int
    num_skipped: int
    num_unlabelled: int


@torch.no_grad()
def build_memory_bank(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    settings: HummingbirdSettings | None = None,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> MemoryBank:
    """Stream the train images of ``dataset`` (items ``(image, mask)``) through ``model`` and keep the normalised
    feature and label distribution of every labelled patch (the features of the other patches are never held)."""
    settings = settings if settings is not None else HummingbirdSettings()
    token = patch_token(model, settings.tokens)
    counter = SkipCounter()
    loader = make_loader(dataset, batch_size, num_workers)
    features, labels, unlabelled = [], [], 0
    for outputs, masks in iterate_features(
        model, loader, (token,), device, counter=counter, desc="memory bank", progress=progress
    ):
        grid = outputs[token]
        indices, distributions = labelled_patches(
            masks, int(model.patch_size), num_classes, settings.ignore_index
        )
        unlabelled += grid.shape[0] * grid.shape[1] * grid.shape[2] - indices.numel()
        features.append(F.normalize(grid.reshape(-1, grid.shape[-1])[indices], dim=-1).cpu())
        labels.append(distributions.cpu())
    if sum(part.shape[0] for part in features) == 0:
        raise DataError("the HummingBird memory bank is empty: no readable train image with labelled pixels")
    return MemoryBank(
        torch.cat(features), torch.cat(labels), counter.num_loaded, counter.num_skipped, unlabelled
    )


@torch.no_grad()
def evaluate_hummingbird(
    model: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset,
    settings: HummingbirdSettings | None = None,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    progress: bool = True,
) -> HummingbirdResult:
    """Run HummingBird: the memory bank from the train set (:func:`build_memory_bank`), then the val set streamed
    batch by batch through the model and the :class:`HummingbirdScorer`.

    The data sets yield ``(image, mask)`` (None for an unreadable sample, skipped and counted). ``num_classes``
    defaults to the largest of the two data sets' ``num_classes``; the class names are the val set's.
    """
    settings = settings if settings is not None else HummingbirdSettings()
    device = model_device(model, device)
    num_classes, class_names = segmentation_classes(val_dataset, train_dataset, num_classes)
    extraction = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": device,
        "progress": progress,
    }
    bank = build_memory_bank(model, train_dataset, num_classes, settings, **extraction)
    scorer = HummingbirdScorer(
        bank.features,
        bank.labels,
        settings,
        num_classes=num_classes,
        class_names=class_names,
        device=device,
        normalized=True,
    )
    token = patch_token(model, settings.tokens)
    counter = SkipCounter()
    loader = make_loader(val_dataset, batch_size, num_workers)
    for outputs, masks in iterate_features(
        model, loader, (token,), device, counter=counter, desc="hummingbird", progress=progress
    ):
        scorer.update(outputs[token], masks)
    if counter.num_loaded == 0:
        raise DataError("no readable val image; every sample was skipped")
    return dataclasses.replace(
        scorer.result(),
        num_train_images=bank.num_images,
        num_skipped_train=bank.num_skipped,
        num_skipped_val=counter.num_skipped,
        num_unlabelled_train_patches=bank.num_unlabelled,
    )
