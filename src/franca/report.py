"""Self-contained HTML reports of a run: plots (matplotlib, Agg), tables and embedded images, plus metrics.json.

Everything a report shows is inside the one HTML file: images are base64 ``data:image/png`` URIs, the CSS is inline,
there is no JavaScript and a Content-Security-Policy forbids any fetch, so the page renders the same offline, when
mailed, or when opened years later. All text is escaped with :func:`html.escape`.

Typical use (the ``make demo`` flow)::

    plot_loss_curves(run_dir / "metrics.jsonl", out / "loss.png")
    plot_sliced_knn({"trained": {"sliced": {...}, "pca": {...}}, "random init": {...}}, out / "sliced.png")
    plot_rasa_r2([{"iteration": 0, "r2": 0.9, "mse": 0.01}, ...], out / "rasa.png")
    render_report(out / "report.html", title="Franca demo", summary_rows=[...],
                  sections=[ReportSection("Training", images=[ReportImage(out / "loss.png", "losses")])],
                  facts=default_facts(total_time_s=...))
    write_metrics_json(out / "metrics.json", {...})

Plots use :class:`matplotlib.figure.Figure` directly (never ``pyplot``), so they neither need a display nor change the
global matplotlib backend of the calling program.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from franca.core.errors import DataError
from franca.core.io import atomic_write_bytes

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MISSING = "\u2013"  # en dash shown for missing / non-finite values

__all__ = [
    "ReportImage",
    "ReportSection",
    "default_facts",
    "format_value",
    "load_metrics_records",
    "plot_image_grid",
    "plot_loss_curves",
    "plot_rasa_r2",
    "plot_sliced_knn",
    "render_report",
    "write_metrics_json",
]


# --------------------------------------------------------------------------------------------------- small helpers
def _finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (not a bool), else ``None``."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


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
        if not math.isfinite(value):
            return MISSING
        sign = "+" if signed else ""
        magnitude = abs(value)
        if value == 0:
            return "0"
        if magnitude >= 1e4:
            return f"{value:{sign}.0f}"
        if magnitude < 1e-3:
            return f"{value:{sign}.2e}"
        return f"{value:{sign}.4g}"
    return str(value)


def _to_json_safe(value: Any) -> Any:
    """Recursively turn ``value`` into plain JSON types; NaN/inf become ``None`` (null), keys become strings."""
    if isinstance(value, Mapping):
        return {str(key): _to_json_safe(item) for key, item in value.items()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays / scalars, torch tensors
        return _to_json_safe(value.tolist())
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_to_json_safe(item) for item in items]
    if hasattr(value, "item") and callable(value.item):
        return _to_json_safe(value.item())
    return str(value)


def write_metrics_json(path: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics`` as indented JSON with sorted keys, atomically; NaN/inf are written as ``null``.

    Numpy and torch scalars/arrays are converted to plain numbers/lists and non-string keys to strings, so any
    nested dict of results can be passed as it is.
    """
    text = json.dumps(_to_json_safe(metrics), indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


# --------------------------------------------------------------------------------------------------------- plots
def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure


def _save_figure(figure: Any, out_png: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, facecolor="white")
    return atomic_write_bytes(out_png, buffer.getvalue())


def _style_axes(axes: Any) -> None:
    axes.grid(True, color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


def _no_data(axes: Any, what: str) -> None:
    axes.text(
        0.5, 0.5, f"no finite {what} logged", ha="center", va="center", transform=axes.transAxes, color="#777"
    )


def load_metrics_records(source: str | os.PathLike | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Read training records from a ``metrics.jsonl`` path (one JSON object a line) or pass a list through.

    Blank lines are ignored; lines that are not a JSON object are skipped, counted and reported in one warning, so
    the last half-written line of a killed run does not stop a report. Raises DataError when the file is missing.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"training metrics file {path} does not exist; pass the run's metrics.jsonl")
        records: list[dict[str, Any]] = []
        skipped = 0
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    skipped += 1
                    continue
                if isinstance(record, dict):
                    records.append(record)
                else:
                    skipped += 1
        if skipped:
            logger.warning("%s: skipped %d line(s) that are not JSON objects", path, skipped)
        return records
    return [dict(record) for record in source]


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(x, y) of the records whose ``key`` is a finite number; x is ``iteration`` (or the record's index)."""
    xs: list[float] = []
    ys: list[float] = []
    for index, record in enumerate(records):
        y = _finite_number(record.get(key))
        if y is None:
            continue
        x = _finite_number(record.get("iteration"))
        xs.append(float(index) if x is None else x)
        ys.append(y)
    return xs, ys


def _level_keys(records: Sequence[Mapping[str, Any]], prefix: str) -> list[str]:
    """The ``<prefix><j>`` keys present in any record, ordered by level j."""
    levels: set[int] = set()
    for record in records:
        for key in record:
            if key.startswith(prefix) and key[len(prefix) :].isdigit():
                levels.add(int(key[len(prefix) :]))
    return [f"{prefix}{level}" for level in sorted(levels)]


def plot_loss_curves(
    records: str | os.PathLike | Iterable[Mapping[str, Any]],
    out_png: str | os.PathLike,
    level_dims: Sequence[int] | None = None,
    uniform_losses: Sequence[float] | None = None,
) -> Path:
    """Plot the training curves of a run into ``out_png`` and return its path.

    Panels: total loss with its DINO / iBOT / KoLeo parts; DINO loss per Matryoshka level; iBOT loss per level; and a
    short panel with the learning rate (and teacher temperature on a second axis when logged). ``records`` is a
    ``metrics.jsonl`` path or a list of its dicts (keys ``iteration``, ``loss``, ``dino_loss``, ``ibot_loss``,
    ``koleo_loss``, ``dino_loss_level{j}``, ``ibot_loss_level{j}``, ``lr``, ``teacher_temp``...). Missing keys and
    NaN/inf values (skipped steps) are left out point by point. ``level_dims`` (e.g. ``[12, 24, 48, 96, 192]``)
    labels level j with its feature width. ``uniform_losses`` (``ln K_j`` per level) draws each level's uniform value
    as a dashed line in the DINO panel: the loss of a student that predicts the uniform distribution, so a
    curve on its line has not started to learn. Raises DataError when there are no records at all.
    """
    records = load_metrics_records(records)
    if not records:
        raise DataError(
            "the training metrics hold no records; train at least one logged step before the report"
        )
    from matplotlib import colormaps

    figure = _new_figure(13.0, 6.6)
    grid = figure.add_gridspec(2, 3, height_ratios=[3.0, 1.3])
    total_axes = figure.add_subplot(grid[0, 0])
    dino_axes = figure.add_subplot(grid[0, 1], sharex=total_axes)
    ibot_axes = figure.add_subplot(grid[0, 2], sharex=total_axes)
    lr_axes = figure.add_subplot(grid[1, :], sharex=total_axes)

    parts = [("loss", "total", "#222222", 2.0), ("dino_loss", "DINO", "#1f77b4", 1.2)]
    parts += [("ibot_loss", "iBOT", "#d62728", 1.2), ("koleo_loss", "KoLeo", "#2ca02c", 1.2)]
    drawn = 0
    for key, label, colour, width in parts:
        xs, ys = _series(records, key)
        if xs:
            total_axes.plot(xs, ys, label=label, color=colour, linewidth=width)
            drawn += 1
    total_axes.set_title("total loss and its parts")
    if drawn:
        total_axes.legend(fontsize=8, frameon=False)
    else:
        _no_data(total_axes, "loss")

    for axes, prefix, name in (
        (dino_axes, "dino_loss_level", "DINO"),
        (ibot_axes, "ibot_loss_level", "iBOT"),
    ):
        keys = _level_keys(records, prefix)
        colours = colormaps["viridis"]
        drawn = 0
        for position, key in enumerate(keys):
            level = int(key[len(prefix) :])
            xs, ys = _series(records, key)
            if not xs:
                continue
            label = f"level {level}"
            if level_dims is not None and level < len(level_dims):
                label += f" ({level_dims[level]} dims)"
            shade = colours(0.1 + 0.8 * position / max(len(keys) - 1, 1))
            axes.plot(xs, ys, label=label, color=shade, linewidth=1.3)
            if name == "DINO" and uniform_losses is not None and level < len(uniform_losses):
                axes.axhline(uniform_losses[level], color=shade, linewidth=0.9, linestyle="--")
            drawn += 1
        axes.set_title(
            f"{name} loss per Matryoshka level"
            + (" (dashed: uniform, ln K)" if name == "DINO" and uniform_losses else "")
        )
        if drawn:
            axes.legend(fontsize=8, frameon=False)
        else:
            _no_data(axes, f"per-level {name} loss")

    xs, ys = _series(records, "lr")
    if xs:
        lr_axes.plot(xs, ys, color="#9467bd", linewidth=1.3, label="lr")
        lr_axes.set_ylabel("learning rate", color="#9467bd")
        lr_axes.tick_params(axis="y", colors="#9467bd")
        lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        _no_data(lr_axes, "learning rate")
    temp_x, temp_y = _series(records, "teacher_temp")
    if temp_x:
        temp_axes = lr_axes.twinx()
        temp_axes.plot(temp_x, temp_y, color="#ff7f0e", linewidth=1.0, linestyle="--", label="teacher temp")
        temp_axes.set_ylabel("teacher temp", color="#ff7f0e")
        temp_axes.tick_params(axis="y", colors="#ff7f0e")
    lr_axes.set_xlabel("iteration")
    for axes in (total_axes, dino_axes, ibot_axes, lr_axes):
        _style_axes(axes)
    for axes in (total_axes, dino_axes, ibot_axes):
        axes.set_ylabel("loss")
    return _save_figure(figure, out_png)


def plot_sliced_knn(
    results: Mapping[str, Mapping[str, Mapping[Any, Any]]],
    out_png: str | os.PathLike,
    title: str = "k-NN top-1 vs feature dimensions",
) -> Path:
    """Plot k-NN top-1 against the number of feature dimensions (log2 x axis) for several models; return the path.

    ``results`` is ``{model_name: {"sliced": {dims: top1}, "pca": {dims: top1}}}``; either series may be missing.
    Keys may be ints or strings (as read back from JSON). A model keeps one colour; "sliced" (first dims of the
    feature, the Matryoshka claim) is drawn solid and "pca" (the PCA-reduced baseline) dashed. Accuracies in [0, 1]
    are shown as percentages.
    """
    from matplotlib.ticker import FixedLocator, NullLocator, PercentFormatter

    figure = _new_figure(8.0, 4.8)
    axes = figure.add_subplot()
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
    styles = {"sliced": ("-", "o"), "pca": ("--", "s")}
    all_dims: set[int] = set()
    all_values: list[float] = []
    for index, (model, by_series) in enumerate(results.items()):
        colour = palette[index % len(palette)]
        for series, curve in by_series.items():
            points = []
            for dims, top1 in curve.items():
                x, y = _finite_number(dims), _finite_number(top1)
                if x is not None and y is not None and x > 0:
                    points.append((x, y))
            if not points:
                continue
            points.sort()
            linestyle, marker = styles.get(series, (":", "^"))
            axes.plot(
                [x for x, _ in points],
                [y for _, y in points],
                color=colour,
                linestyle=linestyle,
                marker=marker,
                markersize=5,
                linewidth=1.6,
                label=f"{model} ({series})",
            )
            all_dims.update(int(x) for x, _ in points)
            all_values.extend(y for _, y in points)
    axes.set_xscale("log", base=2)
    if all_dims:
        ticks = sorted(all_dims)
        axes.xaxis.set_major_locator(FixedLocator(ticks))
        axes.xaxis.set_minor_locator(NullLocator())
        axes.set_xticklabels([str(tick) for tick in ticks])
        axes.legend(fontsize=9, frameon=False)
    else:
        _no_data(axes, "k-NN accuracy")
    if all_values and max(all_values) <= 1.0:
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.set_xlabel("feature dimensions used")
    axes.set_ylabel("k-NN top-1")
    axes.set_title(title)
    _style_axes(axes)
    return _save_figure(figure, out_png)


def plot_rasa_r2(
    iterations_metrics: Sequence[Mapping[str, Any]],
    out_png: str | os.PathLike,
    r2_key: str = "r2",
    mse_key: str = "mse",
) -> Path:
    """Plot the position R^2 (left axis) and MSE (right axis) per RASA iteration; iteration 0 = before removal.

    Each dict needs ``iteration`` and ``r2`` (falls back to ``linear_r2``, as :func:`franca.rasa.train_rasa` logs it)
    and optionally ``mse`` (falls back to ``linear_mse``); other keys are ignored and non-finite values skipped.
    """
    from matplotlib.ticker import MaxNLocator

    def value(entry: Mapping[str, Any], key: str, fallback: str) -> float | None:
        found = _finite_number(entry.get(key))
        return found if found is not None else _finite_number(entry.get(fallback))

    rows = []
    for index, entry in enumerate(iterations_metrics):
        iteration = _finite_number(entry.get("iteration"))
        rows.append(
            (
                float(index) if iteration is None else iteration,
                value(entry, r2_key, "linear_r2"),
                value(entry, mse_key, "linear_mse"),
            )
        )
    rows.sort(key=lambda row: row[0])
    figure = _new_figure(7.0, 4.2)
    axes = figure.add_subplot()
    r2_points = [(x, r2) for x, r2, _ in rows if r2 is not None]
    mse_points = [(x, mse) for x, _, mse in rows if mse is not None]
    handles = []
    if r2_points:
        handles += axes.plot(
            *zip(*r2_points), color="#1f77b4", marker="o", linewidth=1.8, label="position R²"
        )
    else:
        _no_data(axes, "R²")
    axes.set_ylabel("position R² (linear probe)", color="#1f77b4")
    axes.tick_params(axis="y", colors="#1f77b4")
    if mse_points:
        mse_axes = axes.twinx()
        handles += mse_axes.plot(
            *zip(*mse_points),
            color="#ff7f0e",
            marker="s",
            linestyle="--",
            linewidth=1.4,
            label="position MSE",
        )
        mse_axes.set_ylabel("position MSE", color="#ff7f0e")
        mse_axes.tick_params(axis="y", colors="#ff7f0e")
        mse_axes.spines["top"].set_visible(False)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    ticks = [x for x, _, _ in rows]
    if ticks and len(ticks) <= 20 and all(float(x).is_integer() for x in ticks):
        axes.set_xticks(ticks)
        axes.set_xticklabels(["before" if x == 0 else str(int(x)) for x in ticks])
    axes.set_xlabel("RASA iteration (directions removed)")
    axes.set_title("RASA: positional information left in the patch features")
    axes.grid(True, color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    axes.spines["top"].set_visible(False)
    if handles:  # a figure legend above the axes: a legend inside would sit under the twin axis' line
        figure.legend(
            handles=handles, loc="outside upper center", ncols=len(handles), fontsize=9, frameon=False
        )
    return _save_figure(figure, out_png)


def _as_pil(image: Any) -> Any:
    """A PIL image from a PIL image, a path, or an [H, W] / [H, W, 3] array with values in [0, 1] or 0-255."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    import numpy as np

    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float64)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # [C, H, W] -> [H, W, C]
    if array.max(initial=0.0) <= 1.0:
        array = array * 255.0
    return Image.fromarray(np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8).squeeze())


def plot_image_grid(
    rows: Sequence[Sequence[Any]],
    out_png: str | os.PathLike,
    column_titles: Sequence[str] | None = None,
    row_titles: Sequence[str] | None = None,
    cell_inches: float = 1.9,
) -> Path:
    """Lay images out in a grid (e.g. one row per validation image: input | trained PCA | random-init PCA).

    Cells are PIL images, image paths or arrays ([H, W], [H, W, 3] or [3, H, W], values in [0, 1] or 0-255); small
    feature maps are drawn with nearest-neighbour interpolation so that each patch stays a sharp square.
    """
    if not rows or not any(rows):
        raise DataError("plot_image_grid got no images; pass at least one row with one image")
    import numpy as np

    n_rows = len(rows)
    n_cols = max(len(row) for row in rows)
    figure = _new_figure(cell_inches * n_cols + (0.4 if row_titles else 0.0), cell_inches * n_rows + 0.3)
    axes_grid = figure.subplots(n_rows, n_cols, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            axes = axes_grid[r][c]
            axes.set_xticks([])
            axes.set_yticks([])
            for spine in axes.spines.values():
                spine.set_visible(False)
            if c < len(row) and row[c] is not None:
                axes.imshow(np.asarray(_as_pil(row[c]).convert("RGB")), interpolation="nearest")
            if r == 0 and column_titles and c < len(column_titles):
                axes.set_title(column_titles[c], fontsize=10)
            if c == 0 and row_titles and r < len(row_titles):
                axes.set_ylabel(row_titles[r], fontsize=9)
    return _save_figure(figure, out_png)


# -------------------------------------------------------------------------------------------------------- report
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


def _png_bytes(source: Any) -> bytes:
    """PNG bytes of a path or PIL image; a PNG file is embedded byte for byte, anything else re-encoded."""
    from PIL import Image

    if isinstance(source, Image.Image):
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        return buffer.getvalue()
    path = Path(source)
    data = path.read_bytes()
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


CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f7f9; color: #1f2328;
  font: 16px/1.55 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", "Liberation Sans", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 28px 32px 16px; background: #fff; min-height: 100vh;
  box-shadow: 0 0 0 1px #e3e6ea; }
h1 { font-size: 1.9rem; margin: 0 0 4px; line-height: 1.25; }
h2 { font-size: 1.3rem; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 1px solid #e3e6ea; }
p { margin: 0 0 12px; max-width: 80ch; }
.subtitle { color: #59636e; margin-bottom: 20px; }
.table-wrap { overflow-x: auto; margin: 8px 0 16px; }
table { border-collapse: collapse; font-size: 0.92rem; min-width: 50%; }
caption { caption-side: top; text-align: left; color: #59636e; padding: 0 0 6px; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 6px 12px; text-align: left; vertical-align: top; }
th { background: #f0f3f6; font-weight: 600; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.good { color: #1a7f37; background: #e6f4ea !important; font-weight: 600; }
td.bad { color: #cf222e; background: #fdecea !important; font-weight: 600; }
.figures { display: flex; flex-wrap: wrap; gap: 20px; align-items: flex-start; margin: 8px 0 16px; }
figure { margin: 0; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #e3e6ea; border-radius: 4px; }
figure img.pixelated { image-rendering: pixelated; }
figcaption { color: #59636e; font-size: 0.88rem; margin-top: 6px; max-width: 80ch; }
.warning { color: #9a6700; background: #fff8c5; border: 1px solid #d4a72c; padding: 6px 10px; border-radius: 4px; }
footer { margin-top: 40px; padding-top: 12px; border-top: 1px solid #e3e6ea; color: #59636e; font-size: 0.85rem; }
footer dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
footer dt { font-weight: 600; }
footer dd { margin: 0; overflow-wrap: anywhere; }
@media (max-width: 700px) { main { padding: 16px; } h1 { font-size: 1.5rem; } th, td { padding: 4px 8px; } }
"""


def _is_numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or (hasattr(value, "item") and not isinstance(value, (str, bytes)))


def _render_table(rows: Sequence[Mapping[str, Any]], caption: str | None = None) -> str:
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    numeric = {
        column: all(_is_numeric(row.get(column)) or row.get(column) is None for row in rows)
        for column in columns
    }
    parts = ['<div class="table-wrap"><table>']
    if caption:
        parts.append(f"<caption>{html.escape(caption)}</caption>")
    parts.append("<thead><tr>")
    for column in columns:
        css = ' class="num"' if numeric[column] else ""
        parts.append(f"<th{css}>{html.escape(str(column))}</th>")
    parts.append("</tr></thead><tbody>")
    for row in rows:
        parts.append("<tr>")
        for column in columns:
            css = ' class="num"' if numeric[column] else ""
            parts.append(f"<td{css}>{html.escape(format_value(row.get(column)))}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def _summary_delta(row: Mapping[str, Any], trained: Any, baseline: Any) -> float | None:
    if "delta" in row:
        return _finite_number(row["delta"])
    a, b = _finite_number(trained), _finite_number(baseline)
    return None if a is None or b is None else a - b


def _render_summary(rows: Sequence[Mapping[str, Any]], model_label: str, baseline_label: str) -> str:
    """The metric | trained | random init | delta table; a delta is green when it is an improvement, red if not.

    Each row: ``metric`` (name), ``trained``, ``random_init`` (or ``"random init"``), optional ``delta`` (default
    trained - random init), optional ``higher_is_better`` (default True) and optional ``note``.
    """
    has_note = any(row.get("note") for row in rows)
    headers = ["metric", model_label, baseline_label, "delta"] + (["note"] if has_note else [])
    parts = ['<div class="table-wrap"><table class="summary">', "<thead><tr>"]
    for index, header in enumerate(headers):
        css = ' class="num"' if 1 <= index <= 3 else ""
        parts.append(f"<th{css}>{html.escape(header)}</th>")
    parts.append("</tr></thead><tbody>")
    for row in rows:
        trained = row.get("trained")
        baseline = row.get("random_init", row.get("random init"))
        delta = _summary_delta(row, trained, baseline)
        higher_is_better = bool(row.get("higher_is_better", True))
        verdict = ""
        if delta is not None and delta != 0:
            verdict = " good" if (delta > 0) == higher_is_better else " bad"
        cells = [
            f"<td>{html.escape(str(row.get('metric', '')))}</td>",
            f'<td class="num">{html.escape(format_value(trained))}</td>',
            f'<td class="num">{html.escape(format_value(baseline))}</td>',
            f'<td class="num{verdict}">{html.escape(format_value(delta, signed=True))}</td>',
        ]
        if has_note:
            cells.append(f"<td>{html.escape(str(row.get('note') or ''))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def _render_paragraphs(text: str) -> str:
    paragraphs = [block.strip() for block in text.split("\n\n") if block.strip()]
    return "".join(f"<p>{html.escape(block)}</p>" for block in paragraphs)


def _render_images(images: Sequence[Any]) -> tuple[str, list[str]]:
    figures: list[str] = []
    failures: list[str] = []
    for item in images:
        image = _as_report_image(item)
        try:
            data = _png_bytes(image.source)
        except (OSError, ValueError, SyntaxError) as error:  # PIL raises SyntaxError for some broken PNGs
            failures.append(f"{_describe_source(image.source)} ({type(error).__name__}: {error})")
            continue
        encoded = base64.b64encode(data).decode("ascii")
        attributes = [
            f'src="data:image/png;base64,{encoded}"',
            f'alt="{html.escape(image.caption or "figure")}"',
        ]
        if image.pixelated:
            attributes.append('class="pixelated"')
        if image.display_width:
            attributes.append(f'style="width: {int(image.display_width)}px"')
        caption = f"<figcaption>{html.escape(image.caption)}</figcaption>" if image.caption else ""
        figures.append(f"<figure><img {' '.join(attributes)}>{caption}</figure>")
    block = f'<div class="figures">{"".join(figures)}</div>' if figures else ""
    return block, failures


def _render_facts(facts: Mapping[str, Any]) -> str:
    items = "".join(
        f"<dt>{html.escape(str(key))}</dt><dd>{html.escape(format_value(value))}</dd>"
        for key, value in facts.items()
    )
    return f"<dl>{items}</dl>"


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
    """
    body: list[str] = [f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        body.append(f'<p class="subtitle">{html.escape(subtitle)}</p>')
    if summary_rows:
        body.append(f"<h2>Summary: {html.escape(model_label)} vs {html.escape(baseline_label)}</h2>")
        body.append(_render_summary(summary_rows, model_label, baseline_label))
    skipped_images = 0
    for section in sections:
        body.append(f"<section><h2>{html.escape(section.title)}</h2>")
        if section.text:
            body.append(_render_paragraphs(section.text))
        if section.table:
            body.append(_render_table(section.table, section.table_caption))
        if section.images:
            block, failures = _render_images(section.images)
            body.append(block)
            if failures:
                skipped_images += len(failures)
                listed = "; ".join(failures)
                body.append(
                    f'<p class="warning">{len(failures)} image(s) could not be embedded: {html.escape(listed)}</p>'
                )
        body.append("</section>")
    if skipped_images:
        logger.warning("%s: %d image(s) could not be embedded and were left out", out_html, skipped_images)
    if facts:
        body.append(f"<footer>{_render_facts(facts)}</footer>")
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n"
        f"<body><main>{''.join(body)}</main></body></html>\n"
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
