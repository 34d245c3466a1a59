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
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from franca.core.errors import ConfigError
from franca.core.progress import ProgressBar
from franca.eval import defaults
from franca.eval.linear import holdout_split

OFFICIAL_C_COUNT = defaults.OFFICIAL_C_COUNT
C_POWER_RANGE: tuple[float, float] = defaults.C_POWER_RANGE
NORMALIZATIONS = defaults.NORMALIZATIONS


def c_grid(
    count: int = OFFICIAL_C_COUNT, low: float = C_POWER_RANGE[0], high: float = C_POWER_RANGE[1]
) -> list[float]:
    """``10 ** linspace(low, high, count)``: the official 45 values by default, a coarser sweep with a smaller count."""
    if count < 1:
        raise ConfigError(f"--c-values must be >= 1, got {count}")
    return [float(c) for c in np.power(10.0, np.linspace(low, high, count))]


class _Preprocessor:
    """Feature normalisation fitted on the fitting rows: none, per-row L2, or per-dim standardisation."""

    def __init__(self, mode: str, fit_rows: np.ndarray) -> None:
        if mode not in NORMALIZATIONS:
            raise ConfigError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {mode!r}")
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


def logreg_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    c_values: Sequence[float] | None = None,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-12,
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
    "mean_per_class", "converged"}], "not_converged", "normalize", "num_train", "num_holdout", "num_test", ...}``.
    """
    if metric not in ("top1", "mean_per_class"):
        raise ConfigError(f"metric must be top1 or mean_per_class, got {metric!r}")
    c_values = list(c_values) if c_values is not None else c_grid()
    if not c_values or any(c <= 0 for c in c_values):
        raise ConfigError("C values must be a non-empty list of positive numbers")
    x_train = torch.as_tensor(train_feats).detach().cpu().double().numpy()
    y_train = torch.as_tensor(train_labels).detach().cpu().long().numpy()
    x_test = torch.as_tensor(test_feats).detach().cpu().double().numpy()
    y_test = torch.as_tensor(test_labels).detach().cpu().long().numpy()
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max()) + 1)
    fit_rows, holdout_rows = (
        t.numpy() for t in holdout_split(torch.from_numpy(y_train), holdout_fraction, seed)
    )
    if np.unique(y_train[fit_rows]).size < 2:
        raise ConfigError("logistic regression needs at least 2 classes in the training data")
    if holdout_rows.size:
        x_fit, y_fit = x_train[fit_rows], y_train[fit_rows]
        x_select, y_select = x_train[holdout_rows], y_train[holdout_rows]
        selected_on = f"held-out {holdout_fraction:.0%} of train"
    else:
        x_fit, y_fit, x_select, y_select = x_train, y_train, x_test, y_test
        selected_on = "val"
    prepare = _Preprocessor(normalize, x_fit)

    def sweep_one(c: float) -> dict[str, Any]:
        model, converged = _fit(prepare(x_fit), y_fit, c, max_iter, tol)
        metrics = classification_metrics(_scores(model, prepare(x_select), num_classes), y_select)
        return {
            "C": c,
            "top1": metrics["top1"],
            "mean_per_class": metrics["mean_per_class"],
            "converged": converged,
        }

    if n_jobs != 1 and len(c_values) > 1:
        from joblib import Parallel, delayed

        sweep = Parallel(n_jobs=n_jobs)(delayed(sweep_one)(c) for c in c_values)
    else:
        sweep = [
            sweep_one(c)
            for c in ProgressBar(c_values, desc="logreg C sweep", unit="C", disable=not progress, leave=False)
        ]
    best_index = max(range(len(sweep)), key=lambda index: (sweep[index][metric], -index))
    best_c = sweep[best_index]["C"]
    not_converged = sum(not row["converged"] for row in sweep)
    if holdout_rows.size:
        final_prepare = _Preprocessor(normalize, x_train)
        final, converged = _fit(final_prepare(x_train), y_train, best_c, max_iter, tol)
        not_converged += int(not converged)
        test_metrics = classification_metrics(_scores(final, final_prepare(x_test), num_classes), y_test)
    else:
        final, _ = _fit(prepare(x_fit), y_fit, best_c, max_iter, tol)
        test_metrics = classification_metrics(_scores(final, prepare(x_test), num_classes), y_test)
    return {
        **test_metrics,
        "best_C": best_c,
        "selected_on": selected_on,
        "selection_metric": metric,
        "selection_score": sweep[best_index][metric],
        "sweep": sweep,
        "not_converged": not_converged,
        "normalize": normalize,
        "max_iter": max_iter,
        "tol": tol,
        "num_train": int(x_train.shape[0]),
        "num_holdout": int(holdout_rows.size),
        "num_test": int(x_test.shape[0]),
        "num_classes": num_classes,
        "feature_dim": int(x_train.shape[1]),
    }


def evaluate_logreg(
    model: torch.nn.Module,
    train_dataset: Any,
    val_dataset: Any,
    c_values: Sequence[float] | None = None,
    feature: str = "cls",
    holdout_fraction: float = 0.1,
    normalize: str = "none",
    metric: str = "top1",
    max_iter: int = 1000,
    tol: float = 1e-12,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    seed: int = 0,
    n_jobs: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract ``feature`` (default the CLS token) for both data sets and run :func:`logreg_classify`."""
    from franca.eval.features import extract_train_val_features

    train, val, device = extract_train_val_features(
        model, train_dataset, val_dataset, (feature,), batch_size, num_workers, device, progress
    )
    num_classes = len(getattr(train_dataset, "classes", [])) or None
    results = logreg_classify(
        train.features[feature],
        train.labels,
        val.features[feature],
        val.labels,
        c_values=c_values,
        holdout_fraction=holdout_fraction,
        seed=seed,
        max_iter=max_iter,
        tol=tol,
        normalize=normalize,
        metric=metric,
        num_classes=num_classes,
        n_jobs=n_jobs,
        progress=progress,
    )
    results.update(feature=feature, skipped_train=train.num_skipped, skipped_val=val.num_skipped)
    return results
