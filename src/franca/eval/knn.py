"""Weighted k-NN classification on frozen features, the DINOv2 protocol used by Franca.

Features (the final-normed CLS token at 224 px center-crop) are L2-normalised; each test sample's ``max(ks)`` most
cosine-similar train samples are found; their similarities ``s`` become weights ``softmax(s / T)`` over those
neighbours (T = 0.07), and the weights of the first ``k`` neighbours are summed per class. The class scores give top-1
and top-5 accuracy for every ``k`` in (10, 20, 100, 200). DINOv2 reports k = 20 by convention.

Exact search either with torch (test samples in chunks, train set in chunks whose top-k lists are merged, so the
memory is ``chunk_size x train_chunk_size`` similarities whatever the train size) or with a faiss ``IndexFlatIP``
when faiss is installed; both give the same neighbours up to float rounding.

:class:`KnnSettings` holds the protocol's settings, :func:`score_knn` scores features (tensors with labels, or
:class:`~franca.features.Features`) into a :class:`KnnResult`, and :func:`evaluate_knn` extracts the features of two
data sets with :mod:`franca.features` and scores them. :func:`knn_classify` is the same scoring as a plain dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from franca.core.errors import ConfigError
from franca.core.progress import ProgressBar
from franca.eval import defaults
from franca.eval.common import (
    Provenance,
    count_classes,
    dataset_classes,
    feature_rows,
    model_device,
    provenance_dict,
    split_features,
)
from franca.eval.search import ExactSearcher, knn_search  # noqa: F401  (knn_search: re-exported)
from franca.features import Features

DEFAULT_KS: tuple[int, ...] = defaults.KNN_KS
DEFAULT_TEMPERATURE = defaults.KNN_TEMPERATURE


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


@dataclass(frozen=True)
class KnnSettings:
    """Settings of the k-NN protocol.

    ``ks``: neighbour counts (each >= 1; clipped to the train size when scoring); ``temperature``: T of the vote
    weights ``softmax(sim / T)`` (> 0); ``feature``: the token scored when given Features (``cls``; any token name
    or alias, e.g. ``avgpool``); ``use_faiss``: ``"auto"``, True or False; ``chunk_size`` / ``train_chunk_size``:
    test / train rows per search step; ``normalize``: L2-normalise the features first (the protocol does).
    """

    ks: Sequence[int] = DEFAULT_KS
    temperature: float = DEFAULT_TEMPERATURE
    feature: str = "cls"
    use_faiss: bool | str = "auto"
    chunk_size: int = defaults.KNN_CHUNK_SIZE
    train_chunk_size: int = defaults.KNN_TRAIN_CHUNK_SIZE
    normalize: bool = True

    def __post_init__(self) -> None:
        if not self.ks:
            raise ConfigError("k-NN needs at least one k (--ks)")
        if any(int(k) < 1 for k in self.ks):
            raise ConfigError(f"every k (--ks) must be >= 1, got {list(self.ks)}")
        if self.temperature <= 0:
            raise ConfigError(f"the k-NN temperature (--temperature) must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class KnnAccuracy:
    """Accuracy (percent) with one neighbour count: ``top1``, ``top5`` (top-min(5, C), voted classes only, see
    :func:`topk_correct`) and the effective ``k`` (clipped to the train size)."""

    top1: float
    top5: float
    k: int


@dataclass(frozen=True)
class KnnResult:
    """What :func:`score_knn` measured: the accuracy per requested k (in the order of the settings' ``ks``), the
    sizes, the temperature, the search backend and, when Features were scored, their :class:`Provenance`."""

    accuracy: dict[int, KnnAccuracy]
    num_train: int
    num_test: int
    num_classes: int
    feature_dim: int
    temperature: float
    backend: str
    provenance: Provenance | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"k10": {"top1", "top5", "k"}, ..., "num_train", "num_test", "num_classes", "feature_dim",
        "temperature", "backend"}``, then ``"feature", "skipped_train", "skipped_val"`` when Features were scored."""
        per_k = {f"k{k}": dataclasses.asdict(accuracy) for k, accuracy in self.accuracy.items()}
        return {
            **per_k,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "temperature": self.temperature,
            "backend": self.backend,
            **provenance_dict(self.provenance),
        }


def _count_hits(
    searcher: ExactSearcher,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    settings: KnnSettings,
    num_classes: int,
    progress: bool,
) -> dict[int, tuple[int, int]]:
    """{k: (top-1 hits, top-5 hits)} of the test rows [n_test, d], searched ``settings.chunk_size`` rows at a time
    (so the vote tensors stay small)."""
    ks = [int(k) for k in settings.ks]
    max_k = min(max(ks), searcher.num_train)
    hits = {k: [0, 0] for k in ks}
    chunk_size = max(1, int(settings.chunk_size))
    starts = range(0, test_feats.shape[0], chunk_size)
    for start in ProgressBar(
        starts, desc=f"k-NN ({searcher.backend})", unit="chunk", disable=not progress, leave=False
    ):
        sims, indices = searcher.search(test_feats[start : start + chunk_size], max_k)
        votes = knn_votes(sims, train_labels[indices], ks, settings.temperature, num_classes)
        chunk_labels = test_labels[start : start + chunk_size]
        for k, scores in votes.items():
            counts = topk_correct(scores, chunk_labels, (1, 5))
            hits[k][0] += counts[1]
            hits[k][1] += counts[5]
    return {k: (top1, top5) for k, (top1, top5) in hits.items()}


def score_knn(
    train: Tensor | Features,
    train_labels: Tensor | None,
    test: Tensor | Features,
    test_labels: Tensor | None,
    settings: KnnSettings | None = None,
    *,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> KnnResult:
    """k-NN top-1 / top-5 accuracy (percent) of ``test`` against ``train`` for each k of ``settings``.

    ``train`` [n_train, d] and ``test`` [n_test, d] are feature tensors with their labels [n], or Features (their
    ``settings.feature`` token and, unless labels are given, their targets; the result then records the feature
    and the skipped images). ``num_classes`` defaults to the largest label + 1; the search runs on ``device``
    (default: the test features' device).
    """
    settings = settings if settings is not None else KnnSettings()
    train_feats, train_labels = feature_rows(train, train_labels, settings.feature, "train")
    test_feats, test_labels = feature_rows(test, test_labels, settings.feature, "test")
    if num_classes is None:
        num_classes = count_classes(train_labels, test_labels)
    if settings.normalize:
        train_feats = F.normalize(train_feats.float(), dim=1)
        test_feats = F.normalize(test_feats.float(), dim=1)
    resolved = torch.device(device) if device is not None else test_feats.device
    searcher = ExactSearcher(train_feats, settings.use_faiss, resolved, settings.train_chunk_size)
    hits = _count_hits(searcher, train_labels, test_feats, test_labels, settings, num_classes, progress)
    n_train, n_test = int(train_feats.shape[0]), int(test_feats.shape[0])
    accuracy = {
        k: KnnAccuracy(100.0 * top1 / max(n_test, 1), 100.0 * top5 / max(n_test, 1), min(k, n_train))
        for k, (top1, top5) in hits.items()
    }
    return KnnResult(
        accuracy,
        n_train,
        n_test,
        num_classes,
        int(train_feats.shape[1]),
        float(settings.temperature),
        searcher.backend,
        Provenance.of(settings.feature, train, test),
    )


def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = defaults.KNN_CHUNK_SIZE,
    train_chunk_size: int = defaults.KNN_TRAIN_CHUNK_SIZE,
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
    and counts only classes that received votes (see :func:`topk_correct`). :func:`score_knn` as a dict.
    """
    settings = KnnSettings(
        tuple(ks),
        temperature,
        use_faiss=use_faiss,
        chunk_size=chunk_size,
        train_chunk_size=train_chunk_size,
        normalize=normalize,
    )
    result = score_knn(
        train_feats,
        train_labels,
        test_feats,
        test_labels,
        settings,
        num_classes=num_classes,
        device=device,
        progress=progress,
    )
    return result.to_dict()


# --------------------------------------------------------------------------------------------------- model level
def evaluate_knn(
    model: torch.nn.Module,
    train_dataset: Any,
    val_dataset: Any,
    settings: KnnSettings | None = None,
    *,
    batch_size: int = defaults.EXTRACT_BATCH_SIZE,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> KnnResult:
    """Extract ``settings.feature`` (default the CLS token) of both data sets and :func:`score_knn` them.

    The data sets yield ``(image tensor, label)`` (or None for unreadable files); the result records the feature
    and the unreadable images skipped. Features are extracted and searched on ``device`` (default the model's).
    """
    settings = settings if settings is not None else KnnSettings()
    device = model_device(model, device)
    train, val = split_features(
        model,
        train_dataset,
        val_dataset,
        (settings.feature,),
        batch_size,
        num_workers,
        device,
        progress=progress,
    )
    return score_knn(
        train,
        None,
        val,
        None,
        settings,
        num_classes=dataset_classes(train_dataset),
        device=device,
        progress=progress,
    )


def knn_table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{"k", "top1", "top5"}`` of a :func:`knn_classify` result, for :func:`~franca.eval.common.format_table`."""
    rows = []
    for key, value in results.items():
        if key.startswith("k") and isinstance(value, dict) and "top1" in value:
            rows.append({"k": value["k"], "top1": value["top1"], "top5": value["top5"]})
    return rows
