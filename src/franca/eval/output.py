"""Where results go and how they read, without torch: output folders and aligned plain-text tables.

- output folders: :func:`franca.core.io.output_dir_problem` and :func:`franca.core.io.ensure_output_dir`;
- :func:`format_table` renders rows of metrics as an aligned table (a string; printing is the caller's business).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


# --------------------------------------------------------------------------------------------------- tables
def _format_cell(value: Any, precision: int) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 0.5 * 10**-precision:  # 0.001 would print as 0.00: keep its digits
            return f"{value:.{max(1, precision)}g}"
        return f"{value:.{precision}f}"
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, precision: int = 2
) -> str:
    """An aligned plain-text table of ``rows`` (dicts) with the given ``columns`` (default: keys of the first row).

    Numbers are right-aligned and floats printed with ``precision`` decimals; a missing cell is blank.
    """
    if not rows:
        return ""
    columns = list(columns) if columns is not None else list(rows[0].keys())
    cells = [[_format_cell(row.get(column, ""), precision) for column in columns] for row in rows]
    numeric = [
        all(
            isinstance(row.get(column), (int, float)) and not isinstance(row.get(column), bool)
            for row in rows
        )
        for column in columns
    ]
    widths = [max(len(str(column)), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]

    def render(values: Iterable[str]) -> str:
        parts = [
            value.rjust(width) if is_number else value.ljust(width)
            for value, width, is_number in zip(values, widths, numeric)
        ]
        return "  ".join(parts).rstrip()

    header = render(str(column) for column in columns)
    rule = "  ".join("-" * width for width in widths)
    return "\n".join([header, rule, *(render(line) for line in cells)])
