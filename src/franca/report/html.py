"""The self-contained HTML report: :func:`render_report` fills the Jinja2 template ``templates/report.html.j2``.

Python turns the inputs (summary rows, :class:`ReportSection` items, run facts) into display-ready values, every
number already formatted by :func:`franca.report.format.format_value` and every image a base64 ``data:image/png``
URI; the template only lays them out. Autoescaping is on, so any text (titles, table cells, captions) is shown as
text, never as markup.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import io
import logging
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from franca.core.io import atomic_write_bytes
from franca.report.format import finite_number, format_value

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEMPLATES = Path(__file__).with_name("templates")
TEMPLATE = "report.html.j2"

__all__ = ["ReportImage", "ReportSection", "default_facts", "render_report"]


# ------------------------------------------------------------------------------------------------------- inputs
@dataclass
class ReportImage:
    """An image of a report section: a PNG path (other formats are converted) or a PIL image, with a caption.

    ``display_width`` (CSS pixels) fixes the shown width (never wider than the page); ``pixelated`` keeps small
    feature maps sharp when the browser scales them up.
    """

    source: Any
    caption: str = ""
    display_width: int | None = None
    pixelated: bool = False


@dataclass
class ReportSection:
    """One section of the report: a heading, optional paragraphs, an optional table and optional images.

    ``text`` is plain text; blank lines separate paragraphs. ``table`` is a list of dicts whose keys become the
    columns (in order of first appearance); numbers are formatted by :func:`format_value`. ``images`` holds
    :class:`ReportImage` items, or bare paths / PIL images, or ``(image, caption)`` pairs.
    """

    title: str
    text: str | None = None
    table: list[dict[str, Any]] | None = None
    images: list[Any] = field(default_factory=list)
    table_caption: str | None = None


# ---------------------------------------------------------------------------------- what the template receives
@dataclass(frozen=True)
class _Cell:
    """One table cell: its text and its CSS classes ("num", "num good", "num bad" or "")."""

    text: str
    css: str = ""


@dataclass(frozen=True)
class _Table:
    """A table: ``header`` cells, ``rows`` of cells (one per header cell), an optional caption and table class."""

    header: list[_Cell]
    rows: list[list[_Cell]]
    caption: str | None = None
    css: str = ""


@dataclass(frozen=True)
class _Figure:
    """An embedded image: ``src`` a ``data:image/png;base64,...`` URI, its alt text, caption and display options."""

    src: str
    alt: str
    caption: str
    width: int | None
    pixelated: bool


@dataclass(frozen=True)
class _Section:
    """A section as the template shows it; ``failures`` names the images that could not be embedded."""

    title: str
    paragraphs: list[str]
    table: _Table | None
    figures: list[_Figure]
    failures: list[str]


# ------------------------------------------------------------------------------------------------------- tables
def _is_numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or (hasattr(value, "item") and not isinstance(value, (str, bytes)))


def _table(rows: Sequence[Mapping[str, Any]], caption: str | None = None) -> _Table:
    """A section table: columns in order of first appearance; a column of numbers (or None) is right-aligned."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    numeric = {
        column: all(_is_numeric(row.get(column)) or row.get(column) is None for row in rows)
        for column in columns
    }
    css = {column: "num" if numeric[column] else "" for column in columns}
    header = [_Cell(str(column), css[column]) for column in columns]
    body = [[_Cell(format_value(row.get(column)), css[column]) for column in columns] for row in rows]
    return _Table(header, body, caption)


def _summary_delta(row: Mapping[str, Any], trained: Any, baseline: Any) -> float | None:
    if "delta" in row:
        return finite_number(row["delta"])
    a, b = finite_number(trained), finite_number(baseline)
    return None if a is None or b is None else a - b


def _summary_row(row: Mapping[str, Any], has_note: bool) -> list[_Cell]:
    """metric | trained | random init | signed delta (green "good" when an improvement, red "bad" if not) [| note]."""
    trained = row.get("trained")
    baseline = row.get("random_init", row.get("random init"))
    delta = _summary_delta(row, trained, baseline)
    verdict = ""
    if delta is not None and delta != 0:
        verdict = " good" if (delta > 0) == bool(row.get("higher_is_better", True)) else " bad"
    cells = [
        _Cell(str(row.get("metric", ""))),
        _Cell(format_value(trained), "num"),
        _Cell(format_value(baseline), "num"),
        _Cell(format_value(delta, signed=True), "num" + verdict),
    ]
    if has_note:
        cells.append(_Cell(str(row.get("note") or "")))
    return cells


def _summary(rows: Sequence[Mapping[str, Any]], model_label: str, baseline_label: str) -> _Table:
    """The metric | trained | random init | delta table.

    Each row: ``metric`` (name), ``trained``, ``random_init`` (or ``"random init"``), optional ``delta`` (default
    trained - random init), optional ``higher_is_better`` (default True) and optional ``note`` (a note column is
    shown when any row has one).
    """
    has_note = any(row.get("note") for row in rows)
    headers = ["metric", model_label, baseline_label, "delta"] + (["note"] if has_note else [])
    header = [_Cell(name, "num" if 1 <= index <= 3 else "") for index, name in enumerate(headers)]
    return _Table(header, [_summary_row(row, has_note) for row in rows], css="summary")


