"""HummingBird in-context semantic segmentation (open-hummingbird-eval, as Franca runs it).

Protocol (method doc section 6):

1. **Memory bank** from the train split: every patch's L2-normalised feature (final-norm patch tokens, or RASA tokens
   when a RASA head is attached) with its **label distribution**: the fraction of each class among the patch's
   pixels, ignore pixels (255) excluded. Patches whose pixels are all ignored carry no label and are left out of the
   bank (open-hummingbird-eval instead counts ignore pixels as background). Franca keeps **all** patches
   (``memory_size=None``, the default); a ``memory_size`` below the number of patches draws a uniform random subset
   per seed (open-hummingbird-eval samples with class-frequency scores instead) and the mIoU is averaged over seeds.
   Train images are resized deterministically (no augmentation epoch).
2. **Retrieval**: for every val patch, its ``k = 30`` nearest bank entries by cosine similarity, by exact search:
   torch (chunked over queries and bank, bounded memory) or faiss ``IndexFlatIP`` (same neighbours up to float
   rounding; Franca used GPU faiss approximating ScaNN, an approximate search).
3. **Label fusion**: weights ``softmax(cos / 0.02)`` over the k neighbours; the patch's predicted distribution is the
   weighted sum of the neighbours' distributions (open-hummingbird-eval's cross-attention with beta = 0.02).
4. The ``[h, w, C]`` prediction is upsampled bilinearly to the mask size, argmax per pixel, and the mIoU is computed
   over the whole val set from one confusion matrix (:mod:`franca.eval.miou`; classes absent from both target and
   prediction are left out of the mean). Reported in percent.

Franca evaluates at 518 x 518 (``--size 518``); this module's default is 224 for CPU runs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from franca.core.errors import ConfigError, DataError
from franca.eval import defaults
from franca.eval.miou import confusion_matrix, miou_from_confusion, pixel_accuracy

SEARCH_CHOICES = defaults.SEARCH_CHOICES
DEFAULT_K = defaults.HUMMINGBIRD_K
DEFAULT_TEMPERATURE = defaults.HUMMINGBIRD_TEMPERATURE


# ------------------------------------------------------------------------------------------------ labels
def patch_label_distributions(
    masks: Tensor, patch_size: int, num_classes: int, ignore_index: int = 255
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


# ------------------------------------------------------------------------------------------------ search
def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_search(search: str, device: torch.device) -> str:
    """ "auto" -> faiss when importable and features live on the CPU, torch otherwise (also on GPU)."""
    if search not in SEARCH_CHOICES:
        raise ConfigError(f"search {search!r} is not one of {', '.join(SEARCH_CHOICES)}")
    if search == "faiss" and not _faiss_available():
        raise ConfigError(
            "--search faiss: faiss is not installed; pip install faiss-cpu or use --search torch"
        )
    if search == "auto":
        return "faiss" if device.type == "cpu" and _faiss_available() else "torch"
    return search


@torch.no_grad()
def exact_topk_inner_product(
    bank: Tensor, queries: Tensor, k: int, query_chunk: int = 1024, bank_chunk: int = 16384
) -> tuple[Tensor, Tensor]:
    """Exact top-k inner products (similarities [Q, k] descending, indices [Q, k]) of queries [Q, D] in bank [M, D].

    Works in query chunks and bank chunks, merging running top-k lists, so memory stays at
    ``query_chunk x (bank_chunk + k)`` scores whatever M.
    """
    k = min(k, bank.shape[0])
    all_scores, all_indices = [], []
    for q_start in range(0, queries.shape[0], query_chunk):
        query = queries[q_start : q_start + query_chunk]
        best_scores = best_indices = None
        for b_start in range(0, bank.shape[0], bank_chunk):
            scores = query @ bank[b_start : b_start + bank_chunk].T
            top_scores, top_indices = scores.topk(min(k, scores.shape[1]), dim=1)
            top_indices = top_indices + b_start
            if best_scores is not None:
                top_scores = torch.cat([best_scores, top_scores], dim=1)
                top_indices = torch.cat([best_indices, top_indices], dim=1)
                top_scores, order = top_scores.topk(min(k, top_scores.shape[1]), dim=1)
                top_indices = top_indices.gather(1, order)
            best_scores, best_indices = top_scores, top_indices
        all_scores.append(best_scores)
        all_indices.append(best_indices)
    return torch.cat(all_scores), torch.cat(all_indices)


class NeighbourIndex:
    """Exact cosine nearest-neighbour search over an L2-normalised bank [M, D], with torch or faiss.

    ``search`` is "torch" (chunked matrix products on the bank's device) or "faiss" (``IndexFlatIP`` on the CPU).
    """

    def __init__(
        self, bank: Tensor, search: str = "torch", query_chunk: int = 1024, bank_chunk: int = 16384
    ) -> None:
        if search not in ("torch", "faiss"):
            raise ConfigError(f"search {search!r} must be 'torch' or 'faiss' here")
        self.bank = bank
        self.search_kind = search
        self.query_chunk = query_chunk
        self.bank_chunk = bank_chunk
        self._index = None
        if search == "faiss":
            import faiss

            self._index = faiss.IndexFlatIP(bank.shape[1])
            self._index.add(bank.detach().float().cpu().contiguous().numpy())

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(cosine similarities [Q, k] descending, bank indices [Q, k] int64) of L2-normalised queries [Q, D]."""
        if self._index is None:
            return exact_topk_inner_product(
                self.bank, queries.to(self.bank.device, self.bank.dtype), k, self.query_chunk, self.bank_chunk
            )
        k = min(k, self.bank.shape[0])
        scores, indices = self._index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(scores).to(queries.device), torch.from_numpy(indices).long().to(
            queries.device
        )


def fuse_labels(
    similarities: Tensor, neighbour_labels: Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> Tensor:
    """Label fusion: softmax(similarities [Q, k] / T) weights times neighbour distributions [Q, k, C] -> [Q, C]."""
    weights = torch.softmax(similarities.float() / temperature, dim=1)
    return torch.einsum("qk,qkc->qc", weights, neighbour_labels.float())


@torch.no_grad()
def hummingbird_segment(
    bank_feats: Tensor,
    bank_labels: Tensor,
    query_feats: Tensor,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    search: str = "torch",
    query_chunk: int = 1024,
    bank_chunk: int = 16384,
) -> Tensor:
    """Predicted label distributions [Q, C] of query patches [Q, D] from a bank [M, D] with distributions [M, C].

    Features are L2-normalised here (cosine similarity); ``k`` is clipped to M. ``search`` is "torch", "faiss" or
    "auto" (see :func:`resolve_search`).
    """
    if bank_feats.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"{bank_feats.shape[0]} bank features but {bank_labels.shape[0]} bank labels")
    if bank_feats.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    bank = F.normalize(bank_feats.float(), dim=-1)
    queries = F.normalize(query_feats.float(), dim=-1)
    index = NeighbourIndex(bank, resolve_search(search, bank.device), query_chunk, bank_chunk)
    return _segment_with_index(index, bank_labels, queries, k, temperature)


def _segment_with_index(
    index: NeighbourIndex, bank_labels: Tensor, queries: Tensor, k: int, temperature: float
) -> Tensor:
    similarities, indices = index.search(queries, k)
    neighbour_labels = bank_labels.to(indices.device)[indices]  # [Q, k, C]
    return fuse_labels(similarities, neighbour_labels, temperature)


# ------------------------------------------------------------------------------------------------ model level
@torch.no_grad()
def build_memory_bank(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | None = None,
    tokens: str = "auto",
    ignore_index: int = 255,
) -> dict[str, Any]:
    """Normalised patch features [M, D] (fp32, CPU) and label distributions [M, C] of every labelled train patch.

    Returns a dict with ``features``, ``labels``, ``num_images``, ``num_skipped`` and ``num_unlabelled_patches``
    (patches whose pixels are all ignored, left out).
    """
    from franca.data.images import SkipCounter
    from franca.eval.dense_features import iterate_dense_batches
    from franca.eval.segmentation_data import make_segmentation_loader

    device = device or torch.device("cpu")
    loader = make_segmentation_loader(dataset, batch_size, num_workers)
    counter = SkipCounter()
    features, labels, unlabelled = [], [], 0
    for grid, masks in iterate_dense_batches(
        model, loader, device, tokens, counter=counter, desc="memory bank"
    ):
        distributions, counts = patch_label_distributions(
            masks, int(model.patch_size), num_classes, ignore_index
        )
        keep = counts.reshape(-1) > 0
        unlabelled += int((~keep).sum())
        features.append(F.normalize(grid.reshape(-1, grid.shape[-1]), dim=-1)[keep].cpu())
        labels.append(distributions.reshape(-1, num_classes)[keep].cpu())
    if not features or sum(f.shape[0] for f in features) == 0:
        raise DataError("the HummingBird memory bank is empty: no readable train image with labelled pixels")
    return {
        "features": torch.cat(features),
        "labels": torch.cat(labels),
        "num_images": counter.num_loaded,
        "num_skipped": counter.num_skipped,
        "num_unlabelled_patches": unlabelled,
    }


def _bank_subsets(
    total: int, memory_size: int | None, seeds: list[int]
) -> list[tuple[int | None, Tensor | None]]:
    """(seed, sorted indices) per seed for a subsampled bank, or one (None, None) for the full bank."""
    if memory_size is None or memory_size >= total:
        return [(None, None)]
    subsets = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        subsets.append((seed, torch.randperm(total, generator=generator)[:memory_size].sort().values))
    return subsets


@torch.no_grad()
def evaluate_hummingbird(
    model: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    memory_size: int | None = None,
    seeds: list[int] | tuple[int, ...] = (0,),
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | None = None,
    tokens: str = "auto",
    search: str = "auto",
    num_classes: int | None = None,
    ignore_index: int = 255,
) -> dict[str, Any]:
    """Run the HummingBird protocol; returns mIoU (percent, mean over seeds), per-class IoU and run facts.

    ``num_classes`` defaults to the largest of the two data sets' ``num_classes``. With a subsampled memory bank
    (``memory_size`` below the number of labelled train patches) each seed draws its own bank and the mIoU is
    averaged; with the full bank the result is deterministic and computed once.
    """
    from franca.data.images import SkipCounter
    from franca.eval.dense_features import iterate_dense_batches
    from franca.eval.segmentation_data import make_segmentation_loader

    if k < 1:
        raise ConfigError(f"--k must be at least 1 (got {k})")
    if temperature <= 0:
        raise ConfigError(f"--temperature must be positive (got {temperature})")
    if memory_size is not None and memory_size < 1:
        raise ConfigError(f"--memory-size must be at least 1 (got {memory_size})")
    seeds = list(seeds) or [0]
    device = device or torch.device("cpu")
    if num_classes is None:
        num_classes = max(
            int(getattr(train_dataset, "num_classes", 0)), int(getattr(val_dataset, "num_classes", 0))
        )
    if num_classes < 1:
        raise ConfigError("the number of classes is unknown; pass num_classes")

    bank = build_memory_bank(
        model, train_dataset, num_classes, batch_size, num_workers, device, tokens, ignore_index
    )
    total = bank["features"].shape[0]
    search_kind = resolve_search(search, device)
    runs = []
    for seed, subset in _bank_subsets(total, memory_size, seeds):
        feats = bank["features"] if subset is None else bank["features"][subset]
        labels = bank["labels"] if subset is None else bank["labels"][subset]
        index = NeighbourIndex(feats.to(device) if search_kind == "torch" else feats, search_kind)
        runs.append(
            {
                "seed": seed,
                "index": index,
                "labels": labels.to(device),
                "conf": torch.zeros(num_classes, num_classes, dtype=torch.long),
            }
        )

    loader = make_segmentation_loader(val_dataset, batch_size, num_workers)
    counter = SkipCounter()
    for grid, masks in iterate_dense_batches(
        model, loader, device, tokens, counter=counter, desc="hummingbird"
    ):
        batch, rows, cols, dim = grid.shape
        queries = F.normalize(grid.reshape(-1, dim), dim=-1)
        for run in runs:
            predicted = _segment_with_index(run["index"], run["labels"], queries, k, temperature)
            predicted = predicted.reshape(batch, rows, cols, num_classes).permute(0, 3, 1, 2)
            upsampled = F.interpolate(predicted, size=masks.shape[-2:], mode="bilinear", align_corners=False)
            run["conf"] += confusion_matrix(upsampled.argmax(dim=1), masks, num_classes, ignore_index).cpu()
    if counter.num_loaded == 0:
        raise DataError("no readable val image; every sample was skipped")

    per_seed, per_class = [], []
    for run in runs:
        miou, iou = miou_from_confusion(run["conf"])
        per_seed.append(100.0 * miou)
        per_class.append(iou)
    per_class_mean = torch.stack(per_class).mean(dim=0)
    class_names = list(getattr(val_dataset, "class_names", [f"class_{i}" for i in range(num_classes)]))
    if len(class_names) != num_classes:
        class_names = [f"class_{i}" for i in range(num_classes)]
    mean = sum(per_seed) / len(per_seed)
    std = math.sqrt(sum((v - mean) ** 2 for v in per_seed) / len(per_seed))
    return {
        "protocol": "hummingbird",
        "miou": mean,
        "miou_std": std,
        "miou_per_seed": per_seed,
        "pixel_accuracy": 100.0 * sum(pixel_accuracy(r["conf"]) for r in runs) / len(runs),
        "per_class_iou": {
            name: (None if math.isnan(float(v)) else 100.0 * float(v))
            for name, v in zip(class_names, per_class_mean)
        },
        "num_classes": num_classes,
        "k": k,
        "temperature": temperature,
        "memory_size": total if runs[0]["seed"] is None else memory_size,
        "memory_patches_total": total,
        "memory_subsampled": runs[0]["seed"] is not None,
        "seeds": [r["seed"] for r in runs if r["seed"] is not None],
        "search": search_kind,
        "num_train_images": bank["num_images"],
        "num_val_images": counter.num_loaded,
        "num_skipped_train": bank["num_skipped"],
        "num_skipped_val": counter.num_skipped,
        "num_unlabelled_train_patches": bank["num_unlabelled_patches"],
    }
