"""Soft-target cross-entropy over very wide logits, without an fp32 copy of them kept for the backward pass.

The DINO and iBOT losses need, per row r of student logits ``s`` and teacher targets ``t``,

    CE_r = -sum_k t_rk * log softmax(s_r / tau)_k

over up to 131,072 prototypes per level and, for iBOT, thousands of masked patches per GPU. Written plainly (an fp32
copy, a division, ``log_softmax``, a product, a sum) autograd keeps the fp32 log-probabilities ``[R, K]`` until the
backward pass, and the forward makes three more fp32 temporaries of that size (for ViT-S at batch 64 with the paper's
heads: ~6,000 patches x 253,952 prototypes, 6 GB per fp32 copy). :func:`soft_cross_entropy` keeps the logits as they
came (bf16 under autocast) and the targets, works on chunks of rows so that its temporaries are bounded
(:data:`CHUNK_ELEMENTS`), recomputes each chunk's softmax in the backward pass (one fused kernel) and takes the
gradient of the chunk at once from

    dCE_r / ds_rk = (softmax(s_r / tau)_k * sum_k' t_rk' - t_rk) / tau

(targets need not sum to 1: the DINO loss's local-crop term uses the sum of the two teacher views as its target).
Values and gradients equal the plain form's up to fp32 rounding (tests/ssl/test_cross_entropy.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CHUNK_ELEMENTS", "soft_cross_entropy"]

#: Logit elements per chunk: each chunk makes one or two fp32 temporaries of this size (256 MiB each).
CHUNK_ELEMENTS = 1 << 26


def _chunks(rows: int, width: int, chunk_elements: int) -> list[slice]:
    step = max(1, chunk_elements // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _work_dtype(logits: Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 logits, fp64 for fp64 ones (gradcheck)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` in fp32 (fp64 for fp64 logits), in a new tensor (the chunk's one big temporary)."""
    return logits.to(_work_dtype(logits), copy=True).div_(temperature)


def _forward_chunk(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Rows' losses ``[r]`` of a chunk ``[r, K]``."""
    log_probs = F.log_softmax(_scaled(logits, temperature), dim=-1)
    # in place, then torch's cascade sum: as accurate as the plain form (a dot product is ~100x less so)
    return log_probs.mul_(targets).sum(dim=-1).neg_()


def _backward_chunk(logits: Tensor, targets: Tensor, row_scale: Tensor, temperature: float) -> Tensor:
    """The gradient of a chunk, ``(softmax * sum_k t - t) * row_scale`` with ``row_scale`` ``[r, 1]`` = upstream
    gradient / temperature, in the logits' dtype (as the plain form's ``.float()`` backward gives)."""
    target = targets.to(row_scale.dtype)
    probs = torch.softmax(_scaled(logits, temperature), dim=-1)  # recomputed: nothing [R, K] was saved
    grad = probs.mul_(target.sum(dim=-1, keepdim=True) * row_scale).addcmul_(target, row_scale, value=-1)
    return grad.to(logits.dtype)


@functools.cache
def _compiled(kernel: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``kernel`` through ``torch.compile`` (dynamic shapes: one graph for every level's width and chunk height)."""
    return torch.compile(kernel, dynamic=True)


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: Tensor, targets: Tensor, temperature: float, chunk_elements: int, compiled: bool
    ) -> Tensor:
        rows, width = logits.shape
        kernel = _compiled(_forward_chunk) if compiled else _forward_chunk
        losses = torch.empty(rows, dtype=_work_dtype(logits), device=logits.device)
        for chunk in _chunks(rows, width, chunk_elements):
            losses[chunk] = kernel(logits[chunk], targets[chunk], temperature)
        ctx.save_for_backward(logits, targets)
        ctx.temperature, ctx.chunk_elements, ctx.compiled = temperature, chunk_elements, compiled
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, None, None, None, None]:  # type: ignore[override]
        logits, targets = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        kernel = _compiled(_backward_chunk) if ctx.compiled else _backward_chunk
        scale = (grad_losses.to(_work_dtype(logits)) / ctx.temperature)[:, None]
        chunks = _chunks(*logits.shape, ctx.chunk_elements)
        if len(chunks) == 1:  # no copy into a gradient tensor
            return kernel(logits, targets, scale, ctx.temperature), None, None, None, None
        grad = torch.empty_like(logits)
        for chunk in chunks:
            grad[chunk] = kernel(logits[chunk], targets[chunk], scale[chunk], ctx.temperature)
        return grad, None, None, None, None


def soft_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    temperature: float,
    chunk_elements: int = CHUNK_ELEMENTS,
    compiled: bool = False,
) -> Tensor:
    """Per-row ``-sum_k targets * log_softmax(logits / temperature)``: ``[R, K]`` logits (any float dtype) and
    targets (no gradient; any non-negative weights) -> ``[R]`` losses in fp32 (fp64 for fp64 logits).

    The gradient flows to ``logits`` only and has their dtype. Runs in fp32 whatever the autocast state.
    ``compiled`` runs each chunk's forward and backward as one ``torch.compile`` kernel each (fused: one read of the
    chunk instead of several passes; compiled once, on first use); values then differ from the eager ones by the
    reduction order (~1e-5 relative).
    """
    if logits.dim() != 2 or targets.shape != logits.shape:
        raise ValueError(
            f"logits and targets must both be [R, K], got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if targets.requires_grad:
        raise ValueError("soft_cross_entropy gives no gradient to the targets; pass them detached")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _SoftCrossEntropy.apply(
            logits, targets, float(temperature), int(chunk_elements), bool(compiled)
        )
