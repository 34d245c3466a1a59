"""Evaluate one backbone (features once, every protocol) and hold what the demo measured, as small dataclasses.

:class:`BackboneEvaluation` holds the protocols' results for one backbone, :class:`RasaEvaluation` RASA on the trained
one, :class:`PcaPanels` the PCA maps shown in the report and :class:`DemoResults` all of a demo run; each
``to_dict()`` gives the JSON of ``metrics.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from franca.apps.demo.data import DataSummary, DemoData, SplitData
from franca.apps.demo.progress import PhaseLog
from franca.apps.demo.protocols import (
    FEATURE_TOKENS,
    colour_mask,
    pca_map_images,
    run_hummingbird,
    run_knn,
    run_linear,
    run_overclustering,
    run_rasa,
    run_sliced,
    sliced_curve,
)
from franca.apps.demo.settings import (
    TARGET_HUMMINGBIRD_POINTS,
    TARGET_KNN_POINTS,
    DemoSettings,
    EvalSettings,
)
from franca.apps.demo.training import TrainOutcome
from franca.features import Features, TensorImages, extract_features
from franca.rasa import RasaResult
from franca.train.config import config_to_dict


@dataclass
class BackboneEvaluation:
    """The protocols' results for one backbone (percentages; each part is the JSON of its scoring function).

    ``linear`` and ``overclustering`` are None for a light evaluation (``full=False``); ``seconds`` holds the
    time each step took.
    """

    knn: dict[str, Any]
    sliced_knn: dict[str, Any]
    hummingbird: dict[str, Any]
    linear: dict[str, Any] | None = None
    overclustering: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``metrics.json["trained"]`` (knn, sliced_knn, hummingbird[, linear, overclustering], seconds)."""
        parts = {"knn": self.knn, "sliced_knn": self.sliced_knn, "hummingbird": self.hummingbird}
        if self.linear is not None:
            parts["linear"] = self.linear
        if self.overclustering is not None:
            parts["overclustering"] = self.overclustering
        return {**parts, "seconds": self.seconds}

    @property
    def knn_top1(self) -> float:
        """k-NN top-1 on the CLS token."""
        return self.knn["top1"]

    @property
    def hummingbird_miou(self) -> float:
        """HummingBird mIoU."""
        return self.hummingbird["miou"]

    @property
    def feature_dim(self) -> int:
        """Width D of the CLS token."""
        return int(self.sliced_knn["feature_dim"])

    def sliced(self, series: str, k: int) -> dict[int, float]:
        """{dims: k-NN top-1} of the ``"sliced"`` (first m dims) or ``"pca"`` (m PCA directions) series."""
        return sliced_curve(self.sliced_knn, series, k)

    def overclustering_miou(self, clusters: int) -> float:
        """Overclustering mIoU for K = ``clusters`` (a full evaluation only)."""
        assert self.overclustering is not None
        return self.overclustering[f"k{clusters}"]["miou"]


