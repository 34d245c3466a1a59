"""Tests of the log-domain Sinkhorn-Knopp against a direct transcription of the official algorithm."""

from __future__ import annotations

import pytest
import torch

from franca.ssl import sinkhorn_knopp


def official_sinkhorn(
    logits: torch.Tensor, temperature: float, n_iterations: int, ibot_variant: bool = False
):
    """Direct (exp-domain, single-process) transcription of the official algorithm, method doc section 2.5."""
    q = torch.exp(logits.double() / temperature).t()  # [K, N]
    num_prototypes, num_samples = q.shape
    if ibot_variant:
        q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / num_prototypes
        q = q / q.sum(dim=0, keepdim=True)
        q = q / num_samples
    q = q * num_samples
    return q.t()


@pytest.mark.parametrize("n_iterations", [1, 3, 7])
@pytest.mark.parametrize("temperature", [0.04, 0.07, 1.0])
def test_matches_official_algorithm_on_small_logits(n_iterations: int, temperature: float) -> None:
    generator = torch.Generator().manual_seed(n_iterations)
    logits = torch.randn(12, 9, generator=generator) * 0.5
    expected = official_sinkhorn(logits, temperature, n_iterations)
    got = sinkhorn_knopp(logits, temperature, n_iterations)
    assert got.dtype == torch.float32 and got.shape == (12, 9)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_matches_official_algorithm_at_a_sharp_temperature() -> None:
    # At tau = 0.01 most entries of exp(log Q) underflow fp32 (the regime of the tiny CPU preset, where the fast
    # exponential clamps them); the float64 transcription is still finite here (|logits / tau| < 700).
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(64, 512, generator=generator)
    expected = official_sinkhorn(logits, 0.01, 3)
    assert torch.isfinite(expected).all() and (expected < 1e-38).float().mean() > 0.5
    got = sinkhorn_knopp(logits, 0.01, 3)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    assert got.sum(dim=1).sub(1).abs().max() < 1e-5


def test_dino_and_ibot_variants_agree() -> None:
    logits = torch.randn(10, 7, generator=torch.Generator().manual_seed(3))
    dino = official_sinkhorn(logits, 0.1, 3, ibot_variant=False)
    ibot = official_sinkhorn(logits, 0.1, 3, ibot_variant=True)
    torch.testing.assert_close(dino, ibot)
    got = sinkhorn_knopp(logits, 0.1, 3, n_samples=torch.tensor(10)).double()
    torch.testing.assert_close(got, ibot, rtol=1e-4, atol=1e-6)  # fp32 against float64, as the tests above


def test_n_samples_does_not_change_the_result() -> None:
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(4))
    reference = sinkhorn_knopp(logits, 0.2)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.2, n_samples=6), reference)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.2, n_samples=torch.tensor(600)), reference)


def test_marginals() -> None:
    generator = torch.Generator().manual_seed(5)
    num_samples, num_prototypes = 64, 16
    logits = torch.randn(num_samples, num_prototypes, generator=generator) * 2
    few = sinkhorn_knopp(logits, 0.5, n_iterations=3)
    torch.testing.assert_close(few.sum(dim=1), torch.ones(num_samples))
    assert (few >= 0).all()
    converged = sinkhorn_knopp(logits, 0.5, n_iterations=300)
    torch.testing.assert_close(converged.sum(dim=1), torch.ones(num_samples))
    prototype_mass = converged.sum(dim=0)
    torch.testing.assert_close(
        prototype_mass, torch.full((num_prototypes,), num_samples / num_prototypes), rtol=1e-3, atol=1e-3
    )
    # with only 3 iterations the prototype marginal is visibly further from uniform than when converged
    assert (few.sum(dim=0) - num_samples / num_prototypes).abs().max() > (
        prototype_mass - num_samples / num_prototypes
    ).abs().max()


def test_large_logits_stay_finite() -> None:
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(32, 20, generator=generator) * 1e4
    # the direct algorithm overflows on these logits (which is why the log domain is used)
    assert not torch.isfinite(official_sinkhorn(logits.float(), 0.04, 3)).all()
    got = sinkhorn_knopp(logits, 0.04, 3)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(dim=1), torch.ones(32))
    # bf16 inputs (as under CUDA autocast) are promoted to fp32
    got_bf16 = sinkhorn_knopp(logits.bfloat16(), 0.04, 3)
    assert got_bf16.dtype == torch.float32 and torch.isfinite(got_bf16).all()


def test_large_per_prototype_offsets_are_removed_exactly() -> None:
    # A per-prototype constant is removed by the first prototype step, so offsets of 1e4 must not change the
    # targets; the direct algorithm can only be evaluated on the unshifted logits.
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(16, 8, generator=generator)
    offsets = (torch.rand(1, 8, generator=generator) * 2 - 1) * 1e4
    expected = official_sinkhorn(logits, 1.0, 3)
    got = sinkhorn_knopp(logits + offsets, 1.0, 3)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=5e-3)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(3), 0.1)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(3, 2), 0.1, n_iterations=0)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(3, 2), 0.0)
