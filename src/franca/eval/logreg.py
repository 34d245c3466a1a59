"""Logistic regression on frozen features, the fine-grained protocol (paper Tab. 7, DINOv2 ``log_regression.py``).

The official code fits cuML's L-BFGS logistic regression (L2 penalty, ``max_iter`` 1000, ``tol`` 1e-12) in float64
on the raw CLS features for every C in ``10 ** linspace(-6, 5, 45)``, chooses C on a random 10% of the training set,
re-fits on the whole training set with that C and reports top-1 (and top-5) on the test set. This module does the
same with scikit-learn's ``LogisticRegression(solver="lbfgs")`` (multinomial, same objective), on the CPU.

Decisions, kept consistent everywhere here:

- Features are **not** normalised by default (``normalize="none"``), exactly as DINOv2: its log-regression feeds the
  raw final-normed CLS token (the L2 normalisation in DINOv2 belongs to its k-NN only). ``"l2"`` and ``"standardize"``
  (mean/std of the fitting rows) are offered as options.
- The held-out 10% is class-stratified and seeded (DINOv2: a plain random 10% with seed 0), so that small data
  sets keep every class on both sides. ``holdout_fraction=0`` chooses C on the val set (DINOv2's
  ``--finetune-on-val``), in which case nothing is re-fitted.
- Fits that stop at ``max_iter`` are counted and reported (``not_converged``) instead of warning 45 times.

:class:`LogregSettings` holds the settings, :func:`score_logreg` scores features (tensors with labels, or
:class:`~franca.features.Features`) into a :class:`LogregResult`, :func:`evaluate_logreg` extracts the features of two
data sets with :mod:`franca.features` and scores them, and :func:`logreg_classify` is the scoring as a plain dict.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
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
from franca.eval.linear import check_holdout_fraction, holdout_split
from franca.features import Features

OFFICIAL_C_COUNT = defaults.OFFICIAL_C_COUNT
C_POWER_RANGE: tuple[float, float] = defaults.C_POWER_RANGE
NORMALIZATIONS = defaults.NORMALIZATIONS
Rows = tuple[np.ndarray, np.ndarray]  # (features [n, d] float64, labels [n] int64)


def c_grid(
    count: int = OFFICIAL_C_COUNT, low: float = C_POWER_RANGE[0], high: float = C_POWER_RANGE[1]
) -> list[float]:
    """``10 ** linspace(low, high, count)``: the official 45 values by default, a coarser sweep with a smaller count."""
    if count < 1:
        raise ConfigError(f"--c-values must be >= 1, got {count}")
    return [float(c) for c in np.power(10.0, np.linspace(low, high, count))]


@dataclass(frozen=True)
class LogregSettings:
    """Settings of the logistic-regression protocol.

    ``c_values``: the C sweep (None: the official 45 of :func:`c_grid`); ``feature``: the token scored when given
    Features (``cls``, or ``avgpool``); ``holdout_fraction``: the share of train held out to choose C (0: on val);
    ``normalize``: ``none``, ``l2`` or ``standardize``; ``metric``: ``top1`` or ``mean_per_class``, which chooses C
    (the first C wins ties); ``max_iter`` / ``tol``: of each L-BFGS fit; ``seed``: of the held-out split;
    ``n_jobs``: C values fitted in parallel (joblib). Checked when built.
    """

    c_values: Sequence[float] | None = None
    feature: str = "cls"
    holdout_fraction: float = defaults.HOLDOUT_FRACTION
    normalize: str = "none"
    metric: str = "top1"
    max_iter: int = defaults.LOGREG_MAX_ITER
    tol: float = defaults.LOGREG_TOL
    seed: int = 0
    n_jobs: int = 1

    def __post_init__(self) -> None:
        if self.metric not in defaults.LOGREG_METRICS:
            raise ConfigError(f"metric (--metric) must be top1 or mean_per_class, got {self.metric!r}")
        if self.normalize not in NORMALIZATIONS:
            choices = ", ".join(NORMALIZATIONS)
            raise ConfigError(f"normalize (--normalize) must be one of {choices}, got {self.normalize!r}")
        if self.c_values is not None and (not self.c_values or any(c <= 0 for c in self.c_values)):
            raise ConfigError("C values (--cs) must be a non-empty list of positive numbers")
        check_holdout_fraction(self.holdout_fraction)

    @property
    def cs(self) -> list[float]:
        """The C values of the sweep."""
        return [float(c) for c in self.c_values] if self.c_values is not None else c_grid()


@dataclass(frozen=True)
class SweepPoint:
    """One C of the sweep: its top-1 and mean per-class accuracy on the selection split, and whether it converged."""

    c: float
    top1: float
    mean_per_class: float
    converged: bool

    def to_dict(self) -> dict[str, Any]:
        """``{"C", "top1", "mean_per_class", "converged"}``."""
        return {
            "C": self.c,
            "top1": self.top1,
            "mean_per_class": self.mean_per_class,
            "converged": self.converged,
        }


@dataclass(frozen=True)
class LogregResult:
    """What :func:`score_logreg` measured: the test accuracy (percent) of the re-fit with the chosen C, the sweep,
    the settings that shape the numbers, the sizes and, when Features were scored, their :class:`Provenance`."""

    top1: float
    top5: float
    mean_per_class: float
    best_c: float
    selected_on: str
    selection_metric: str
    selection_score: float
    sweep: list[SweepPoint]
    not_converged: int
    normalize: str
    max_iter: int
    tol: float
    num_train: int
    num_holdout: int
    num_test: int
    num_classes: int
    feature_dim: int
    provenance: Provenance | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"top1", "top5", "mean_per_class", "best_C", "selected_on", "selection_metric", "selection_score",
        "sweep": [{"C", "top1", "mean_per_class", "converged"}], "not_converged", "normalize", "max_iter", "tol",
        "num_train", "num_holdout", "num_test", "num_classes", "feature_dim"}``, then ``"feature",
        "skipped_train", "skipped_val"`` when Features were scored."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "mean_per_class": self.mean_per_class,
            "best_C": self.best_c,
            "selected_on": self.selected_on,
            "selection_metric": self.selection_metric,
            "selection_score": self.selection_score,
            "sweep": [point.to_dict() for point in self.sweep],
            "not_converged": self.not_converged,
            "normalize": self.normalize,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "num_train": self.num_train,
            "num_holdout": self.num_holdout,
            "num_test": self.num_test,
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            **provenance_dict(self.provenance),
        }


# --------------------------------------------------------------------------------------------------- fitting
class _Preprocessor:
    """Feature normalisation fitted on the fitting rows: none, per-row L2, or per-dim standardisation."""

    def __init__(self, mode: str, fit_rows: np.ndarray) -> None:
        self.mode = mode
        if mode == "standardize":
            self.mean = fit_rows.mean(axis=0)
            std = fit_rows.std(axis=0)
            self.std = np.where(std > 0, std, 1.0)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self.mode == "l2":
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            return rows / np.maximum(norms, 1e-12)
        if self.mode == "standardize":
            return (rows - self.mean) / self.std
        return rows


def _fit(features: np.ndarray, labels: np.ndarray, c: float, max_iter: int, tol: float) -> tuple[Any, bool]:
    """Fit one L-BFGS logistic regression; returns (model, converged)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, tol=tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(features, labels)
    converged = bool(np.all(np.asarray(model.n_iter_) < max_iter))
    return model, converged


