"""Evaluate one backbone: extract its features once and score every protocol on them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from franca.apps.demo.data import DemoData, SplitData
from franca.apps.demo.progress import PhaseLog
from franca.apps.demo.protocols import (
    FEATURE_TOKENS,
    run_hummingbird,
    run_knn,
    run_linear,
    run_overclustering,
    run_sliced,
)
from franca.apps.demo.settings import DemoSettings, EvalSettings
from franca.features import Features, TensorImages, extract_features


def evaluate_backbone(
    name: str,
    model: nn.Module,
    data: DemoData,
    settings: DemoSettings,
    device: torch.device,
    log: PhaseLog,
    full: bool = True,
) -> tuple[dict[str, Any], Features, Features]:
    """Extract features once and run every protocol on them (``full=False``: k-NN, sliced k-NN, HummingBird only).

    Returns (results, train features, val features): :class:`franca.features.Features` with the CLS token, the patch
    grid and the mean patch token, the class labels as targets.
    """
    evaluation = settings.eval
    log(
        f"evaluate[{name}]: extracting features of {len(data.train.labels)} train + {len(data.val.labels)} val images"
    )
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}

    def timed(key: str, function: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = function()
        timings[key] = time.perf_counter() - started
        return value

    def features(split: SplitData, description: str) -> Features:
        images = TensorImages(split.images, split.labels, evaluation.batch_size)
        return extract_features(
            model.to(device), images, FEATURE_TOKENS, device, desc=description, progress=settings.progress
        )

    train, val = timed(
        "features", lambda: (features(data.train, f"{name}: train"), features(data.val, f"{name}: val"))
    )
    results["knn"] = timed("knn", lambda: run_knn(train, val, evaluation, device))
    results["sliced_knn"] = timed("sliced_knn", lambda: run_sliced(train, val, evaluation, device, pca=full))
    log(
        f"evaluate[{name}]: HummingBird ({data.bank.indices.numel()} memory patches, k={evaluation.hummingbird_k})"
    )
    results["hummingbird"] = timed(
        "hummingbird", lambda: run_hummingbird(train.patch, val.patch, data, evaluation, device)
    )
    if full:
        log(
            f"evaluate[{name}]: linear probe, overclustering (K = {', '.join(map(str, evaluation.overcluster_ks))})"
        )
        results["linear"] = timed(
            "linear", lambda: run_linear(train, val, evaluation, device, seed=settings.seed)
        )
        results["linear"]["heads"] = [
            {k: v for k, v in row.items() if k != "name"} for row in results["linear"]["heads"]
        ]
        results["overclustering"] = timed(
            "overclustering",
            lambda: run_overclustering(val.patch, data.val.masks, evaluation, data.num_classes),
        )
    results["seconds"] = timings
    log(
        f"evaluate[{name}]: k-NN top-1 {results['knn']['top1']:.1f}, HummingBird mIoU "
        f"{results['hummingbird']['miou']:.1f}"
        + (f", linear top-1 {results['linear']['top1']:.1f}" if full else "")
    )
    return results, train, val


def summary_rows(
    trained: dict[str, Any], random: dict[str, Any], evaluation: EvalSettings
) -> list[dict[str, Any]]:
    """Rows (metric, trained, random init) of the summary table; all metrics in percent, higher is better."""
    smallest = str(min(int(m) for m in trained["sliced_knn"]["dims"]))
    k = evaluation.knn_k

    def sliced_small(results: dict[str, Any]) -> float:
        return results["sliced_knn"]["sliced"][smallest][f"k{k}"]["top1"]

    rows = [
        (f"k-NN top-1 (k={k}, CLS token), %", lambda r: r["knn"]["top1"]),
        ("linear probe top-1, %", lambda r: r["linear"]["top1"]),
        ("HummingBird mIoU, %", lambda r: r["hummingbird"]["miou"]),
    ]
    rows += [
        (f"overclustering mIoU K={kk}, %", lambda r, kk=kk: r["overclustering"][f"k{kk}"]["miou"])
        for kk in evaluation.overcluster_ks
    ]
    rows.append((f"sliced k-NN top-1 at {smallest} dims (d/16), %", sliced_small))
    return [
        {"metric": name, "trained": round(get(trained), 2), "random_init": round(get(random), 2)}
        for name, get in rows
    ]
