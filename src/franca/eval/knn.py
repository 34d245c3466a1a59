"""Weighted k-NN classification on frozen features, the DINOv2 protocol used by Franca.

Features (the final-normed CLS token at 224 px center-crop) are L2-normalised; each test sample's ``max(ks)`` most
cosine-similar train samples are found; their similarities ``s`` become weights ``softmax(s / T)`` over those
neighbours (T = 0.07), and the weights of the first ``k`` neighbours are summed per class. The class scores give top-1
and top-5 accuracy for every ``k`` in (10, 20, 100, 200). DINOv2 reports k = 20 by convention.

Exact search either with torch (test samples in chunks, train set in chunks whose top-k lists are merged, so the
memory is ``chunk_size x train_chunk_size`` similarities whatever the train size) or with a faiss ``IndexFlatIP``
when faiss is installed; both give the same neighbours up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from franca.core.errors import ConfigError
from franca.core.progress import ProgressBar
from franca.eval import defaults

DEFAULT_KS: tuple[int, ...] = defaults.KNN_KS
DEFAULT_TEMPERATURE = defaults.KNN_TEMPERATURE


# --------------------------------------------------------------------------------------------------- search
def faiss_available() -> bool:
    """True when ``import faiss`` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _use_faiss(use_faiss: bool | str, device: torch.device) -> bool:
    if use_faiss == "auto":
        return device.type == "cpu" and faiss_available()
    if use_faiss is True or use_faiss == "true":
        if not faiss_available():
            raise ConfigError(
                "use_faiss=True but faiss is not installed; pip install faiss-cpu or use the torch path"
            )
        return True
    return False


