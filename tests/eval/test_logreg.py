"""Logistic regression protocol: separable data, C chosen from the list, equality with a direct sklearn fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from franca.core.errors import ConfigError
from franca.eval.linear import holdout_split
from franca.eval.logreg import c_grid, classification_metrics, logreg_classify


def blobs(labels, generator, dim=6, spread=0.5):
    means = 4.0 * torch.eye(int(labels.max()) + 1, dim)
    return means[labels] + spread * torch.randn(labels.numel(), dim, generator=generator)


def test_official_c_grid():
    assert np.allclose(c_grid(), 10.0 ** np.linspace(-6, 5, 45))
    assert (
        len(c_grid(12)) == 12
        and c_grid(12)[0] == pytest.approx(1e-6)
        and c_grid(12)[-1] == pytest.approx(1e5)
    )
    with pytest.raises(ConfigError):
        c_grid(0)


def test_separable_features_and_direct_sklearn_equivalence():
    gen = torch.Generator().manual_seed(0)
    train_labels = torch.arange(3).repeat(40)
    test_labels = torch.arange(3).repeat(20)
    train, test = blobs(train_labels, gen, spread=0.3), blobs(test_labels, gen, spread=0.3)
    c_values = [1e-4, 1e-2, 1.0, 100.0]
    results = logreg_classify(
        train, train_labels, test, test_labels, c_values=c_values, max_iter=500, tol=1e-10
    )
    assert results["best_C"] in c_values
    assert results["top1"] == 100.0 and results["top5"] == 100.0 and results["mean_per_class"] == 100.0
    assert [row["C"] for row in results["sweep"]] == c_values
    assert results["num_holdout"] == 12 and results["num_train"] == 120

    # the sweep: each C fitted on the 90% part and scored on the held-out 10%, first best wins
    fit_rows, held_rows = holdout_split(train_labels, 0.1, seed=0)
    x, y = train.double().numpy(), train_labels.numpy()
    held_accuracy = []
    for c in c_values:
        model = LogisticRegression(C=c, max_iter=500, tol=1e-10).fit(x[fit_rows], y[fit_rows])
        held_accuracy.append(100.0 * np.mean(model.predict(x[held_rows]) == y[held_rows]))
    assert [row["top1"] for row in results["sweep"]] == pytest.approx(held_accuracy)
    assert results["best_C"] == c_values[int(np.argmax(held_accuracy))]


def test_report_equals_direct_fit_on_full_train():
    gen = torch.Generator().manual_seed(1)
    train_labels = torch.randint(0, 4, (160,), generator=gen)
    test_labels = torch.randint(0, 4, (120,), generator=gen)
    train, test = blobs(train_labels, gen, spread=1.5), blobs(test_labels, gen, spread=1.5)
    results = logreg_classify(
        train, train_labels, test, test_labels, c_values=[1e-3, 0.1, 10.0], max_iter=300
    )
    direct = LogisticRegression(C=results["best_C"], max_iter=300, tol=1e-12)
    direct.fit(train.double().numpy(), train_labels.numpy())
    accuracy = 100.0 * np.mean(direct.predict(test.double().numpy()) == test_labels.numpy())
    assert results["top1"] == pytest.approx(accuracy)
    assert 50.0 < results["top1"] < 100.0  # overlapping blobs: informative but not perfect
    assert results["top5"] == 100.0  # 4 classes: top-5 is top-4


def test_l2_normalisation_and_choice_on_val():
    gen = torch.Generator().manual_seed(2)
    labels = torch.arange(3).repeat(20)
    train, test = blobs(labels, gen, spread=1.0), blobs(labels, gen, spread=1.0)
    results = logreg_classify(
        train, labels, test, labels, c_values=[0.5], holdout_fraction=0.0, normalize="l2"
    )
    assert results["selected_on"] == "val" and results["num_holdout"] == 0
    x = train.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    t = test.double().numpy()
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    direct = LogisticRegression(C=0.5, max_iter=1000, tol=1e-12).fit(x, labels.numpy())
    assert results["top1"] == pytest.approx(100.0 * np.mean(direct.predict(t) == labels.numpy()))


def test_classification_metrics_by_hand():
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.5, 0.3]])
    labels = np.array([0, 1, 1, 1])
    metrics = classification_metrics(scores, labels)
    assert metrics["top1"] == pytest.approx(50.0)  # rows 0 and 3
    assert metrics["top5"] == pytest.approx(100.0)
    assert metrics["mean_per_class"] == pytest.approx((100.0 + 100.0 / 3) / 2)
