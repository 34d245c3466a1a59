"""The training metrics log, ``metrics.jsonl``: one JSON object per logged step, appended while a run trains.

The trainer appends a record per logged step (:func:`append_record`), a resumed run cuts the log back to its
checkpoint (:func:`truncate_records`), and reports read it (:func:`read_records`). The three share this one module
so that the format has one definition.

Format: one line per record, ``json.dumps`` of a flat dict such as ``{"iteration": 20, "loss": 9.1, "lr": 0.001,
...}``. Non-finite floats are written as Python's ``NaN`` / ``Infinity`` tokens (a skipped step logs NaN losses) and
:mod:`json` reads them back as floats, so the file is JSON Lines as Python reads it, not strict JSON.

A run killed in the middle of a write (power loss, full disk) leaves a torn last line: the reader skips it (one
warning), the next append starts a fresh line after it instead of gluing its record onto the torn one, and a resume
drops it from the file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from franca.core.errors import DataError
from franca.core.io import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["append_record", "read_records", "truncate_records"]


def _plain(value: Any) -> Any:
    """JSON fallback for numpy / torch scalars and arrays (``.tolist()``); any other type is a TypeError."""
    if callable(getattr(value, "tolist", None)):
        return value.tolist()
    raise TypeError(
        f"a metrics record value of type {type(value).__name__} is not JSON serialisable; log a number"
    )


def append_record(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append ``record`` (a flat dict of numbers and strings) as one line to the log at ``path``.

    The file is created when missing (its folder must exist). When the file does not end with a newline (a torn
    last line), the record starts on a new line so that it stays readable.
    """
    line = json.dumps(dict(record), default=_plain) + "\n"
    with open(path, "a+b") as handle:
        if handle.seek(0, os.SEEK_END) > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                line = "\n" + line
        handle.write(line.encode("utf-8"))


def _parse(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON-object lines of ``path`` in order, and the number of other non-blank lines (torn or not objects)."""
    records: list[dict[str, Any]] = []
    skipped = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped += 1
    return records, skipped


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of the log at ``path``, in file order (one dict per logged step).

    Blank lines are ignored; lines that are not a JSON object (the torn last line of a killed run) are skipped and
    counted in one warning. Raises DataError when the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training metrics file {path} does not exist; pass the run's metrics.jsonl")
    records, skipped = _parse(path)
    if skipped:
        logger.warning("%s: skipped %d line(s) that are not JSON objects", path, skipped)
    return records


def truncate_records(path: str | os.PathLike, last_iteration: int) -> int:
    """Keep the records of ``path`` whose integer ``iteration`` is at most ``last_iteration``; return how many kept.

    A resumed run calls it with its checkpoint's iteration: the lines a killed run logged after its last checkpoint
    go (the curve gets no duplicates), and so do torn or unreadable lines (one warning), so that every later run can
    read the file. The file is rewritten atomically; a missing file is left missing.
    """
    path = Path(path)
    if not path.exists():
        return 0
    records, torn = _parse(path)
    stamped = [record for record in records if isinstance(record.get("iteration"), int)]
    torn += len(records) - len(stamped)
    kept = [record for record in stamped if record["iteration"] <= last_iteration]
    if torn:
        logger.warning("%s: dropped %d torn or unreadable line(s)", path, torn)
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
    return len(kept)
