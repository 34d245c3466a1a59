"""EMA centre and TeacherTargets checked against their formulas and an exp-domain Sinkhorn-Knopp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from franca.core.errors import ConfigError
from franca.ssl import EmaCenter, TeacherTargets


def official_sinkhorn(logits: torch.Tensor, temperature: float, n_iterations: int) -> torch.Tensor:
    q = torch.exp(logits.double() / temperature).t()
    num_prototypes, num_samples = q.shape
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / num_prototypes
        q = q / q.sum(dim=0, keepdim=True) / num_samples
    return (q * num_samples).t()


def softmax_np(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def test_ema_center_update_by_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    momentum, counts = 0.9, [4, 2]
    center = EmaCenter(counts, momentum=momentum)
    batches = [[torch.randn(6, k, generator=generator) for k in counts] for _ in range(3)]
    expected = [np.zeros((1, k)) for k in counts]
    for batch in batches:
        center.update(batch)
        for level, logits in enumerate(batch):
            expected[level] = momentum * expected[level] + (1 - momentum) * logits.double().numpy().mean(
                0, keepdims=True
            )
    for got, want in zip(center.centers(), expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert set(center.state_dict()) == {"center_0", "center_1"}


def test_ema_center_probabilities() -> None:
    generator = torch.Generator().manual_seed(1)
    center = EmaCenter([5], momentum=0.5)
    center.center_0.copy_(torch.randn(1, 5, generator=generator))
    logits = torch.randn(3, 5, generator=generator)
    got = center([logits], temperature=0.07)[0]
    want = softmax_np((logits.numpy() - center.center_0.numpy()) / 0.07)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        center([torch.randn(3, 4)], temperature=0.07)


def test_teacher_targets_sinkhorn_per_level() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = [torch.randn(8, k, generator=generator) for k in (6, 3)]
    targets = TeacherTargets("sinkhorn", sinkhorn_iterations=3)(logits, temperature=0.07)
    assert len(targets) == 2
    for got, level_logits in zip(targets, logits):
        torch.testing.assert_close(
            got.double(), official_sinkhorn(level_logits, 0.07, 3), rtol=1e-4, atol=1e-6
        )
    assert len(TeacherTargets()(logits[0], temperature=0.07)) == 1  # a single tensor is one level


def test_teacher_targets_centering_uses_then_updates_the_centre() -> None:
    generator = torch.Generator().manual_seed(3)
    counts = [4, 2]
    targets = TeacherTargets("centering", prototype_counts=counts, momentum=0.8)
    first = [torch.randn(5, k, generator=generator) for k in counts]
    second = [torch.randn(5, k, generator=generator) for k in counts]

    probs_first = targets(first, temperature=0.1)
    for got, logits in zip(probs_first, first):  # centre still zero
        np.testing.assert_allclose(got.numpy(), softmax_np(logits.numpy() / 0.1), rtol=1e-5, atol=1e-6)
    centre_after_first = [0.2 * logits.numpy().mean(0, keepdims=True) for logits in first]

    probs_second = targets(second, temperature=0.1, update_center=False)
    for got, logits, centre in zip(probs_second, second, centre_after_first):
        np.testing.assert_allclose(
            got.numpy(), softmax_np((logits.numpy() - centre) / 0.1), rtol=1e-5, atol=1e-5
        )
    for got, want in zip(targets.center.centers(), centre_after_first):  # not updated by the second call
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_teacher_targets_configuration_errors() -> None:
    with pytest.raises(ConfigError):
        TeacherTargets("softmax")
    with pytest.raises(ConfigError):
        TeacherTargets("centering")
    with pytest.raises(ConfigError):
        TeacherTargets(sinkhorn_iterations=0)
    with pytest.raises(ConfigError):
        EmaCenter([4], momentum=1.5)