def _torch_topk_chunked(query: Tensor, train: Tensor, k: int, train_chunk_size: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` inner products of ``query`` [q, d] against ``train`` [n, d], scanning the train set in chunks.

    Each chunk's top-k is merged with the running best, so memory stays O(q * (train_chunk_size + k)).
    """
    best_values: Tensor | None = None
    best_indices: Tensor | None = None
    for start in range(0, train.shape[0], train_chunk_size):
        block = train[start : start + train_chunk_size]
        sims = query @ block.T
        values, indices = sims.topk(min(k, block.shape[0]), dim=1, largest=True, sorted=True)
        indices = indices + start
        if best_values is None:
            best_values, best_indices = values, indices
            continue
        values = torch.cat([best_values, values], dim=1)
        indices = torch.cat([best_indices, indices], dim=1)
        best_values, order = values.topk(min(k, values.shape[1]), dim=1, largest=True, sorted=True)
        best_indices = indices.gather(1, order)
    assert best_values is not None and best_indices is not None
    return best_values, best_indices


class ExactSearcher:
    """Exact maximum-inner-product search over a fixed train set, with faiss or with chunked torch matmuls.

    ``train_feats`` [n_train, d] is indexed once (a faiss ``IndexFlatIP`` or a float32 copy on ``device``);
    :meth:`search` answers one chunk of queries at a time.
    """

    def __init__(
        self,
        train_feats: Tensor,
        use_faiss: bool | str = "auto",
        device: torch.device | str | None = None,
        train_chunk_size: int = 65536,
    ) -> None:
        if train_feats.ndim != 2:
            raise ValueError(f"k-NN needs 2-D train features, got shape {tuple(train_feats.shape)}")
        if train_feats.shape[0] == 0:
            raise ConfigError("k-NN needs at least one train sample")
        self.device = torch.device(device) if device is not None else train_feats.device
        self.num_train, self.dim = int(train_feats.shape[0]), int(train_feats.shape[1])
        self.train_chunk_size = max(1, int(train_chunk_size))
        self.backend = "faiss" if _use_faiss(use_faiss, self.device) else "torch"
        if self.backend == "faiss":
            import faiss

            self.index = faiss.IndexFlatIP(self.dim)
            self.index.add(train_feats.detach().to("cpu", torch.float32).contiguous().numpy())
        else:
            self.train = train_feats.detach().to(self.device, torch.float32)

    def search(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(similarities [q, k'], train indices [q, k'] int64) on the CPU, sorted descending; k' = min(k, n_train)."""
        if query.ndim != 2 or query.shape[1] != self.dim:
            raise ValueError(f"k-NN queries must be [q, {self.dim}], got {tuple(query.shape)}")
        k = max(1, min(int(k), self.num_train))
        if self.backend == "faiss":
            values, indices = self.index.search(
                query.detach().to("cpu", torch.float32).contiguous().numpy(), k
            )
            return torch.from_numpy(values), torch.from_numpy(indices).to(torch.int64)
        values, indices = _torch_topk_chunked(
            query.detach().to(self.device, torch.float32), self.train, k, self.train_chunk_size
        )
        return values.cpu(), indices.cpu()


def knn_search(
    train_feats: Tensor,
    test_feats: Tensor,
    k: int,
    chunk_size: int = 1024,
    train_chunk_size: int = 65536,
    use_faiss: bool | str = "auto",
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Exact inner-product search: the ``k`` largest ``test @ train.T`` per test row, sorted descending.

    ``train_feats`` [n_train, d], ``test_feats`` [n_test, d] (normalise them first for cosine similarity). Returns
    (similarities [n_test, k], train indices [n_test, k] int64) on the CPU; ``k`` is clipped to ``n_train``. Test rows
    are processed ``chunk_size`` at a time and the train set ``train_chunk_size`` rows at a time.
    ``use_faiss``: ``"auto"`` (faiss ``IndexFlatIP`` when installed and the device is the CPU), True or False.
    """
    if test_feats.ndim != 2 or test_feats.shape[1] != train_feats.shape[-1]:
        raise ValueError(
            f"k-NN needs 2-D features of the same width, got train {tuple(train_feats.shape)} "
            f"and test {tuple(test_feats.shape)}"
        )
    device = device if device is not None else test_feats.device
    searcher = ExactSearcher(train_feats, use_faiss, device, train_chunk_size)
    values, indices = [], []
    starts = range(0, test_feats.shape[0], max(1, chunk_size))
    for start in ProgressBar(
        starts, desc=f"k-NN ({searcher.backend})", unit="chunk", disable=not progress, leave=False
    ):
        chunk_values, chunk_indices = searcher.search(test_feats[start : start + chunk_size], k)
        values.append(chunk_values)
        indices.append(chunk_indices)
    return torch.cat(values), torch.cat(indices)


# --------------------------------------------------------------------------------------------------- voting
def knn_votes(
    neighbor_sims: Tensor,
    neighbor_labels: Tensor,
    ks: Sequence[int],
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
) -> dict[int, Tensor]:
    """Class scores [n_test, C] for each ``k``: the sum, per class, of the weights of the first ``k`` neighbours.

    ``neighbor_sims`` / ``neighbor_labels`` [n_test, K] are sorted by decreasing similarity. The weights are
    ``softmax(sims / T)`` over the K neighbours (as DINOv2: proportional to ``exp(sim / T)``; the common factor does
    not change the ranking). ``k`` larger than K is clipped to K.
    """
    num_classes = int(num_classes if num_classes is not None else neighbor_labels.max().item() + 1)
    weights = torch.softmax(neighbor_sims.double() / temperature, dim=1)
    votes = {}
    for k in ks:
        kk = min(int(k), neighbor_sims.shape[1])
        scores = torch.zeros(neighbor_sims.shape[0], num_classes, dtype=torch.float64)
        scores.scatter_add_(1, neighbor_labels[:, :kk].long(), weights[:, :kk])
        votes[int(k)] = scores
    return votes


def topk_correct(scores: Tensor, labels: Tensor, topk: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of rows whose label is among the ``t`` highest-scoring classes, for each ``t`` (clipped to C).

    Only classes that received votes count (a label with score 0 is a miss, not a lucky tie among the unvoted
    classes), and equal scores rank the lower class index first, so the result is deterministic.
    """
    max_t = min(max(topk), scores.shape[1])
    values, predictions = scores.sort(dim=1, descending=True, stable=True)
    labels = labels.view(-1, 1).to(predictions.device)
    hits = (predictions[:, :max_t] == labels) & (values[:, :max_t] > 0)
    return {t: int(hits[:, : min(t, max_t)].any(dim=1).sum().item()) for t in topk}


def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    train_chunk_size: int = 65536,
    use_faiss: bool | str = "auto",
    normalize: bool = True,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """k-NN top-1 / top-5 accuracy (percent) of ``test`` against ``train`` for each ``k`` in ``ks``.

    ``train_feats`` [n_train, d], ``train_labels`` [n_train], ``test_feats`` [n_test, d], ``test_labels``
    [n_test]; features are L2-normalised when ``normalize`` (the protocol). Each ``k`` is clipped to n_train.
    Test samples are processed ``chunk_size`` at a time, so the vote tensors stay small.

    Returns ``{"k10": {"top1", "top5", "k"}, ..., "num_train", "num_test", "num_classes", "feature_dim",
    "temperature", "backend"}`` where ``k`` is the effective (clipped) number of neighbours; top-5 is top-min(5, C)
    and counts only classes that received votes (see :func:`topk_correct`).
    """
    if not ks:
        raise ConfigError("k-NN needs at least one k")
    if any(int(k) < 1 for k in ks):
        raise ConfigError(f"every k must be >= 1, got {list(ks)}")
    if temperature <= 0:
        raise ConfigError(f"the k-NN temperature must be > 0, got {temperature}")
    train_labels = torch.as_tensor(train_labels).long().cpu()
    test_labels = torch.as_tensor(test_labels).long().cpu()
    if train_labels.shape[0] != train_feats.shape[0] or test_labels.shape[0] != test_feats.shape[0]:
        raise ValueError("k-NN: features and labels must have the same number of rows")
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item()) + 1)
    if normalize:
        train_feats = F.normalize(train_feats.float(), dim=1)
        test_feats = F.normalize(test_feats.float(), dim=1)
    n_train = train_feats.shape[0]
    max_k = min(max(int(k) for k in ks), n_train)
    resolved = torch.device(device) if device is not None else test_feats.device
    searcher = ExactSearcher(train_feats, use_faiss, resolved, train_chunk_size)
    correct = {int(k): {1: 0, 5: 0} for k in ks}
    chunk_size = max(1, int(chunk_size))
    starts = range(0, test_feats.shape[0], chunk_size)
    for start in ProgressBar(
        starts, desc=f"k-NN ({searcher.backend})", unit="chunk", disable=not progress, leave=False
    ):
        sims, indices = searcher.search(test_feats[start : start + chunk_size], max_k)
        votes = knn_votes(sims, train_labels[indices], ks, temperature, num_classes)
        chunk_labels = test_labels[start : start + chunk_size]
        for k, scores in votes.items():
            counts = topk_correct(scores, chunk_labels, (1, 5))
            correct[k][1] += counts[1]
            correct[k][5] += counts[5]
    n_test = test_feats.shape[0]
    results: dict[str, Any] = {}
    for k in ks:
        k = int(k)
        results[f"k{k}"] = {
            "top1": 100.0 * correct[k][1] / max(n_test, 1),
            "top5": 100.0 * correct[k][5] / max(n_test, 1),
            "k": min(k, n_train),
        }
    results.update(
        num_train=n_train,
        num_test=n_test,
        num_classes=num_classes,
        feature_dim=int(train_feats.shape[1]),
        temperature=float(temperature),
        backend=searcher.backend,
    )
    return results


# --------------------------------------------------------------------------------------------------- model level
def classification_datasets(train_root: str, val_root: str, size: int) -> tuple[Any, Any]:
    """ImageFolder train and val data sets with the evaluation transform (resize, center-crop ``size``, ImageNet norm).

    The val classes must be the train classes (same folder names), so labels mean the same thing in both.
    """
    from franca.data.augmentations import eval_transform
    from franca.data.datasets import ImageFolderDataset

    transform = eval_transform(size=size)
    train = ImageFolderDataset(train_root, transform=transform)
    val = ImageFolderDataset(val_root, transform=transform)
    if list(train.classes) != list(val.classes):
        missing = sorted(set(val.classes) - set(train.classes)) or sorted(
            set(train.classes) - set(val.classes)
        )
        raise ConfigError(
            f"{val_root}: its class folders differ from those of {train_root} (e.g. {missing[:3]}); "
            "both must have the same class subfolders"
        )
    return train, val


def evaluate_knn(
    model: torch.nn.Module,
    train_dataset: Any,
    val_dataset: Any,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    feature: str = "cls",
    use_faiss: bool | str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Extract ``feature`` (default the CLS token) for both data sets and run :func:`knn_classify`.

    The data sets yield ``(image tensor, label)`` (or None for unreadable files); returns the k-NN results plus the
    counts of skipped images.
    """
    from franca.eval.features import extract_train_val_features

    train, val, device = extract_train_val_features(
        model, train_dataset, val_dataset, (feature,), batch_size, num_workers, device, progress
    )
    num_classes = len(getattr(train_dataset, "classes", [])) or None
    results = knn_classify(
        train.features[feature],
        train.labels,
        val.features[feature],
        val.labels,
        ks=ks,
        temperature=temperature,
        num_classes=num_classes,
        use_faiss=use_faiss,
        device=device,
        progress=progress,
    )
    results.update(feature=feature, skipped_train=train.num_skipped, skipped_val=val.num_skipped)
    return results


def knn_table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{"k", "top1", "top5"}`` of a :func:`knn_classify` result, for :func:`~franca.eval.common.format_table`."""
    rows = []
    for key, value in results.items():
        if key.startswith("k") and isinstance(value, dict) and "top1" in value:
            rows.append({"k": value["k"], "top1": value["top1"], "top5": value["top5"]})
    return rows
