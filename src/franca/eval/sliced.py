"""Matryoshka-sliced and PCA-truncated k-NN: how much of the classification signal lives in the first m dims.

Franca's nested heads train the first m_j dims of the backbone token to be useful on their own (paper Fig. 4: k-NN on
IN-v2 with sliced features, Franca above DINOv2 down to dim/64). For each m in ``dims`` this module runs the k-NN
protocol of :mod:`franca.eval.knn` on

- ``sliced``: the first m dims of the features, ``feats[:, :m]`` (then L2-normalised, as k-NN does), and
- ``pca``: the projection onto the top-m principal directions of the *train* features (centred by the train mean,
  directions sorted by decreasing variance; the test features use the train mean and directions), then L2-normalised.
  At m = d this is k-NN on mean-centred features, so it need not equal the full-width ``sliced`` point exactly.

The PCA baseline tells whether a backbone's first dims are special (Matryoshka) or merely as good as any m-dim
projection. :func:`plot_sliced` draws top-1 against m (log-2 axis) for one or several models.

:class:`SlicedSettings` holds the settings, :func:`score_sliced` scores features (tensors with labels, or
:class:`~franca.features.Features`, whose CLS token it uses) into a :class:`SlicedResult`, :func:`evaluate_sliced_knn`
extracts the CLS features of two data sets with :mod:`franca.features` and scores them, and :func:`sliced_knn` is the
scoring as a plain dict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from franca.core.errors import ConfigError
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
from franca.eval.knn import DEFAULT_TEMPERATURE, KnnResult, KnnSettings, score_knn
from franca.eval.metrics import pca_fit, pca_project
from franca.features import Features

DEFAULT_SLICED_KS: tuple[int, ...] = defaults.SLICED_KS
DEFAULT_FRACTIONS: tuple[int, ...] = defaults.SLICED_FRACTIONS


def default_dims(feature_dim: int, divisors: Sequence[int] = DEFAULT_FRACTIONS) -> list[int]:
    """The nesting levels d/16, d/8, d/4, d/2, d (ascending, each at least 1, duplicates removed)."""
    return sorted({max(1, feature_dim // divisor) for divisor in divisors})


def check_dims(dims: Sequence[int], feature_dim: int) -> list[int]:
    """Sorted unique dims, each in [1, feature_dim] (ConfigError otherwise)."""
    bad = [m for m in dims if not 1 <= int(m) <= feature_dim]
    if bad:
        raise ConfigError(f"--dims {bad[0]} is outside 1..{feature_dim} (the feature width)")
    return sorted({int(m) for m in dims})


@dataclass(frozen=True)
class SlicedSettings:
    """Settings of the sliced k-NN.

    ``dims``: the feature widths m (default d/16, d/8, d/4, d/2, d; see :func:`default_dims`); ``pca``: also score
    the top-m PCA projections; ``ks``, ``temperature``, ``use_faiss``, ``chunk_size``: those of the k-NN run at each
    width (see :class:`~franca.eval.knn.KnnSettings`, checked here).
    """

    dims: Sequence[int] | None = None
    ks: Sequence[int] = DEFAULT_SLICED_KS
    temperature: float = DEFAULT_TEMPERATURE
    pca: bool = True
    use_faiss: bool | str = "auto"
    chunk_size: int = defaults.KNN_CHUNK_SIZE

    def __post_init__(self) -> None:
        KnnSettings(tuple(self.ks), self.temperature)  # checks ks and temperature now, not after a PCA fit

    @property
    def knn(self) -> KnnSettings:
        """The k-NN settings used at every width."""
        return KnnSettings(
            tuple(self.ks), self.temperature, use_faiss=self.use_faiss, chunk_size=self.chunk_size
        )


@dataclass(frozen=True)
class SlicedResult:
    """What :func:`score_sliced` measured: the widths, the full width ``feature_dim``, the k-NN results per width on
    the leading dims (``sliced``) and, when asked for, on the PCA projections (``pca``) with the fraction of the
    train variance each width keeps; the :class:`Provenance` (skipped images) when Features were scored."""

    dims: list[int]
    feature_dim: int
    ks: list[int]
    sliced: dict[int, KnnResult]
    pca: dict[int, KnnResult] | None = None
    pca_explained_variance: dict[int, float] | None = None
    provenance: Provenance | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"dims", "feature_dim", "ks", "sliced": {"<m>": knn dict}}``, then ``"pca": {"<m>": knn dict}`` and
        ``"pca_explained_variance": {"<m>": fraction}`` when PCA was scored, then ``"skipped_train",
        "skipped_val"`` when Features were scored."""
        result: dict[str, Any] = {
            "dims": list(self.dims),
            "feature_dim": self.feature_dim,
            "ks": list(self.ks),
            "sliced": {str(m): knn.to_dict() for m, knn in self.sliced.items()},
        }
        if self.pca is not None:
            result["pca"] = {str(m): knn.to_dict() for m, knn in self.pca.items()}
            result["pca_explained_variance"] = {
                str(m): fraction for m, fraction in (self.pca_explained_variance or {}).items()
            }
        return {**result, **provenance_dict(self.provenance)}


