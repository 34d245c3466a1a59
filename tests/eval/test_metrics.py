"""The shared metrics: confusion matrix and mIoU (hand example), per-class percentages, the spread over seeds
(statistics.pstdev) and the two PCA solvers (NumPy SVD, scikit-learn)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from franca.core.errors import ConfigError
from franca.eval.metrics import (
    confusion_matrix,
    mean_and_std,
    miou_from_confusion,
    pca_fit,
    pca_project,
    pca_scores,
    per_class_percent,
    pixel_accuracy,
)


def test_confusion_matrix_and_miou_hand_example() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = confusion_matrix(pred, target, num_classes=4)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0], expected[0, 1] = 1, 1  # class 0: one right, one predicted as 1
    expected[1, 1] = 3  # class 1: three right (the ignored pixel is not counted)
    expected[2, 2], expected[2, 0] = 1, 1  # class 2: one right, one predicted as 0
    assert torch.equal(conf, expected)
    miou, iou = miou_from_confusion(conf)
    # IoU0 = 1 / (2 + 2 - 1) = 1/3; IoU1 = 3 / (3 + 4 - 3) = 3/4; IoU2 = 1 / (2 + 1 - 1) = 1/2; class 3 absent.
    assert iou[:3].tolist() == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert math.isnan(float(iou[3]))
    assert miou == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert pixel_accuracy(conf) == pytest.approx(5 / 7)
    assert per_class_percent(iou, ["a", "b", "c", "d"]) == pytest.approx(
        {"a": 100 / 3, "b": 75.0, "c": 50.0, "d": None}
    )


def test_confusion_matrix_rejects_out_of_range_labels_and_counts_nothing_for_all_ignored() -> None:
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), num_classes=3)
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), num_classes=3)
    empty = confusion_matrix(torch.tensor([0, 1]), torch.tensor([255, 255]), num_classes=2)
    assert (
        empty.sum() == 0 and math.isnan(miou_from_confusion(empty)[0]) and math.isnan(pixel_accuracy(empty))
    )


@pytest.mark.parametrize("values", [[41.5], [10.0, 12.0], [3.25, 7.5, 1.0, 9.75, 4.0]])
def test_mean_and_std_is_the_population_spread(values: list[float]) -> None:
    mean, std = mean_and_std(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert std == pytest.approx(statistics.pstdev(values))
    with pytest.raises(ValueError):
        mean_and_std([])


def test_pca_fit_matches_numpy_svd_and_projects() -> None:
    generator = torch.Generator().manual_seed(1)
    data = torch.randn(400, 6, generator=generator) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.25]) + 7.0
    mean, components, variance = pca_fit(data, chunk_size=64)
    array = data.double().numpy()
    centred = array - array.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(mean.numpy(), array.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(variance.numpy(), singular**2 / (array.shape[0] - 1), rtol=1e-4)
    signs = np.sign(vt[np.arange(6), np.abs(vt).argmax(axis=1)])  # the largest coordinate made positive
    np.testing.assert_allclose(components.double().numpy(), vt * signs[:, None], atol=1e-4)
    projected = pca_project(data, mean, components, 2)
    np.testing.assert_allclose(projected.double().numpy(), centred @ (vt[:2] * signs[:2, None]).T, atol=1e-3)
    with pytest.raises(ConfigError, match="at least 2"):
        pca_fit(data[:1])


def test_pca_scores_are_sklearns_and_the_svd_up_to_sign() -> None:
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    data = rng.normal(size=(80, 7)) * np.array([4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.1])
    scores = pca_scores(data, 3)
    np.testing.assert_array_equal(scores, PCA(n_components=3, svd_solver="full").fit_transform(data))
    centred = data - data.mean(axis=0)
    u, singular, _ = np.linalg.svd(centred, full_matrices=False)
    reference = u[:, :3] * singular[:3]
    np.testing.assert_allclose(np.abs(scores), np.abs(reference), atol=1e-8)
    assert pca_scores(data.astype(np.float32), 3).dtype == np.float32
    assert pca_scores(data, 50).shape == (80, 7)  # clipped to the feature width
    assert pca_scores(data[:1], 3).tolist() == [[0.0]]  # one row: no direction, coordinate 0


# ------------------------------------------------------------------------------------------ spreads over trainings
def test_seed_spread_is_the_sample_standard_deviation():
    from franca.eval.metrics import seed_spread

    spread = seed_spread([1.0, 2.0, 6.0])  # mean 3, squared deviations 4 + 1 + 9 = 14, / (n - 1) = 7
    assert spread.mean == pytest.approx(3.0)
    assert spread.std == pytest.approx(7.0**0.5)
    assert spread.n == 3
    assert seed_spread([4.5]).std == 0.0
    with pytest.raises(ValueError):
        seed_spread([])


def test_paired_difference_interval_agrees_with_scipy_paired_t_test():
    from scipy import stats

    from franca.eval.metrics import paired_difference

    a, b = [70.1, 68.4, 72.9, 69.5], [66.0, 67.9, 70.2, 65.1]
    result = paired_difference(a, b, confidence=0.95)
    differences = [x - y for x, y in zip(a, b)]
    assert result.differences == pytest.approx(differences)
    assert result.mean == pytest.approx(sum(differences) / 4)
    # the interval excludes 0 exactly when the two-sided paired t-test rejects at 5 %; its bounds are scipy's
    test = stats.ttest_rel(a, b)
    interval = test.confidence_interval(0.95)
    assert (result.ci_low, result.ci_high) == pytest.approx((interval.low, interval.high))
    assert result.separated == (test.pvalue < 0.05)
    assert result.separated


def test_paired_difference_of_noise_does_not_separate_and_one_pair_never_does():
    from franca.eval.metrics import paired_difference

    noise = paired_difference([1.0, 3.0, 2.0], [2.0, 2.0, 2.0])  # differences -1, 1, 0: mean 0, std 1
    assert noise.mean == pytest.approx(0.0)
    assert noise.std == pytest.approx(1.0)
    assert not noise.separated and not noise.exceeds_spread
    # by hand: t_{0.975, 2} = 4.302653, half width = 4.302653 * 1 / sqrt(3)
    assert noise.ci_high == pytest.approx(4.302653 / 3**0.5, rel=1e-5)
    single = paired_difference([5.0], [1.0])
    assert single.mean == 4.0 and single.ci_low is None and not single.separated and not single.exceeds_spread
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])
