"""Small wrappers around ``torch.distributed`` that are no-ops without a process group.

Every collective used by the method (Sinkhorn-Knopp sums, centre statistics, metric averages) goes through
these helpers so that the same code runs on one CPU process and on many GPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from franca.core.errors import FrancaError

T = TypeVar("T")


def is_enabled() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it (identity without a process group)."""
    if is_enabled() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all ranks, in place, and return it."""
    world_size = get_world_size()
    if world_size > 1:
        all_reduce_sum(tensor)
        tensor.div_(world_size)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) along dim 0 over all ranks; no gradient."""
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def barrier() -> None:
    if is_enabled() and get_world_size() > 1:
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``value`` on every rank (``value`` itself without a process group)."""
    if not is_enabled() or get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def run_on_main(function: Callable[[], T]) -> T | None:
    """Run ``function`` on rank 0 only and return its result there (None elsewhere); when it raises, every rank
    raises, so that no rank waits in a later collective for a rank that has stopped.

    Rank 0 re-raises the original exception; the others raise the same :class:`~franca.core.errors.FrancaError` (its
    one-line message), or a RuntimeError naming any other failure.
    """
    result: T | None = None
    error: BaseException | None = None
    if is_main_process():
        try:
            result = function()
        except Exception as caught:  # noqa: BLE001 - re-raised below, on every rank
            error = caught
    shared = (
        error if error is None or isinstance(error, FrancaError) else RuntimeError(f"rank 0 failed: {error}")
    )
    shared = broadcast_object(shared)
    if error is not None:
        raise error
    if shared is not None:
        raise shared
    return result
