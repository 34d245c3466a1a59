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
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from franca.core.errors import ConfigError
from franca.eval import defaults
from franca.eval.knn import DEFAULT_TEMPERATURE, knn_classify

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


def pca_fit(train_feats: Tensor, chunk_size: int = 65536) -> tuple[Tensor, Tensor, Tensor]:
    """PCA of ``train_feats`` [n, d]: (mean [d], components [d, d] one direction per row, explained variance [d]).

    The covariance is accumulated in float64 over row chunks (exact, memory O(d^2) whatever n) and diagonalised with
    ``torch.linalg.eigh``; components are sorted by decreasing variance and each one's sign is fixed so that its
    largest-magnitude coordinate is positive (deterministic output).
    """
    if train_feats.ndim != 2 or train_feats.shape[0] < 2:
        raise ConfigError(
            f"PCA needs at least 2 train samples of 2-D features, got {tuple(train_feats.shape)}"
        )
    n, d = train_feats.shape
    mean = torch.zeros(d, dtype=torch.float64)
    for start in range(0, n, chunk_size):
        mean += train_feats[start : start + chunk_size].double().sum(dim=0)
    mean /= n
    cov = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, n, chunk_size):
        centred = train_feats[start : start + chunk_size].double() - mean
        cov += centred.T @ centred
    cov /= n - 1
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    order = torch.argsort(eigenvalues, descending=True)
    variance = eigenvalues[order].clamp_min(0)
    components = eigenvectors[:, order].T.contiguous()
    pivots = components.abs().argmax(dim=1)
    signs = torch.sign(components.gather(1, pivots.view(-1, 1))).squeeze(1)
    signs[signs == 0] = 1
    components = components * signs.view(-1, 1)
    return mean.float(), components.float(), variance.float()


def pca_project(feats: Tensor, mean: Tensor, components: Tensor, dims: int) -> Tensor:
    """``(feats - mean) @ components[:dims].T``: [n, d] -> [n, dims] coordinates on the top principal directions."""
    return (feats.float() - mean) @ components[:dims].T


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
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """k-NN on the first m dims and on the top-m PCA directions, for each m in ``dims`` (default d/16 ... d).

    ``train_feats`` [n_train, d] and ``test_feats`` [n_test, d] are raw (un-normalised) features. Returns
    ``{"dims": [...], "feature_dim": d, "ks": [...], "sliced": {"<m>": knn result}, "pca": {"<m>": knn result}}``
    where each knn result is :func:`franca.eval.knn.knn_classify`'s dict (keys ``"k20"`` ... with top1/top5), and
    ``"pca_explained_variance"`` (fraction of the variance kept at each m) when ``pca``.
    """
    feature_dim = int(train_feats.shape[1])
    dims = check_dims(dims, feature_dim) if dims else default_dims(feature_dim)
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max())) + 1)
    common = dict(
        ks=ks,
        temperature=temperature,
        num_classes=num_classes,
        use_faiss=use_faiss,
        device=device,
        chunk_size=chunk_size,
    )
    results: dict[str, Any] = {"dims": dims, "feature_dim": feature_dim, "ks": [int(k) for k in ks]}
    results["sliced"] = {
        str(m): knn_classify(train_feats[:, :m], train_labels, test_feats[:, :m], test_labels, **common)
        for m in dims
    }
    if pca:
        mean, components, variance = pca_fit(train_feats)
        total = float(variance.sum()) or 1.0
        results["pca"] = {}
        results["pca_explained_variance"] = {}
        for m in dims:
            train_projected = pca_project(train_feats, mean, components, m)
            test_projected = pca_project(test_feats, mean, components, m)
            results["pca"][str(m)] = knn_classify(
                train_projected, train_labels, test_projected, test_labels, **common
            )
            results["pca_explained_variance"][str(m)] = float(variance[:m].sum()) / total
    return results


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
    dims: Sequence[int] | None = None,
    ks: Sequence[int] = DEFAULT_SLICED_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    pca: bool = True,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    use_faiss: bool | str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Extract CLS features for both data sets and run :func:`sliced_knn`."""
    from franca.eval.features import extract_train_val_features

    train, val, device = extract_train_val_features(
        model, train_dataset, val_dataset, ("cls",), batch_size, num_workers, device, progress
    )
    num_classes = len(getattr(train_dataset, "classes", [])) or None
    results = sliced_knn(
        train.features["cls"],
        train.labels,
        val.features["cls"],
        val.labels,
        dims=dims,
        ks=ks,
        temperature=temperature,
        pca=pca,
        num_classes=num_classes,
        use_faiss=use_faiss,
        device=device,
    )
    results.update(skipped_train=train.num_skipped, skipped_val=val.num_skipped)
    return results
