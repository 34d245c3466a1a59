"""EMA teacher update against the formula computed with a plain loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from franca.train.ema import ema_update_, pair_parameters, update_teacher


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual - expected).abs().max()


def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))


@pytest.mark.parametrize("use_foreach", [None, True, False])
def test_ema_matches_the_formula_over_several_steps(use_foreach: bool | None) -> None:
    teacher = [torch.randn(5, 3), torch.randn(7)]
    student = [torch.randn(5, 3), torch.randn(7)]
    expected = [t.clone().double() for t in teacher]
    for step, momentum in enumerate((0.9, 0.99, 0.5, 1.0, 0.0)):
        for s in student:
            s.add_(torch.randn_like(s) * 0.1 * (step + 1))  # the student moves between steps
        expected = [momentum * e + (1 - momentum) * s.double() for e, s in zip(expected, student)]
        ema_update_(teacher, student, momentum, use_foreach=use_foreach)
        for t, e in zip(teacher, expected):
            assert_close(t, e.float())


def test_update_teacher_pairs_by_name_and_needs_no_grad() -> None:
    student = make_net()
    teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.requires_grad_(False)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(1.0)
    old_teacher = {n: p.clone() for n, p in teacher.named_parameters()}
    update_teacher(teacher, student, 0.75)
    for name, param in teacher.named_parameters():
        expected = 0.75 * old_teacher[name] + 0.25 * dict(student.named_parameters())[name].detach()
        assert_close(param, expected)
        assert param.grad_fn is None


def test_student_gradients_do_not_flow_into_the_teacher() -> None:
    student = make_net()
    teacher = copy.deepcopy(student)
    loss = student(torch.randn(2, 4)).sum()  # a live graph on the student
    update_teacher(teacher, student, 0.5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_mismatched_names_or_shapes_raise() -> None:
    with pytest.raises(ValueError, match="names differ"):
        update_teacher(nn.Sequential(nn.Linear(4, 6)), make_net(), 0.9)
    with pytest.raises(ValueError, match="shape"):
        pair_parameters(nn.Sequential(nn.Linear(4, 6)), nn.Sequential(nn.Linear(4, 5)))
    with pytest.raises(ValueError):
        ema_update_([torch.zeros(2)], [], 0.9)
    with pytest.raises(ValueError):
        ema_update_([torch.zeros(2)], [torch.zeros(2)], 1.5)
