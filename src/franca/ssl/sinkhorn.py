"""Sinkhorn-Knopp teacher targets, computed in the log domain (method doc section 2.5).

The official algorithm builds ``Q = exp(logits / tau).T`` with shape [K, N] and alternates, for a fixed number of
iterations, a prototype step (divide each prototype row by its sum over *all* samples of *all* ranks, then by K)
and a sample step (divide each sample column by its sum, then by N); it finally multiplies by N and transposes, so
every sample's target sums to 1. It exponentiates the raw logits without subtracting a maximum, which overflows
once ``logits / tau`` exceeds ~88 in fp32 (easy with the unnormalised Matryoshka bottleneck).

This module performs the same steps on ``log Q``: a division becomes a subtraction of a log-sum-exp, and the
distributed sums over samples become a max-shifted log-sum-exp whose maximum and shifted sums are combined over
ranks. The result equals the official one wherever the official one is finite, and stays finite for any finite
logits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from franca import distributed

__all__ = ["distributed_logsumexp_over_samples", "sinkhorn_knopp"]

# exp(x) for x below this is taken as exp(_EXP_FLOOR) ~ 1.6e-38, the smallest order of magnitude of normal fp32
# numbers. x86 CPUs compute exp ~50x slower for arguments whose result is denormal or zero (a scalar fallback of the
# vectorised kernel), and with a teacher temperature of 0.01 most of the [N, K] entries are such arguments. Every
# exponential here is summed with, or normalised by, a term of at least 1 (the shifted maximum), so a change below
# 1.7e-38 per term is far below fp32 resolution; targets that were ~0 stay ~0.
_EXP_FLOOR = -87.0


def _exp(values: Tensor) -> Tensor:
    """``exp`` with arguments clamped at ``_EXP_FLOOR`` (see above)."""
    return torch.exp(values.clamp_min(_EXP_FLOOR))


def _logsumexp_over_prototypes(values: Tensor) -> Tensor:
    """``torch.logsumexp(values, dim=1, keepdim=True)`` for finite [n, K] values, with the fast exponential."""
    shift = values.amax(dim=1, keepdim=True)
    return shift + torch.log(_exp(values - shift).sum(dim=1, keepdim=True))


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
    shifted_sums = _exp(values - shift).sum(dim=0)
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
    over the samples of every rank, all-reduced) and a sample step, but evaluated on ``log Q`` in fp32 (autocast
    disabled), so logits of any finite magnitude give finite targets. Each returned row sums to 1; with enough
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

    device = teacher_logits.device
    num_prototypes = teacher_logits.shape[1]
    with torch.autocast(device_type=device.type, enabled=False):
        log_q = teacher_logits.float() / temperature
        if n_samples is None:
            total = torch.tensor(float(teacher_logits.shape[0]), device=device)
            distributed.all_reduce_sum(total)
        else:
            total = torch.as_tensor(n_samples, dtype=torch.float32, device=device).reshape(())
        log_num_samples = torch.log(total)
        log_num_prototypes = math.log(num_prototypes)

        for _ in range(n_iterations):
            # Prototype step: each prototype's mass over all samples of all ranks becomes 1 / K.
            log_q = log_q - distributed_logsumexp_over_samples(log_q) - log_num_prototypes
            # Sample step: each sample's mass over the prototypes becomes 1 / N.
            log_q = log_q - _logsumexp_over_prototypes(log_q) - log_num_samples
        # Final rescaling by N: each sample's target sums to 1.
        return _exp(log_q + log_num_samples)