# ------------------------------------------------------------------------------------------------------- images
def _png_bytes(source: Any) -> bytes:
    """PNG bytes of a path or PIL image; a PNG file is embedded byte for byte, anything else re-encoded."""
    from PIL import Image

    if isinstance(source, Image.Image):
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        return buffer.getvalue()
    data = Path(source).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.verify()  # raises on a truncated or corrupt file
    if data.startswith(PNG_SIGNATURE):
        return data
    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()


def _as_report_image(item: Any) -> ReportImage:
    if isinstance(item, ReportImage):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        return ReportImage(item[0], str(item[1]))
    return ReportImage(item)


def _describe_source(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return type(source).__name__


def _figures(images: Sequence[Any]) -> tuple[list[_Figure], list[str]]:
    """The embeddable images of a section, and one "source (error)" line per image that could not be read."""
    figures: list[_Figure] = []
    failures: list[str] = []
    for item in images:
        image = _as_report_image(item)
        try:
            data = _png_bytes(image.source)
        except (OSError, ValueError, SyntaxError) as error:  # PIL raises SyntaxError for some broken PNGs
            failures.append(f"{_describe_source(image.source)} ({type(error).__name__}: {error})")
            continue
        src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        width = int(image.display_width) if image.display_width else None
        figures.append(_Figure(src, image.caption or "figure", image.caption, width, image.pixelated))
    return figures, failures


# ------------------------------------------------------------------------------------------------------- render
def _section(section: ReportSection) -> _Section:
    """What the template shows of ``section``: paragraphs split at blank lines, the table, the embedded images."""
    paragraphs = [block.strip() for block in (section.text or "").split("\n\n") if block.strip()]
    table = _table(section.table, section.table_caption) if section.table else None
    figures, failures = _figures(section.images)
    return _Section(section.title, paragraphs, table, figures, failures)


@functools.lru_cache(maxsize=1)
def _template() -> Any:
    """The compiled report template (autoescape on, undefined names are errors); jinja2 is the 'report' extra."""
    try:
        import jinja2
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the HTML report needs jinja2, which the 'report' extra installs: pip install 'franca[report]'",
            name="jinja2",
        ) from error
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return environment.get_template(TEMPLATE)


def render_report(
    out_html: str | os.PathLike,
    *,
    title: str,
    summary_rows: Sequence[Mapping[str, Any]],
    sections: Sequence[ReportSection],
    facts: Mapping[str, Any] | None = None,
    subtitle: str | None = None,
    model_label: str = "trained",
    baseline_label: str = "random init",
) -> Path:
    """Write one self-contained HTML report to ``out_html`` (atomically) and return its path.

    Layout: title (and ``subtitle``), the summary table (metric | trained | random init | delta, deltas green when
    better and red when worse, see ``higher_is_better``), then each :class:`ReportSection`, then a footer with the
    run ``facts`` (date, machine, torch version, total time... see :func:`default_facts`). Images that cannot be
    read are left out and listed in a warning line in their section (and in the log) instead of failing the report.
    Raises ModuleNotFoundError (naming ``pip install 'franca[report]'``) when jinja2 is not installed.
    """
    template = _template()
    views = [_section(section) for section in sections]
    skipped_images = sum(len(view.failures) for view in views)
    if skipped_images:
        logger.warning("%s: %d image(s) could not be embedded and were left out", out_html, skipped_images)
    page = template.render(
        title=title,
        subtitle=subtitle,
        model_label=model_label,
        baseline_label=baseline_label,
        summary=_summary(summary_rows, model_label, baseline_label) if summary_rows else None,
        sections=views,
        facts=[(str(key), format_value(value)) for key, value in (facts or {}).items()],
    )
    return atomic_write_bytes(out_html, page.encode("utf-8"))


def default_facts(total_time_s: float | None = None, **extra: Any) -> dict[str, Any]:
    """Run facts for the report footer: date (UTC), machine, CPU count, Python, torch (and GPU when there is one).

    ``total_time_s`` is shown as ``total time``; ``extra`` items are appended as they are.
    """
    facts: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": f"{platform.node() or 'unknown host'} ({platform.system()} {platform.machine()}, "
        f"{os.cpu_count() or '?'} CPUs)",
        "python": platform.python_version(),
    }
    try:
        import torch

        facts["torch"] = torch.__version__
        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        facts["torch"] = "not installed"
    if total_time_s is not None:
        minutes, seconds = divmod(float(total_time_s), 60.0)
        facts["total time"] = f"{int(minutes)} min {seconds:.1f} s" if minutes else f"{seconds:.1f} s"
    facts.update(extra)
    return facts
