"""metrics.jsonl, the training log: the trainer's writer, the reports' reader and a resume's truncation."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from franca.core.errors import DataError
from franca.core.metrics_log import append_record, read_records, truncate_records


class _Records(logging.Handler):
    """Collects the log records of franca.core.metrics_log (pytest's logging plugin is off in this project's runs)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture()
def log_messages() -> Iterator[list[str]]:
    handler = _Records()
    logger = logging.getLogger("franca.core.metrics_log")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def test_records_round_trip_one_json_object_per_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    written = [
        {"iteration": 1, "loss": 9.25, "lr": 1e-3, "note": "é"},
        {"iteration": 2, "loss": 8.5, "lr": 2e-3},
    ]
    for record in written:
        append_record(path, record)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [
        json.loads(line) for line in lines
    ] == written  # a plain JSON Lines file, read by the stdlib alone
    assert path.read_text().endswith("\n")
    assert read_records(path) == written


def test_non_finite_values_and_array_scalars(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append_record(path, {"iteration": 3, "loss": float("nan"), "up": float("inf"), "down": float("-inf")})
    append_record(
        path, {"iteration": 4, "np": np.float32(0.5), "torch": torch.tensor(2.0), "ints": np.arange(2)}
    )
    text = path.read_text()
    assert "NaN" in text and "Infinity" in text and "-Infinity" in text  # Python's tokens, not null
    first, second = read_records(path)
    assert math.isnan(first["loss"]) and first["up"] == math.inf and first["down"] == -math.inf
    assert second == {"iteration": 4, "np": 0.5, "torch": 2.0, "ints": [0, 1]}
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        append_record(path, {"iteration": 5, "bad": object()})


def test_a_torn_last_line_is_skipped_and_the_next_record_starts_a_new_line(
    tmp_path: Path, log_messages: list[str]
) -> None:
    path = tmp_path / "metrics.jsonl"
    append_record(path, {"iteration": 1, "loss": 2.0})
    append_record(path, {"iteration": 2, "loss": 1.5})
    with open(path, "a") as handle:
        handle.write('{"iteration": 3, "lo')  # the process died in the middle of a write
    assert [r["iteration"] for r in read_records(path)] == [1, 2]
    assert log_messages == [f"{path}: skipped 1 line(s) that are not JSON objects"]
    append_record(path, {"iteration": 4, "loss": 1.0})
    assert path.read_text().splitlines()[-2:] == ['{"iteration": 3, "lo', '{"iteration": 4, "loss": 1.0}']
    assert [r["iteration"] for r in read_records(path)] == [1, 2, 4]


def test_blank_and_non_object_lines_are_skipped(tmp_path: Path, log_messages: list[str]) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(
        b'{"iteration": 1}\n\n   \n[1, 2]\n"text"\n{"iteration": 2}\n\xff{"bad\n'
    )  # \xff: not UTF-8
    assert read_records(path) == [{"iteration": 1}, {"iteration": 2}]
    assert log_messages == [f"{path}: skipped 3 line(s) that are not JSON objects"]


def test_a_missing_log_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.jsonl does not exist; pass the run's metrics\.jsonl"):
        read_records(tmp_path / "missing.jsonl")


def test_truncate_keeps_the_checkpointed_records_and_drops_torn_lines(
    tmp_path: Path, log_messages: list[str]
) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"iteration": i, "loss": 10.0 - i}) for i in range(1, 6)]
    lines.insert(2, json.dumps({"loss": 3.0}))  # no iteration: not a step record
    path.write_text("\n".join(lines) + '\n{"iteration": 6, "lo')
    assert truncate_records(path, 3) == 3
    assert path.read_text() == (
        '{"iteration": 1, "loss": 9.0}\n{"iteration": 2, "loss": 8.0}\n{"iteration": 3, "loss": 7.0}\n'
    )
    assert log_messages == [f"{path}: dropped 2 torn or unreadable line(s)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.jsonl"
    ]  # written atomically, no temporary left
    assert truncate_records(tmp_path / "absent.jsonl", 3) == 0
    assert not (tmp_path / "absent.jsonl").exists()
