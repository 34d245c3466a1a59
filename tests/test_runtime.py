"""franca.core.runtime.to_floats: scalar tensors as the floats float() gives, in one read."""

from __future__ import annotations

import torch

from franca.core.runtime import to_floats


def test_to_floats_equals_float_of_each() -> None:
    values = [torch.tensor(1.5), torch.tensor([0.1], dtype=torch.float64), torch.tensor(3, dtype=torch.int64)]
    values += [torch.tensor(0.1, dtype=torch.bfloat16), torch.tensor(0.1)]
    assert to_floats(values) == [
        float(value) for value in values
    ]  # exactly: 0.1 in fp64, bf16 and fp32 differ
    assert (
        to_floats([torch.tensor(float("nan"))])[0] != to_floats([torch.tensor(float("nan"))])[0]
    )  # nan stays nan
    assert to_floats([torch.tensor(float("inf"), requires_grad=True) * 1]) == [float("inf")]
    assert to_floats([]) == []
