"""DINO, iBOT and KoLeo losses checked by hand (plain loops), by the official formula and by scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from franca.ssl import DinoLoss, IBotPatchLoss, koleo_loss

STUDENT_TEMPERATURE = 0.1


def cross_entropy_by_hand(student_logits: list[float], teacher_probs: list[float]) -> float:
    """-sum_k t_k log softmax(s / 0.1)_k with Python floats."""
    scaled = [value / STUDENT_TEMPERATURE for value in student_logits]
    top = max(scaled)
    log_norm = top + math.log(sum(math.exp(value - top) for value in scaled))
    return -sum(t * (s - log_norm) for s, t in zip(scaled, teacher_probs))


def batch_mean_ce(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean over the batch rows of the hand cross-entropy; student, teacher [B, K]."""
    rows = [cross_entropy_by_hand(s.tolist(), t.tolist()) for s, t in zip(student, teacher)]
    return sum(rows) / len(rows)


def random_probs(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape, generator=generator) * 2, dim=-1)


def test_dino_loss_by_hand_per_level_and_weighted() -> None:
    generator = torch.Generator().manual_seed(0)
    batch, n_local, prototype_counts = 3, 2, [5, 3]
    student_global = [torch.randn(2, batch, k, generator=generator) for k in prototype_counts]
    student_local = [torch.randn(n_local, batch, k, generator=generator) for k in prototype_counts]
    teacher = [random_probs((2, batch, k), generator) for k in prototype_counts]

    expected = []
    for level in range(len(prototype_counts)):
        total = 0.0
        for view in range(2):  # student global view v against teacher view 1 - v
            total += batch_mean_ce(student_global[level][view], teacher[level][1 - view])
        for crop in range(n_local):  # every local crop against both teacher views
            for view in range(2):
                total += batch_mean_ce(student_local[level][crop], teacher[level][view])
        expected.append(total / (2 * 1 + n_local * 2))

    result = DinoLoss(STUDENT_TEMPERATURE)(student_global, student_local, teacher)
    assert len(result.per_level) == 2
    for got, want in zip(result.per_level, expected):
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(want, rel=1e-5)
    assert result.total.item() == pytest.approx(sum(expected), rel=1e-5)

    weighted = DinoLoss(STUDENT_TEMPERATURE, level_weights=[1.0, 0.25])(
        student_global, student_local, teacher
    )
    assert weighted.total.item() == pytest.approx(expected[0] + 0.25 * expected[1], rel=1e-5)
    with pytest.raises(ValueError):
        DinoLoss(level_weights=[1.0])(student_global, student_local, teacher)


def test_dino_loss_matches_official_normalisation() -> None:
    # Official form: global term = mean over the 2B concatenated (swapped) pairs * loss_scales(2) / terms,
    # local term = sum over (local chunk, teacher chunk) of batch means / terms, terms = 2 * 1 + n_local * 2.
    generator = torch.Generator().manual_seed(1)
    batch, n_local, k = 4, 8, 6
    student_global = torch.randn(2, batch, k, generator=generator)
    student_local = torch.randn(n_local, batch, k, generator=generator)
    teacher = random_probs((2, batch, k), generator)
    terms = 2 * 1 + n_local * 2
    swapped = torch.cat([teacher[1], teacher[0]])
    log_probs_global = torch.log_softmax(student_global.reshape(2 * batch, k) / 0.1, dim=-1)
    global_term = -(swapped * log_probs_global).sum(-1).mean() * 2 / terms
    local_term = 0.0
    for crop in range(n_local):
        log_probs_local = torch.log_softmax(student_local[crop] / 0.1, dim=-1)
        for view in range(2):
            local_term = local_term - (teacher[view] * log_probs_local).sum(-1).mean()
    expected = global_term + local_term / terms
    got = DinoLoss()(student_global, student_local, teacher).total  # single tensors = one level
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_dino_loss_without_local_crops() -> None:
    generator = torch.Generator().manual_seed(2)
    student_global = torch.randn(2, 2, 4, generator=generator)
    teacher = random_probs((2, 2, 4), generator)
    expected = (
        batch_mean_ce(student_global[0], teacher[1]) + batch_mean_ce(student_global[1], teacher[0])
    ) / 2
    assert DinoLoss()([student_global], None, [teacher]).total.item() == pytest.approx(expected, rel=1e-5)
    empty_local = torch.zeros(0, 2, 4)
    assert DinoLoss()([student_global], [empty_local], [teacher]).total.item() == pytest.approx(
        expected, rel=1e-5
    )


