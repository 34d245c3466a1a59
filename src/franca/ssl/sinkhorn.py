"""Sinkhorn-Knopp teacher targets, computed in the log domain (method doc section 2.5).

The official algorithm builds ``Q = exp(logits / tau).T`` with shape [K, N] and alternates, for a fixed number of
iterations, a prototype step (divide each prototype row by its sum over *all* samples of *all* ranks, then by K)
and a sample step (divide each sample column by its sum, then by N); it finally multiplies by N and transposes, so
every sample's target sums to 1. It exponentiates the raw logits without subtracting a maximum, which overflows
once ``logits / tau`` exceeds ~88 in fp32 (easy with the unnormalised Matryoshka bottleneck).

This module computes the same result without overflow and with few passes over the [N, K] matrix (for the paper's
iBOT head, N ~ 6000 masked patches and K ~ 254K prototypes over the levels: ~6 GB in fp32, so the number of passes is
the cost of the step on a GPU):

1. The first iteration runs in the log domain. The prototype step is a per-column log-sum-exp over the samples of all
   ranks (shifted by the column maximum, so nothing overflows); the sample step is a per-row log-sum-exp, again
   shifted by the row maximum. After it, ``E = exp(log Q - row max)`` has a largest entry of 1 in every row and a
   column sum of at least 1/K in every column, so no row or column of ``E`` is lost to underflow (entries that do
   underflow are below e^-87 of their row's largest).
2. The remaining iterations only rescale rows and columns, so they keep ``E`` and two scaling vectors ``a`` (rows)
   and ``b`` (columns): ``Q = diag(a) E diag(b)``. A prototype step is one matrix-vector product (``b = 1 / (K E^T
   a)``, summed over ranks), a sample step another (``a = 1 / (N E b)``): one read of ``E`` each instead of the
   several passes of a log-sum-exp.
3. The targets ``N a_i E_ik b_k`` are written once, into ``E``'s storage.

The result equals the official one wherever the official one is finite (tests compare it with a float64 transcription),
and stays finite for any finite logits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from franca.core import distributed

__all__ = ["distributed_logsumexp_over_samples", "sinkhorn_knopp"]

# exp(x) for x below this is taken as exp(_EXP_FLOOR) ~ 1.6e-38, the smallest order of magnitude of normal fp32
# numbers. x86 CPUs compute exp ~50x slower for arguments whose result is denormal or zero (a scalar fallback of the
# vectorised kernel), and with a teacher temperature of 0.01 most of the [N, K] entries are such arguments. Every
# exponential here is summed with, or normalised by, a term of at least 1 (the shifted maximum), so a change below
# 1.7e-38 per term is far below fp32 resolution; targets that were ~0 stay ~0.
_EXP_FLOOR = -87.0


def _exp_(values: Tensor) -> Tensor:
    """``exp`` in place, arguments clamped at ``_EXP_FLOOR`` on the CPU only (see above; on a GPU the clamp would
    be one more pass over the matrix and buys nothing)."""
    if values.device.type == "cpu":
        values.clamp_min_(_EXP_FLOOR)
    return values.exp_()


def _global_max_over_samples(values: Tensor) -> Tensor:
    """Maximum over dim 0 and over all ranks of ``values`` [n, K] -> [K]; -inf where no rank has a finite value.

    A rank may hold zero samples (for instance no masked patch); it still takes part in the collective.
    """
    if values.shape[0] > 0:
        local_max = values.amax(dim=0)
    else:
        local_max = values.new_full(values.shape[1:], -math.inf)
    # A MAX all-reduce expressed with the shared all-gather helper: [world_size, K] -> [K].
    return distributed.all_gather_cat(local_max.unsqueeze(0)).amax(dim=0)


def distributed_logsumexp_over_samples(values: Tensor) -> Tensor:
    """``log(sum_i exp(values[i, k]))`` over the samples of every rank, for each column k: [n, K] -> [1, K].

    Computed as ``M_k + log(sum_i exp(values[i, k] - M_k))`` with ``M_k`` the maximum over all ranks, so that the
    only reduction over ranks is a sum of numbers in (0, n], which cannot overflow. Without a process group this
    is ``torch.logsumexp(values, dim=0, keepdim=True)``.
    """
    shift = _global_max_over_samples(values)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    shifted_sums = _exp_(values - shift).sum(dim=0)
    distributed.all_reduce_sum(shifted_sums)
    return (shift + torch.log(shifted_sums)).unsqueeze(0)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    temperature: float,
    n_iterations: int = 3,
    n_samples: int | Tensor | None = None,
) -> Tensor:
    """Per-sample Sinkhorn-Knopp assignments of ``teacher_logits`` [N_local, K] -> probabilities [N_local, K].

    Equal to the official algorithm (section 2.5) with ``n_iterations`` alternations of a prototype step (sums
    over the samples of every rank, all-reduced) and a sample step, but evaluated in fp32 (autocast disabled) as the
    module docstring describes, so logits of any finite magnitude give finite targets. Each returned row sums to 1; with enough
    iterations every prototype receives about ``N / K`` of the total mass, N being the number of samples over all
    ranks.

    Both official call sites are covered by this one function:

    - DINO (CLS): the 2B teacher CLS logits of the two global views of one rank; N = 2B * world_size.
    - iBOT (patches): the teacher logits of the masked patches of one rank (the count may differ per rank, and may
      be zero); N = the all-reduced number of masked patches. The official iBOT variant first divides Q by its
      all-reduced total; that constant factor is removed exactly by the first prototype step, so it is not
      repeated here.

    Args:
        teacher_logits: teacher head outputs of this rank, [N_local, K]; any dtype, promoted to fp32.
        temperature: teacher temperature tau (the logits are divided by it).
        n_iterations: number of prototype/sample alternations (the method uses 3); at least 1.
        n_samples: N, the number of samples over all ranks, as an int or a 0-d tensor (the official iBOT code passes
            an all-reduced tensor). The official algorithm divides by N in the sample step and multiplies by N at
            the end, so N only scales intermediate values and cannot change the result; it is used as such here.
            ``None`` computes it with one all-reduce of the local row count.

    Every rank must call this function (it runs collectives), even with zero local rows.
    """
    if teacher_logits.dim() != 2:
        raise ValueError(
            f"sinkhorn_knopp expects teacher logits of shape [N, K], got {tuple(teacher_logits.shape)}"
        )
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs n_iterations >= 1, got {n_iterations}")
    if temperature <= 0:
        raise ValueError(f"sinkhorn_knopp needs a positive temperature, got {temperature}")

    with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        logits = teacher_logits.float() / temperature
        if n_samples is None:
            total = torch.tensor(float(logits.shape[0]), device=logits.device)
            distributed.all_reduce_sum(total)
        else:
            total = torch.as_tensor(n_samples, dtype=torch.float32, device=logits.device).reshape(())
        num_prototypes = logits.shape[1]
        # iteration 1 in the log domain; then E (rows with a largest entry of 1) and row scaling a = 1 / (N sum_k E)
        scaled = _first_iteration(logits, num_prototypes)
        del logits
        row_scale = 1.0 / (total * scaled.sum(dim=1))
        column_scale = None
        for _ in range(n_iterations - 1):
            column_sums = torch.mv(scaled.t(), row_scale)  # zeros on a rank without samples
            distributed.all_reduce_sum(column_sums)
            column_scale = 1.0 / (num_prototypes * column_sums)
            row_scale = 1.0 / (total * torch.mv(scaled, column_scale))
        # targets N a_i E_ik b_k, written over E
        if column_scale is not None:
            scaled.mul_(column_scale)
        return scaled.mul_((total * row_scale).unsqueeze(1))


def _first_iteration(logits: Tensor, num_prototypes: int) -> Tensor:
    """One prototype step and one sample step on ``log Q = logits`` [n, K] (fp32), in the log domain.

    Returns ``E = exp(log Q_1 - row max)`` [n, K], where ``log Q_1`` is log Q after the two steps up to a per-row
    constant (the sample step's own normalisation is left to the caller, which needs the row sums anyway). Writes into
    ``logits``.
    """
    # prototype step: log Q - log sum_i exp(log Q_ik) (over every rank) - log K
    column_lse = distributed_logsumexp_over_samples(logits)
    logits.sub_(column_lse + math.log(num_prototypes))
    if logits.shape[0] == 0:
        return logits
    # sample step, up to the per-row constant: shift each row by its maximum and exponentiate
    logits.sub_(logits.amax(dim=1, keepdim=True))
    return _exp_(logits)