def _pca_curve(
    train_feats: Tensor,
    test_feats: Tensor,
    dims: Sequence[int],
    knn: Callable[[Tensor, Tensor], KnnResult],
) -> tuple[dict[int, KnnResult], dict[int, float]]:
    """``knn`` (train [n, m], test [n', m]) -> KnnResult on the top-m PCA projections fitted on the train features,
    for each m, and the fraction of the train variance each m keeps."""
    mean, components, variance = pca_fit(train_feats)
    total = float(variance.sum()) or 1.0
    scores, explained = {}, {}
    for m in dims:
        train_projected = pca_project(train_feats, mean, components, m)
        scores[m] = knn(train_projected, pca_project(test_feats, mean, components, m))
        explained[m] = float(variance[:m].sum()) / total
    return scores, explained


def score_sliced(
    train: Tensor | Features,
    train_labels: Tensor | None,
    test: Tensor | Features,
    test_labels: Tensor | None,
    settings: SlicedSettings | None = None,
    *,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
) -> SlicedResult:
    """k-NN on the first m dims and on the top-m PCA directions, for each m of ``settings.dims`` (default d/16 ... d).

    ``train`` [n_train, d] and ``test`` [n_test, d] are raw (un-normalised) features with their labels, or Features
    (their CLS token and, unless labels are given, their targets; the result then records the skipped images).
    """
    settings = settings if settings is not None else SlicedSettings()
    train_feats, train_labels = feature_rows(train, train_labels, "cls", "train")
    test_feats, test_labels = feature_rows(test, test_labels, "cls", "test")
    feature_dim = int(train_feats.shape[1])
    dims = check_dims(settings.dims, feature_dim) if settings.dims else default_dims(feature_dim)
    if num_classes is None:
        num_classes = count_classes(train_labels, test_labels)
    knn_settings = settings.knn

    def knn(train_m: Tensor, test_m: Tensor) -> KnnResult:
        return score_knn(
            train_m, train_labels, test_m, test_labels, knn_settings, num_classes=num_classes, device=device
        )

    sliced = {m: knn(train_feats[:, :m], test_feats[:, :m]) for m in dims}
    pca, explained = _pca_curve(train_feats, test_feats, dims, knn) if settings.pca else (None, None)
    ks = [int(k) for k in settings.ks]
    return SlicedResult(dims, feature_dim, ks, sliced, pca, explained, Provenance.of(None, train, test))


