"""Logistic regression protocol: separable data, C chosen from the list, equality with a direct sklearn fit, the
typed settings and result, scoring Features, and the model-level entry against sklearn on features by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from franca.core.errors import ConfigError
from franca.eval.linear import holdout_split
from franca.eval.logreg import (
    LogregSettings,
    c_grid,
    classification_metrics,
    evaluate_logreg,
    logreg_classify,
    score_logreg,
)
from franca.features import Features


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


def sklearn_report(x_fit, y_fit, x_test, y_test, c, max_iter=1000, tol=1e-12):
    """top-1, top-min(5, C) and mean per-class accuracy (percent) of a direct scikit-learn fit."""
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

    model = LogisticRegression(C=c, max_iter=max_iter, tol=tol).fit(x_fit, y_fit)
    probabilities = model.predict_proba(x_test)
    k = min(5, probabilities.shape[1])
    top_k = 1.0 if k == probabilities.shape[1] else top_k_accuracy_score(y_test, probabilities, k=k)
    return (
        100.0 * np.mean(model.predict(x_test) == y_test),
        100.0 * top_k,
        100.0 * balanced_accuracy_score(y_test, model.predict(x_test)),
    )


def test_score_logreg_on_features_equals_sklearn_called_directly():
    """Features' pooled tokens (``feature="avgpool"``), standardised, C chosen on val: a scikit-learn pipeline."""
    from sklearn.preprocessing import StandardScaler

    gen = torch.Generator().manual_seed(3)
    train_labels = torch.randint(0, 6, (180,), generator=gen)
    test_labels = torch.randint(0, 6, (90,), generator=gen)
    train_pooled, test_pooled = blobs(train_labels, gen, spread=2.5), blobs(test_labels, gen, spread=2.5)
    noise = torch.zeros(180, 6)  # CLS tokens that must not be read
    train = Features(targets=train_labels, cls=noise, pooled=train_pooled, num_skipped=2)
    test = Features(targets=test_labels, cls=noise[:90], pooled=test_pooled, num_skipped=0)
    c_values = (0.01, 1.0)
    settings = LogregSettings(
        c_values, "avgpool", holdout_fraction=0.0, normalize="standardize", max_iter=500
    )
    result = score_logreg(train, None, test, None, settings)
    scaler = StandardScaler().fit(train_pooled.double().numpy())
    x, t = scaler.transform(train_pooled.double().numpy()), scaler.transform(test_pooled.double().numpy())
    y, y_test = train_labels.numpy(), test_labels.numpy()
    reports = [sklearn_report(x, y, t, y_test, c, max_iter=500) for c in c_values]
    swept = [value for point in result.sweep for value in (point.top1, point.mean_per_class)]
    assert swept == pytest.approx([value for top1, _, mean in reports for value in (top1, mean)])
    best = int(np.argmax([top1 for top1, _, _ in reports]))
    assert result.best_c == c_values[best] and result.selected_on == "val" and result.num_holdout == 0
    assert (result.top1, result.top5, result.mean_per_class) == pytest.approx(reports[best])
    assert 30.0 < result.top1 < 100.0  # overlapping blobs of 6 classes: informative but not perfect
    as_dict = result.to_dict()
    assert as_dict["best_C"] == result.best_c and as_dict["sweep"][0]["C"] == 0.01
    assert list(as_dict)[-3:] == ["feature", "skipped_train", "skipped_val"]
    assert (as_dict["feature"], as_dict["skipped_train"], as_dict["skipped_val"]) == ("avgpool", 2, 0)


def test_logreg_settings_are_checked_when_built():
    for bad in (
        {"metric": "top5"},
        {"normalize": "whiten"},
        {"c_values": ()},
        {"c_values": (1.0, -2.0)},
        {"holdout_fraction": -0.1},
    ):
        with pytest.raises(ConfigError):
            LogregSettings(**bad)
    assert LogregSettings().cs == pytest.approx(list(10.0 ** np.linspace(-6, 5, 45)))


def test_evaluate_logreg_equals_sklearn_on_cls_tokens_computed_by_hand():
    from franca.models import vit_tiny

    model = vit_tiny(patch_size=8, img_size=16).eval()
    with torch.no_grad():  # layer scales 1 (not 1e-5), so that the CLS token depends on the image
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.fill_(1.0)
    gen = torch.Generator().manual_seed(8)
    train_images, val_images = (
        torch.randn(30, 3, 16, 16, generator=gen),
        torch.randn(9, 3, 16, 16, generator=gen),
    )
    train_labels, val_labels = torch.arange(30) % 3, torch.arange(9) % 3
    settings = LogregSettings((0.1,), holdout_fraction=0.2, max_iter=300)
    result = evaluate_logreg(
        model,
        torch.utils.data.TensorDataset(train_images, train_labels),
        torch.utils.data.TensorDataset(val_images, val_labels),
        settings,
        batch_size=8,
        progress=False,
    )
    with torch.no_grad():
        x = model.forward_features(train_images)["x_norm_clstoken"].double().numpy()
        t = model.forward_features(val_images)["x_norm_clstoken"].double().numpy()
    expected = sklearn_report(x, train_labels.numpy(), t, val_labels.numpy(), 0.1, max_iter=300)
    assert (result.top1, result.top5, result.mean_per_class) == pytest.approx(expected)
    assert (result.num_train, result.num_holdout, result.num_test) == (30, 6, 9)