def test_dino_loss_gradient_and_low_precision_inputs() -> None:
    generator = torch.Generator().manual_seed(3)
    student_global = torch.randn(2, 3, 5, generator=generator, requires_grad=True)
    student_local = torch.randn(2, 3, 5, generator=generator, requires_grad=True)
    teacher = random_probs((2, 3, 5), generator)
    DinoLoss()(student_global, student_local, teacher).total.backward()
    assert torch.isfinite(student_global.grad).all() and student_global.grad.abs().sum() > 0
    assert student_local.grad.abs().sum() > 0
    reference = DinoLoss()(student_global.detach(), student_local.detach(), teacher).total
    low = DinoLoss()(
        student_global.detach().bfloat16(), student_local.detach().bfloat16(), teacher.bfloat16()
    ).total
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(reference.item(), rel=3e-2)


def test_ibot_loss_by_hand() -> None:
    generator = torch.Generator().manual_seed(4)
    # 4 global crops; crop 0 has 3 masked patches, crop 2 has 1 -> weights 1/3, 1/3, 1/3, 1
    weights = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])
    n_global_crops = 4
    prototype_counts = [6, 3]
    student = [torch.randn(4, k, generator=generator) for k in prototype_counts]
    teacher = [random_probs((4, k), generator) for k in prototype_counts]
    expected = []
    for level in range(2):
        total = 0.0
        for patch in range(4):
            total += weights[patch].item() * cross_entropy_by_hand(
                student[level][patch].tolist(), teacher[level][patch].tolist()
            )
        expected.append(total / n_global_crops)
    result = IBotPatchLoss(level_weights=[2.0, 1.0])(student, teacher, weights, n_global_crops)
    for got, want in zip(result.per_level, expected):
        assert got.item() == pytest.approx(want, rel=1e-5)
    assert result.total.item() == pytest.approx(2.0 * expected[0] + expected[1], rel=1e-5)


def test_ibot_loss_without_masked_patches_is_zero() -> None:
    result = IBotPatchLoss()([torch.zeros(0, 5)], [torch.zeros(0, 5)], torch.zeros(0), n_global_crops=8)
    assert result.total.item() == 0.0


def koleo_brute_force(features: np.ndarray, eps: float = 1e-8) -> float:
    """Nearest neighbour by Euclidean distance between unit vectors (equivalent to the largest inner product)."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    distances = cdist(unit, unit)
    np.fill_diagonal(distances, np.inf)
    return float(-np.mean(np.log(distances.min(axis=1) + eps)))


def test_koleo_matches_brute_force() -> None:
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(17, 8, generator=generator) * 3
    got = koleo_loss(features)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(koleo_brute_force(features.double().numpy()), rel=1e-5)
    # the features are L2-normalised first, so a per-sample scale does not matter
    scales = torch.rand(17, 1, generator=generator) + 0.5
    assert koleo_loss(features * scales).item() == pytest.approx(got.item(), rel=1e-5)


def test_koleo_duplicates_and_tiny_batches() -> None:
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(5, 4, generator=generator)
    features[3] = features[1] * 2.0  # same direction: distance 0 after normalisation
    features.requires_grad_(True)
    loss = koleo_loss(features)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(koleo_brute_force(features.detach().double().numpy()), rel=1e-4)
    loss.backward()
    assert torch.isfinite(features.grad).all()

    single = torch.randn(1, 4, requires_grad=True)
    value = koleo_loss(single)
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(single.grad, torch.zeros_like(single))
    assert koleo_loss(torch.zeros(0, 4)).item() == 0.0

    pair = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert koleo_loss(pair).item() == pytest.approx(-math.log(math.sqrt(2) + 1e-8), rel=1e-6)