class _Timer(dict):
    """{step: seconds}: ``timer("knn", f)`` runs ``f()``, records how long it took and returns its value."""

    def __call__(self, key: str, function: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = function()
        self[key] = time.perf_counter() - started
        return value


def _extract(
    name: str, model: nn.Module, data: DemoData, settings: DemoSettings, device: torch.device
) -> tuple[Features, Features]:
    """CLS, patch grid and mean patch token of every train and val image (class labels as targets)."""

    def features(split: SplitData, description: str) -> Features:
        images = TensorImages(split.images, split.labels, settings.eval.batch_size)
        return extract_features(
            model.to(device), images, FEATURE_TOKENS, device, desc=description, progress=settings.progress
        )

    return features(data.train, f"{name}: train"), features(data.val, f"{name}: val")


def _linear_and_overclustering(
    timer: _Timer,
    train: Features,
    val: Features,
    data: DemoData,
    settings: DemoSettings,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The linear probe (its heads listed without their names) and overclustering of the val patches."""
    evaluation = settings.eval
    linear = timer("linear", lambda: run_linear(train, val, evaluation, device, seed=settings.seed))
    linear["heads"] = [{k: v for k, v in row.items() if k != "name"} for row in linear["heads"]]
    overclustering = timer(
        "overclustering",
        lambda: run_overclustering(val.patch, data.val.masks, evaluation, data.num_classes),
    )
    return linear, overclustering


def score_backbone(
    name: str,
    model: nn.Module,
    data: DemoData,
    settings: DemoSettings,
    device: torch.device,
    log: PhaseLog,
    full: bool = True,
) -> tuple[BackboneEvaluation, Features, Features]:
    """Extract features once and run every protocol on them (``full=False``: k-NN, sliced k-NN, HummingBird only).

    Returns (results, train features, val features): :class:`franca.features.Features` with the CLS token, the patch
    grid and the mean patch token, the class labels as targets.
    """
    evaluation, timer = settings.eval, _Timer()
    log(
        f"evaluate[{name}]: extracting features of {len(data.train.labels)} train + {len(data.val.labels)} val images"
    )
    train, val = timer("features", lambda: _extract(name, model, data, settings, device))
    knn = timer("knn", lambda: run_knn(train, val, evaluation, device))
    sliced = timer("sliced_knn", lambda: run_sliced(train, val, evaluation, device, pca=full))
    log(
        f"evaluate[{name}]: HummingBird ({data.bank.indices.numel()} memory patches, k={evaluation.hummingbird_k})"
    )
    hummingbird = timer(
        "hummingbird", lambda: run_hummingbird(train.patch, val.patch, data, evaluation, device)
    )
    linear = overclustering = None
    if full:
        log(
            f"evaluate[{name}]: linear probe, overclustering (K = {', '.join(map(str, evaluation.overcluster_ks))})"
        )
        linear, overclustering = _linear_and_overclustering(timer, train, val, data, settings, device)
    results = BackboneEvaluation(knn, sliced, hummingbird, linear, overclustering, dict(timer))
    log(
        f"evaluate[{name}]: k-NN top-1 {results.knn_top1:.1f}, HummingBird mIoU {results.hummingbird_miou:.1f}"
        + (f", linear top-1 {results.linear['top1']:.1f}" if results.linear is not None else "")
    )
    return results, train, val


@dataclass
class RasaEvaluation:
    """RASA trained on the trained backbone's patch features, and HummingBird on the RASA-projected features."""

    result: RasaResult
    hummingbird: dict[str, Any]

    @property
    def position_r2_before(self) -> float:
        """Position R^2 of a linear read-out before any removal."""
        return self.result.baseline["linear_r2"]

    @property
    def position_r2_after(self) -> float:
        """Position R^2 of a linear read-out after the last removal."""
        return self.result.metrics[-1]["linear_r2"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``metrics.json["rasa"]``: the :class:`~franca.rasa.RasaResult` summary and its end points."""
        return {
            **self.result.to_dict(),
            "position_r2_before": self.position_r2_before,
            "position_r2_after": self.position_r2_after,
            "predictor_r2_first": self.result.metrics[0]["predictor_r2"],
            "predictor_r2_last": self.result.metrics[-1]["predictor_r2"],
        }


def evaluate_rasa(
    train_patch: Tensor, val_patch: Tensor, data: DemoData, settings: DemoSettings, device: torch.device
) -> RasaEvaluation:
    """RASA on patch grids [N, h, w, D] (trained on train, measured on val), then HummingBird through its matrix."""
    result = run_rasa(train_patch, val_patch, settings.eval, device, settings.seed, settings.progress)
    hummingbird = run_hummingbird(
        train_patch, val_patch, data, settings.eval, device, projection=result.matrix
    )
    return RasaEvaluation(result, hummingbird)


@dataclass
class PcaPanels:
    """PCA maps [S, S, 3] uint8 of the val images ``shown``: trained, trained + RASA and random-init features."""

    shown: Tensor  # int64 [n]: indices into the val split
    size: int
    trained: list[np.ndarray] = field(default_factory=list)
    rasa: list[np.ndarray] = field(default_factory=list)
    random: list[np.ndarray] = field(default_factory=list)

    COLUMNS = ("image", "mask", "trained", "trained + RASA", "random init")

    @classmethod
    def spread(cls, num_val: int, count: int, size: int) -> PcaPanels:
        """``count`` val images spread over the split (it is sorted by class, so they show several classes)."""
        count = min(count, num_val)
        return cls(torch.tensor([round(j * num_val / count) for j in range(count)]), size)

    def with_trained(self, val_patch: Tensor, rasa_matrix: Tensor) -> PcaPanels:
        """These panels with the maps of the trained features, without and with the RASA projection."""
        patch = val_patch[self.shown]
        return replace(
            self,
            trained=pca_map_images(patch, self.size),
            rasa=pca_map_images(patch @ rasa_matrix.T, self.size),
        )

    def with_random(self, val_patch: Tensor) -> PcaPanels:
        """These panels with the maps of the random-init features."""
        return replace(self, random=pca_map_images(val_patch[self.shown], self.size))

    def rows(self, val: SplitData) -> list[list[np.ndarray]]:
        """One row per image, in :attr:`COLUMNS` order (image, coloured mask, the three maps)."""
        return [
            [
                val.images[index].permute(1, 2, 0).numpy(),
                colour_mask(val.masks[index]),
                self.trained[i],
                self.rasa[i],
                self.random[i],
            ]
            for i, index in enumerate(self.shown.tolist())
        ]


@dataclass
class DemoResults:
    """Everything a demo run measured; :meth:`to_dict` is ``metrics.json`` (without ``report``)."""

    settings: DemoSettings
    device: torch.device
    data: DataSummary
    outcome: TrainOutcome
    trained: BackboneEvaluation
    random: BackboneEvaluation
    rasa: RasaEvaluation
    ablation: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds, and "total"

    @property
    def levels(self) -> list[int]:
        """The Matryoshka level widths of the trained run."""
        return self.outcome.config.heads.level_widths(self.trained.feature_dim)

    def summary_rows(self) -> list[dict[str, Any]]:
        """The trained-vs-random rows of the summary table (:func:`summary_rows`)."""
        return summary_rows(self.trained, self.random, self.settings.eval)

    def targets(self) -> dict[str, Any]:
        """Trained minus random init for k-NN and HummingBird, against the issue's targets."""
        knn_points = self.trained.knn_top1 - self.random.knn_top1
        hb_points = self.trained.hummingbird_miou - self.random.hummingbird_miou
        return {
            "knn_points": knn_points,
            "knn_target": TARGET_KNN_POINTS,
            "knn_met": knn_points >= TARGET_KNN_POINTS,
            "hummingbird_points": hb_points,
            "hummingbird_target": TARGET_HUMMINGBIRD_POINTS,
            "hummingbird_met": hb_points >= TARGET_HUMMINGBIRD_POINTS,
        }

    def settings_dict(self) -> dict[str, Any]:
        """The demo and evaluation settings, the device and the data folder."""
        demo = {key: value for key, value in asdict(self.settings).items() if key != "eval"}
        return {
            **demo,
            "evaluation": asdict(self.settings.eval),
            "device": str(self.device),
            "data_dir": str(self.settings.data_path),
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``metrics.json`` (the CLI and tests index it)."""
        metrics: dict[str, Any] = {
            "settings": self.settings_dict(),
            "data": asdict(self.data),
            "training": {
                **self.outcome.summary(),
                "levels": self.levels,
                "config": config_to_dict(self.outcome.config),
            },
            "trained": self.trained.to_dict(),
            "random_init": self.random.to_dict(),
            "rasa": self.rasa.to_dict(),
            "hummingbird_rasa": self.rasa.hummingbird,
            "summary": self.summary_rows(),
            "targets": self.targets(),
            "timings": dict(self.timings),
        }
        if self.ablation is not None:
            metrics["ablation"] = self.ablation
        return metrics


def summary_rows(
    trained: BackboneEvaluation, random: BackboneEvaluation, evaluation: EvalSettings
) -> list[dict[str, Any]]:
    """Rows (metric, trained, random init) of the summary table; all metrics in percent, higher is better."""
    smallest = min(int(m) for m in trained.sliced_knn["dims"])
    k = evaluation.knn_k
    rows: list[tuple[str, Callable[[BackboneEvaluation], float]]] = [
        (f"k-NN top-1 (k={k}, CLS token), %", lambda r: r.knn_top1),
        ("linear probe top-1, %", lambda r: r.linear["top1"]),
        ("HummingBird mIoU, %", lambda r: r.hummingbird_miou),
    ]
    rows += [
        (f"overclustering mIoU K={kk}, %", lambda r, kk=kk: r.overclustering_miou(kk))
        for kk in evaluation.overcluster_ks
    ]
    rows.append(
        (
            f"sliced k-NN top-1 at {smallest} dims (d/16), %",
            lambda r: r.sliced_knn["sliced"][str(smallest)][f"k{k}"]["top1"],
        )
    )
    return [
        {"metric": name, "trained": round(get(trained), 2), "random_init": round(get(random), 2)}
        for name, get in rows
    ]
