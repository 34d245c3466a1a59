"""Numbers as a report shows them (table cells) and as it stores them (``metrics.json``)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from franca.core.io import atomic_write_bytes

MISSING = "\u2013"  # en dash shown for missing / non-finite values

__all__ = ["MISSING", "finite_number", "format_value", "to_json_safe", "write_metrics_json"]


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (not a bool), else ``None``."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _format_float(value: float, signed: bool) -> str:
    """4 significant digits; |value| >= 1e4 without decimals, |value| < 1e-3 in exponent form; non-finite: dash."""
    if not math.isfinite(value):
        return MISSING
    if value == 0:
        return "0"
    sign = "+" if signed else ""
    magnitude = abs(value)
    if magnitude >= 1e4:
        return f"{value:{sign}.0f}"
    if magnitude < 1e-3:
        return f"{value:{sign}.2e}"
    return f"{value:{sign}.4g}"


def format_value(value: Any, signed: bool = False) -> str:
    """Format one table cell: ints as they are, floats to 4 significant digits, tiny/huge floats in exponent form.

    ``None``, NaN and infinities become an en dash (NaN marks a skipped step or a metric that could not be computed);
    ``signed`` prefixes positive numbers with ``+`` (for deltas). Strings are returned unchanged (escaped later).
    """
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, int):
        return f"{value:+d}" if signed else str(value)
    if isinstance(value, float):
        return _format_float(value, signed)
    return str(value)


def to_json_safe(value: Any) -> Any:
    """Recursively turn ``value`` into plain JSON types; NaN/inf become ``None`` (null), keys become strings."""
    if isinstance(value, Mapping):
        return {str(key): to_json_safe(item) for key, item in value.items()}
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays / scalars, torch tensors
        return to_json_safe(value.tolist())
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [to_json_safe(item) for item in items]
    if hasattr(value, "item") and callable(value.item):
        return to_json_safe(value.item())
    return str(value)


def write_metrics_json(path: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics`` as indented JSON with sorted keys, atomically; NaN/inf are written as ``null``.

    Numpy and torch scalars/arrays are converted to plain numbers/lists and non-string keys to strings, so any
    nested dict of results can be passed as it is.
    """
    text = json.dumps(to_json_safe(metrics), indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))