def sliced_knn(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    dims: Sequence[int] | None = None,
    ks: Sequence[int] = DEFAULT_SLICED_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    pca: bool = True,
    num_classes: int | None = None,
    use_faiss: bool | str = "auto",
    device: torch.device | str | None = None,
    chunk_size: int = defaults.KNN_CHUNK_SIZE,
) -> dict[str, Any]:
    """k-NN on the first m dims and on the top-m PCA directions, for each m in ``dims`` (default d/16 ... d).

    ``train_feats`` [n_train, d] and ``test_feats`` [n_test, d] are raw (un-normalised) features. Returns
    ``{"dims": [...], "feature_dim": d, "ks": [...], "sliced": {"<m>": knn result}, "pca": {"<m>": knn result}}``
    where each knn result is :func:`franca.eval.knn.knn_classify`'s dict (keys ``"k20"`` ... with top1/top5), and
    ``"pca_explained_variance"`` (fraction of the variance kept at each m) when ``pca``. :func:`score_sliced` as a
    dict.
    """
    settings = SlicedSettings(
        tuple(dims) if dims else None, tuple(ks), temperature, pca, use_faiss, chunk_size
    )
    result = score_sliced(
        train_feats, train_labels, test_feats, test_labels, settings, num_classes=num_classes, device=device
    )
    return result.to_dict()


def sliced_table_rows(results: dict[str, Any], k: int | None = None) -> list[dict[str, Any]]:
    """One row per dim: ``{"dims", "sliced_top1", "pca_top1"}`` for neighbour count ``k`` (default the first k)."""
    k = int(k if k is not None else results["ks"][0])
    rows = []
    for m in results["dims"]:
        row: dict[str, Any] = {"dims": m, "sliced_top1": results["sliced"][str(m)][f"k{k}"]["top1"]}
        if "pca" in results:
            row["pca_top1"] = results["pca"][str(m)][f"k{k}"]["top1"]
        rows.append(row)
    return rows


def plot_sliced(
    curves: Sequence[tuple[str, dict[str, Any]]],
    path: str | Path,
    k: int | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG of k-NN top-1 against the number of dims (log-2 axis) for one or several models.

    ``curves`` is a list of ``(model name, sliced_knn result)``; each model gets one colour, a solid line for the
    Matryoshka slices and a dashed line for the PCA-truncated features. Draws on an Agg canvas (no display, no
    pyplot global state).
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    all_dims: set[int] = set()
    used_k = None
    for index, (name, results) in enumerate(curves):
        colour = colours[index % len(colours)]
        rows = sliced_table_rows(results, k)
        used_k = int(k if k is not None else results["ks"][0])
        dims = [row["dims"] for row in rows]
        all_dims.update(dims)
        axis.plot(
            dims, [row["sliced_top1"] for row in rows], "o-", color=colour, label=f"{name} (first m dims)"
        )
        if all("pca_top1" in row for row in rows):
            axis.plot(
                dims, [row["pca_top1"] for row in rows], "s--", color=colour, label=f"{name} (PCA to m dims)"
            )
    axis.set_xscale("log", base=2)
    ticks = sorted(all_dims)
    axis.set_xticks(ticks)
    axis.set_xticklabels([str(t) for t in ticks])
    axis.set_xlabel("feature dims m")
    axis.set_ylabel(f"k-NN top-1 (%), k={used_k}")
    axis.set_title(title or "Sliced vs PCA-truncated k-NN")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def evaluate_sliced_knn(
    model: torch.nn.Module,
    train_dataset: Any,
    val_dataset: Any,
    settings: SlicedSettings | None = None,
    *,
    batch_size: int = defaults.EXTRACT_BATCH_SIZE,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> SlicedResult:
    """Extract the CLS features of both data sets (items ``(image tensor, label)``) and :func:`score_sliced` them.

    Features are extracted and searched on ``device`` (default the model's); the result records the skipped images.
    """
    settings = settings if settings is not None else SlicedSettings()
    device = model_device(model, device)
    train, val = split_features(
        model, train_dataset, val_dataset, ("cls",), batch_size, num_workers, device, progress=progress
    )
    return score_sliced(
        train, None, val, None, settings, num_classes=dataset_classes(train_dataset), device=device
    )
