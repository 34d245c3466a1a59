"""soft_cross_entropy against the plain formula (values, gradients, dtypes), gradcheck, and what it saves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from franca.ssl.cross_entropy import soft_cross_entropy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compilers import needs_cpp_compiler  # noqa: E402  (tests/compilers.py, beside the test folders)


def _plain(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """The plain form: -sum_k t log softmax(s / tau), in float64."""
    return -(targets.double() * F.log_softmax(logits.double() / temperature, dim=-1)).sum(dim=-1)


def _inputs(rows: int, width: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, width, generator=generator)).to(dtype)
    targets = torch.rand(rows, width, generator=generator).pow(4)  # peaked, not normalised: rows sum to ~K/5
    return logits, targets


@pytest.mark.parametrize("chunk_elements", [7, 40, 1 << 26])  # one row per chunk, uneven chunks, one chunk
def test_values_and_gradients_equal_the_plain_form(chunk_elements: int) -> None:
    logits, targets = _inputs(9, 13)
    weights = torch.linspace(0.5, 2.0, 9)  # a non-uniform upstream gradient
    leaf = logits.clone().requires_grad_(True)
    (soft_cross_entropy(leaf, targets, 0.1, chunk_elements) * weights).sum().backward()
    reference = logits.double().requires_grad_(True)
    (_plain(reference, targets, 0.1) * weights.double()).sum().backward()
    assert torch.allclose(
        soft_cross_entropy(logits, targets, 0.1, chunk_elements).double(),
        _plain(logits, targets, 0.1),
        rtol=1e-5,
    )
    assert leaf.grad.dtype == torch.float32
    assert torch.allclose(leaf.grad.double(), reference.grad, rtol=1e-4, atol=1e-6)


def test_as_accurate_as_the_plain_form_over_wide_rows() -> None:
    """Against float64, over 65,536 prototypes: no worse than the plain fp32 form (which sums with torch's cascade;
    a plain dot product of the rows is ~100x less accurate here)."""
    logits, targets = _inputs(16, 1 << 16, seed=6, dtype=torch.bfloat16)
    targets = torch.softmax(targets * 20, dim=-1)
    exact = _plain(logits, targets, 0.1)
    plain_error = (
        (-(targets * F.log_softmax(logits.float() / 0.1, dim=-1)).sum(dim=-1).double() - exact).abs().max()
    )
    error = (soft_cross_entropy(logits, targets, 0.1, chunk_elements=1 << 18).double() - exact).abs().max()
    assert error <= 2 * plain_error + 1e-12


def test_inputs_are_left_as_they_were() -> None:
    logits, targets = _inputs(4, 10, seed=5)
    leaf = logits.clone().requires_grad_(True)
    soft_cross_entropy(leaf, targets, 0.1, chunk_elements=20).sum().backward()
    assert torch.equal(leaf.detach(), logits)


def test_gradient_by_hand_for_one_row() -> None:
    # s = (0, ln 3), tau = 1: softmax = (1/4, 3/4); t = (1, 1): dCE/ds = softmax * 2 - t = (-1/2, 1/2)
    logits = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item()]], requires_grad=True)
    loss = soft_cross_entropy(logits, torch.ones(1, 2), 1.0)
    assert loss.item() == pytest.approx(
        -(torch.log(torch.tensor(0.25)) + torch.log(torch.tensor(0.75))).item()
    )
    loss.sum().backward()
    assert logits.grad[0].tolist() == pytest.approx([-0.5, 0.5], abs=1e-6)


def test_gradcheck_in_float64() -> None:
    logits, targets = _inputs(4, 6, seed=1, dtype=torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: soft_cross_entropy(s, targets.double(), 0.3, chunk_elements=12), (logits,)
    )


def test_bf16_logits_give_fp32_losses_and_bf16_gradients() -> None:
    logits, targets = _inputs(5, 64, seed=2, dtype=torch.bfloat16)
    leaf = logits.clone().requires_grad_(True)
    loss = soft_cross_entropy(leaf, targets, 0.1, chunk_elements=100)
    assert loss.dtype == torch.float32
    assert torch.allclose(
        loss.double(), _plain(logits, targets, 0.1), rtol=1e-5
    )  # the bf16 values, exactly upcast
    loss.sum().backward()
    reference = logits.double().requires_grad_(True)
    _plain(reference, targets, 0.1).sum().backward()
    assert leaf.grad.dtype == torch.bfloat16
    assert torch.allclose(leaf.grad.double(), reference.grad, rtol=1e-2, atol=1e-2)


def test_under_autocast_the_maths_stays_fp32() -> None:
    logits, targets = _inputs(3, 32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = soft_cross_entropy(logits, targets, 0.07)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss.double(), _plain(logits, targets, 0.07), rtol=1e-5)


def test_saves_only_the_logits_as_they_came_and_the_targets() -> None:
    """What autograd keeps for the backward: the bf16 logits and the targets (the plain form keeps fp32
    log-probabilities [R, K] besides the targets)."""
    rows, width = 6, 50
    logits, targets = _inputs(rows, width, seed=4, dtype=torch.bfloat16)
    leaf = logits.clone().requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        soft_cross_entropy(leaf, targets, 0.1)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes == rows * width * 2 + rows * width * 4


def test_empty_rows_and_bad_inputs() -> None:
    logits = torch.zeros(0, 8, requires_grad=True)
    loss = soft_cross_entropy(logits, torch.zeros(0, 8), 0.1)
    assert loss.shape == (0,)
    loss.sum().backward()
    assert logits.grad.shape == (0, 8)
    with pytest.raises(ValueError, match=r"\[R, K\]"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4), 0.1)
    with pytest.raises(ValueError, match="detached"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3, requires_grad=True), 0.1)
    with pytest.raises(ValueError, match="positive"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


@needs_cpp_compiler
def test_compiled_kernels_equal_the_eager_ones() -> None:
    """``compiled=True`` (inductor): the losses and gradients of the eager kernels, over several chunks and two
    widths (one dynamic graph serves both)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for width in (96, 40):
        logits, targets = _inputs(7, width, seed=7, dtype=torch.bfloat16)
        results = []
        for compiled in (True, False):
            leaf = logits.clone().requires_grad_(True)
            loss = soft_cross_entropy(leaf, targets, 0.1, chunk_elements=3 * width, compiled=compiled)
            (loss * torch.arange(1.0, 8.0)).sum().backward()
            results.append((loss, leaf.grad))
        (loss, grad), (eager_loss, eager_grad) = results
        assert torch.allclose(loss, eager_loss, rtol=1e-5)
        assert grad.dtype == torch.bfloat16 and torch.allclose(
            grad.float(), eager_grad.float(), rtol=1e-2, atol=1e-3
        )