def _scores(model: Any, features: np.ndarray, num_classes: int) -> np.ndarray:
    """Class probabilities [n, num_classes] (classes absent from the fit get 0)."""
    probabilities = model.predict_proba(features)
    full = np.zeros((features.shape[0], num_classes), dtype=np.float64)
    full[:, model.classes_.astype(np.int64)] = probabilities
    return full


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1, top-min(5, C) and mean per-class top-1 accuracy (percent) of class scores [n, C] against labels [n]."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(-scores, axis=1, kind="stable")
    top = order[:, : min(5, scores.shape[1])]
    correct1 = top[:, 0] == labels
    correct5 = (top == labels[:, None]).any(axis=1)
    per_class = [correct1[labels == cls].mean() for cls in np.unique(labels)]
    return {
        "top1": 100.0 * float(correct1.mean()),
        "top5": 100.0 * float(correct5.mean()),
        "mean_per_class": 100.0 * float(np.mean(per_class)),
    }


def _fit_and_score(
    fit: Rows, score: Rows, c: float, settings: LogregSettings, num_classes: int
) -> tuple[dict[str, float], bool]:
    """Fit on ``fit`` with C = ``c`` (normalisation fitted on its rows) and measure on ``score``:
    (:func:`classification_metrics`, converged)."""
    prepare = _Preprocessor(settings.normalize, fit[0])
    model, converged = _fit(prepare(fit[0]), fit[1], c, settings.max_iter, settings.tol)
    return classification_metrics(_scores(model, prepare(score[0]), num_classes), score[1]), converged


def _sweep(
    fit: Rows, select: Rows, settings: LogregSettings, num_classes: int, progress: bool
) -> list[SweepPoint]:
    """Every C of ``settings`` fitted on ``fit`` and scored on ``select`` (in parallel with ``n_jobs`` != 1)."""

    def one(c: float) -> SweepPoint:
        metrics, converged = _fit_and_score(fit, select, c, settings, num_classes)
        return SweepPoint(c, metrics["top1"], metrics["mean_per_class"], converged)

    cs = settings.cs
    if settings.n_jobs != 1 and len(cs) > 1:
        from joblib import Parallel, delayed

        return list(Parallel(n_jobs=settings.n_jobs)(delayed(one)(c) for c in cs))
    return [
        one(c) for c in ProgressBar(cs, desc="logreg C sweep", unit="C", disable=not progress, leave=False)
    ]


