"""franca.eval.output.format_table: small values keep their digits, metrics keep the fixed precision."""

from __future__ import annotations

from franca.eval.output import format_table


def test_small_values_are_not_rounded_to_zero() -> None:
    table = format_table([{"lr": 0.001, "weight_decay": 0.0001, "miou": 10.234, "zero": 0.0, "top1": 0.006}])
    header, _, row = table.splitlines()
    assert header.split() == ["lr", "weight_decay", "miou", "zero", "top1"]
    assert row.split() == ["0.001", "0.0001", "10.23", "0.00", "0.01"]
