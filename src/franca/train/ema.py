"""The exponential moving average that makes the teacher: teacher = m * teacher + (1 - m) * student.

Uses the multi-tensor ``torch._foreach_*`` kernels as the official code does (one launch for all parameters); a
plain per-tensor loop is used when they are unavailable or the tensors cannot be batched (mixed devices/dtypes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _can_use_foreach(teacher_params: Sequence[Tensor], student_params: Sequence[Tensor]) -> bool:
    if not (hasattr(torch, "_foreach_mul_") and hasattr(torch, "_foreach_add_")) or not teacher_params:
        return False
    device, dtype = teacher_params[0].device, teacher_params[0].dtype
    return all(
        t.device == device and s.device == device for t, s in zip(teacher_params, student_params)
    ) and all(t.dtype == dtype and s.dtype == dtype for t, s in zip(teacher_params, student_params))


@torch.no_grad()
def ema_update_(
    teacher_params: Sequence[Tensor],
    student_params: Sequence[Tensor],
    momentum: float,
    *,
    use_foreach: bool | None = None,
) -> None:
    """In place, for every pair: teacher <- momentum * teacher + (1 - momentum) * student.

    ``use_foreach`` None picks the multi-tensor kernels when all tensors share one device and dtype.
    """
    if len(teacher_params) != len(student_params):
        raise ValueError(f"{len(teacher_params)} teacher tensors but {len(student_params)} student tensors")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be within [0, 1], got {momentum}")
    if not teacher_params:
        return
    teacher_params, student_params = list(teacher_params), list(student_params)
    if use_foreach is None:
        use_foreach = _can_use_foreach(teacher_params, student_params)
    if use_foreach:
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
        return
    for teacher, student in zip(teacher_params, student_params):
        teacher.mul_(momentum).add_(
            student.to(dtype=teacher.dtype, device=teacher.device), alpha=1.0 - momentum
        )


def pair_parameters(teacher: nn.Module, student: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Teacher and student parameters paired by name (same order); raise ValueError if names or shapes differ.

    The loop can call this once and reuse the two lists with :func:`ema_update_` at every step.
    """
    teacher_named = dict(teacher.named_parameters())
    student_named = dict(student.named_parameters())
    if teacher_named.keys() != student_named.keys():
        only_teacher = sorted(teacher_named.keys() - student_named.keys())
        only_student = sorted(student_named.keys() - teacher_named.keys())
        raise ValueError(
            "teacher and student parameter names differ: "
            f"only in teacher {only_teacher[:3]}{'...' if len(only_teacher) > 3 else ''}, "
            f"only in student {only_student[:3]}{'...' if len(only_student) > 3 else ''}"
        )
    names = list(student_named)
    for name in names:
        if teacher_named[name].shape != student_named[name].shape:
            raise ValueError(
                f"parameter '{name}' has shape {tuple(teacher_named[name].shape)} in the teacher but "
                f"{tuple(student_named[name].shape)} in the student"
            )
    return [teacher_named[name] for name in names], [student_named[name] for name in names]


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """EMA step of ``teacher`` towards ``student``, parameters paired by name (buffers are left alone)."""
    teacher_params, student_params = pair_parameters(teacher, student)
    ema_update_(teacher_params, student_params, momentum)