def _selection_rows(train: Rows, settings: LogregSettings) -> tuple[Rows, Rows | None]:
    """(fitting rows, held-out rows or None): a class-stratified seeded split of train, or all of train and no
    held-out rows when ``settings.holdout_fraction`` is 0."""
    fit_rows, holdout_rows = (
        rows.numpy()
        for rows in holdout_split(torch.from_numpy(train[1]), settings.holdout_fraction, settings.seed)
    )
    if np.unique(train[1][fit_rows]).size < 2:
        raise ConfigError("logistic regression needs at least 2 classes in the training data")
    if not holdout_rows.size:
        return train, None
    return (train[0][fit_rows], train[1][fit_rows]), (train[0][holdout_rows], train[1][holdout_rows])


# --------------------------------------------------------------------------------------------------- scoring
def score_logreg(
    train: Tensor | Features,
    train_labels: Tensor | None,
    test: Tensor | Features,
    test_labels: Tensor | None,
    settings: LogregSettings | None = None,
    *,
    num_classes: int | None = None,
    progress: bool = False,
) -> LogregResult:
    """Sweep C on a held-out split of train, re-fit on all of train with the best C, report on test (percent).

    ``train`` [n_train, d] and ``test`` [n_test, d] are feature tensors (any float dtype; fitted in float64 NumPy)
    with their labels [n], or Features (their ``settings.feature`` token and, unless labels are given, their
    targets; the result then records the feature and the skipped images). Without a held-out split C is chosen on
    test and nothing is re-fitted.
    """
    settings = settings if settings is not None else LogregSettings()
    train_feats, train_targets = feature_rows(train, train_labels, settings.feature, "train")
    test_feats, test_targets = feature_rows(test, test_labels, settings.feature, "test")
    if num_classes is None:
        num_classes = count_classes(train_targets, test_targets)
    train_rows = (train_feats.detach().cpu().double().numpy(), train_targets.numpy())
    test_rows = (test_feats.detach().cpu().double().numpy(), test_targets.numpy())
    fit, holdout = _selection_rows(train_rows, settings)
    sweep = _sweep(fit, holdout if holdout is not None else test_rows, settings, num_classes, progress)
    best = max(range(len(sweep)), key=lambda index: (getattr(sweep[index], settings.metric), -index))
    metrics, converged = _fit_and_score(train_rows, test_rows, sweep[best].c, settings, num_classes)
    not_converged = sum(not point.converged for point in sweep) + int(holdout is not None and not converged)
    return LogregResult(
        **metrics,
        best_c=sweep[best].c,
        selected_on=f"held-out {settings.holdout_fraction:.0%} of train" if holdout is not None else "val",
        selection_metric=settings.metric,
        selection_score=getattr(sweep[best], settings.metric),
        sweep=sweep,
        not_converged=not_converged,
        normalize=settings.normalize,
        max_iter=settings.max_iter,
        tol=settings.tol,
        num_train=int(train_rows[0].shape[0]),
        num_holdout=int(holdout[0].shape[0]) if holdout is not None else 0,
        num_test=int(test_rows[0].shape[0]),
        num_classes=num_classes,
        feature_dim=int(train_rows[0].shape[1]),
        provenance=Provenance.of(settings.feature, train, test),
    )


def logreg_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    c_values: Sequence[float] | None = None,
    holdout_fraction: float = defaults.HOLDOUT_FRACTION,
    seed: int = 0,
    max_iter: int = defaults.LOGREG_MAX_ITER,
    tol: float = defaults.LOGREG_TOL,
    normalize: str = "none",
    metric: str = "top1",
    num_classes: int | None = None,
    n_jobs: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Sweep C on a held-out split of train, re-fit on all of train with the best C, report on test (percent).

    ``train_feats`` [n_train, d], ``test_feats`` [n_test, d] (any float dtype; fitted in float64 NumPy), labels [n].
    ``c_values`` defaults to the official 45; ``metric`` (``top1`` or ``mean_per_class``) chooses C, the first C
    wins ties. Returns ``{"top1", "top5", "mean_per_class", "best_C", "selected_on", "sweep": [{"C", "top1",
    "mean_per_class", "converged"}], "not_converged", "normalize", "num_train", "num_holdout", "num_test", ...}``:
    :func:`score_logreg` as a dict.
    """
    settings = LogregSettings(
        tuple(c_values) if c_values is not None else None,
        holdout_fraction=holdout_fraction,
        normalize=normalize,
        metric=metric,
        max_iter=max_iter,
        tol=tol,
        seed=seed,
        n_jobs=n_jobs,
    )
    result = score_logreg(
        train_feats,
        train_labels,
        test_feats,
        test_labels,
        settings,
        num_classes=num_classes,
        progress=progress,
    )
    return result.to_dict()


# --------------------------------------------------------------------------------------------------- model level
def evaluate_logreg(
    model: torch.nn.Module,
    train_dataset: Any,
    val_dataset: Any,
    settings: LogregSettings | None = None,
    *,
    batch_size: int = defaults.EXTRACT_BATCH_SIZE,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> LogregResult:
    """Extract ``settings.feature`` (default the CLS token) of both data sets (items ``(image tensor, label)``) and
    :func:`score_logreg` them; the result records the feature and the unreadable images skipped."""
    settings = settings if settings is not None else LogregSettings()
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
    return score_logreg(
        train, None, val, None, settings, num_classes=dataset_classes(train_dataset), progress=progress
    )
