"""The report's figures, drawn with matplotlib into PNG files: training curves, sliced k-NN, RASA R², image grids.

Plots use :class:`matplotlib.figure.Figure` directly (never ``pyplot``), so they neither need a display nor change the
global matplotlib backend of the calling program. Every PNG is written atomically at 100 dpi on a white background.
"""

from __future__ import annotations

import io
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from franca.core.errors import DataError
from franca.core.io import atomic_write_bytes
from franca.core.metrics_log import read_records
from franca.report.format import finite_number

__all__ = [
    "load_metrics_records",
    "plot_grouped_bars",
    "plot_image_grid",
    "plot_loss_curves",
    "plot_rasa_r2",
    "plot_sliced_knn",
]

LOSS_PARTS = (  # (record key, legend label, colour, line width) of the total-loss panel
    ("loss", "total", "#222222", 2.0),
    ("dino_loss", "DINO", "#1f77b4", 1.2),
    ("ibot_loss", "iBOT", "#d62728", 1.2),
    ("koleo_loss", "KoLeo", "#2ca02c", 1.2),
)
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


# --------------------------------------------------------------------------------------------------- small helpers
def _new_figure(width: float, height: float) -> Any:
    """A ``width`` x ``height`` inch matplotlib Figure at 100 dpi with constrained layout (no pyplot)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save_figure(figure: Any, out_png: str | os.PathLike) -> Path:
    """Write ``figure`` as a PNG to ``out_png`` atomically; return the path."""
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
    """Training records from a ``metrics.jsonl`` path (:func:`franca.core.metrics_log.read_records`) or a list.

    A path is read with the log's reader: blank lines are ignored, lines that are not a JSON object (the torn last
    line of a killed run) are skipped with one warning, and a missing file raises DataError. Any other iterable of
    mappings is copied into a list of dicts.
    """
    if isinstance(source, (str, os.PathLike)):
        return read_records(source)
    return [dict(record) for record in source]


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(x, y) of the records whose ``key`` is a finite number; x is ``iteration`` (or the record's index)."""
    xs: list[float] = []
    ys: list[float] = []
    for index, record in enumerate(records):
        y = finite_number(record.get(key))
        if y is None:
            continue
        x = finite_number(record.get("iteration"))
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


# --------------------------------------------------------------------------------------------------- loss curves
def _draw_loss_parts(axes: Any, records: Sequence[Mapping[str, Any]]) -> None:
    """The total loss and its DINO / iBOT / KoLeo parts (:data:`LOSS_PARTS`) on one axes."""
    drawn = 0
    for key, label, colour, width in LOSS_PARTS:
        xs, ys = _series(records, key)
        if xs:
            axes.plot(xs, ys, label=label, color=colour, linewidth=width)
            drawn += 1
    axes.set_title("total loss and its parts")
    if drawn:
        axes.legend(fontsize=8, frameon=False)
    else:
        _no_data(axes, "loss")


def _draw_level_losses(
    axes: Any,
    records: Sequence[Mapping[str, Any]],
    name: str,
    level_dims: Sequence[int] | None,
    uniform_losses: Sequence[float] | None,
) -> None:
    """One curve per Matryoshka level of the ``name`` ("DINO" or "iBOT") loss, shaded along viridis by level.

    Keys are ``<name>_loss_level{j}`` in lower case; ``level_dims[j]`` labels level j with its width and, for DINO,
    ``uniform_losses[j]`` draws the level's uniform value (``ln K_j``) as a dashed line of the same shade.
    """
    from matplotlib import colormaps

    prefix = f"{name.lower()}_loss_level"
    keys = _level_keys(records, prefix)
    uniform = uniform_losses if name == "DINO" else None
    drawn = 0
    for position, key in enumerate(keys):
        level = int(key[len(prefix) :])
        xs, ys = _series(records, key)
        if not xs:
            continue
        label = f"level {level}"
        if level_dims is not None and level < len(level_dims):
            label += f" ({level_dims[level]} dims)"
        shade = colormaps["viridis"](0.1 + 0.8 * position / max(len(keys) - 1, 1))
        axes.plot(xs, ys, label=label, color=shade, linewidth=1.3)
        if uniform is not None and level < len(uniform):
            axes.axhline(uniform[level], color=shade, linewidth=0.9, linestyle="--")
        drawn += 1
    axes.set_title(f"{name} loss per Matryoshka level" + (" (dashed: uniform, ln K)" if uniform else ""))
    if drawn:
        axes.legend(fontsize=8, frameon=False)
    else:
        _no_data(axes, f"per-level {name} loss")


def _draw_schedules(axes: Any, records: Sequence[Mapping[str, Any]]) -> None:
    """The learning rate (left axis) and, when logged, the teacher temperature on a twin right axis."""
    xs, ys = _series(records, "lr")
    if xs:
        axes.plot(xs, ys, color="#9467bd", linewidth=1.3, label="lr")
        axes.set_ylabel("learning rate", color="#9467bd")
        axes.tick_params(axis="y", colors="#9467bd")
        axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        _no_data(axes, "learning rate")
    temp_x, temp_y = _series(records, "teacher_temp")
    if temp_x:
        temp_axes = axes.twinx()
        temp_axes.plot(temp_x, temp_y, color="#ff7f0e", linewidth=1.0, linestyle="--", label="teacher temp")
        temp_axes.set_ylabel("teacher temp", color="#ff7f0e")
        temp_axes.tick_params(axis="y", colors="#ff7f0e")
    axes.set_xlabel("iteration")


def plot_loss_curves(
    records: str | os.PathLike | Iterable[Mapping[str, Any]],
    out_png: str | os.PathLike,
    level_dims: Sequence[int] | None = None,
    uniform_losses: Sequence[float] | None = None,
) -> Path:
    """Plot the training curves of a run into ``out_png`` (1300 x 660 px) and return its path.

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
    figure = _new_figure(13.0, 6.6)
    grid = figure.add_gridspec(2, 3, height_ratios=[3.0, 1.3])
    total_axes = figure.add_subplot(grid[0, 0])
    dino_axes = figure.add_subplot(grid[0, 1], sharex=total_axes)
    ibot_axes = figure.add_subplot(grid[0, 2], sharex=total_axes)
    lr_axes = figure.add_subplot(grid[1, :], sharex=total_axes)
    _draw_loss_parts(total_axes, records)
    _draw_level_losses(dino_axes, records, "DINO", level_dims, uniform_losses)
    _draw_level_losses(ibot_axes, records, "iBOT", level_dims, uniform_losses)
    _draw_schedules(lr_axes, records)
    for axes in (total_axes, dino_axes, ibot_axes, lr_axes):
        _style_axes(axes)
    for axes in (total_axes, dino_axes, ibot_axes):
        axes.set_ylabel("loss")
    return _save_figure(figure, out_png)


# ----------------------------------------------------------------------------------------------------- sliced k-NN
def _curve_points(curve: Mapping[Any, Any]) -> list[tuple[float, float]]:
    """The ``{dims: top1}`` pairs of one curve with finite values and dims > 0, as floats sorted by dims."""
    points = []
    for dims, top1 in curve.items():
        x, y = finite_number(dims), finite_number(top1)
        if x is not None and y is not None and x > 0:
            points.append((x, y))
    return sorted(points)


def _finish_sliced_axes(axes: Any, all_dims: set[int], all_values: list[float], title: str) -> None:
    """Log2 x axis ticked at the measured dims, percent y axis for accuracies in [0, 1], labels and title."""
    from matplotlib.ticker import FixedLocator, NullLocator, PercentFormatter

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


def plot_sliced_knn(
    results: Mapping[str, Mapping[str, Mapping[Any, Any]]],
    out_png: str | os.PathLike,
    title: str = "k-NN top-1 vs feature dimensions",
    spreads: Mapping[str, Mapping[str, Mapping[Any, Any]]] | None = None,
) -> Path:
    """Plot k-NN top-1 against the number of feature dimensions (log2 x axis) for several models; return the path.

    ``results`` is ``{model_name: {"sliced": {dims: top1}, "pca": {dims: top1}}}``; either series may be missing.
    Keys may be ints or strings (as read back from JSON). A model keeps one colour; "sliced" (first dims of the
    feature, the Matryoshka claim) is drawn solid and "pca" (the PCA-reduced baseline) dashed. Accuracies in [0, 1]
    are shown as percentages. ``spreads`` (same layout, {dims: standard deviation}) shades mean +/- std around a
    curve, e.g. over training seeds. The figure is 800 x 480 px.
    """
    figure = _new_figure(8.0, 4.8)
    axes = figure.add_subplot()
    styles = {"sliced": ("-", "o"), "pca": ("--", "s")}
    all_dims: set[int] = set()
    all_values: list[float] = []
    for index, (model, by_series) in enumerate(results.items()):
        for series, curve in by_series.items():
            points = _curve_points(curve)
            if not points:
                continue
            linestyle, marker = styles.get(series, (":", "^"))
            xs, ys = [x for x, _ in points], [y for _, y in points]
            colour = PALETTE[index % len(PALETTE)]
            axes.plot(
                xs,
                ys,
                color=colour,
                linestyle=linestyle,
                marker=marker,
                markersize=5,
                linewidth=1.6,
                label=f"{model} ({series})",
            )
            spread = ((spreads or {}).get(model) or {}).get(series)
            if spread:
                widths = [finite_number(spread.get(x, spread.get(str(int(x))))) or 0.0 for x in xs]
                low, high = [y - w for y, w in zip(ys, widths)], [y + w for y, w in zip(ys, widths)]
                axes.fill_between(xs, low, high, color=colour, alpha=0.15, linewidth=0)
                all_values.extend(high)
            all_dims.update(int(x) for x in xs)
            all_values.extend(ys)
    _finish_sliced_axes(axes, all_dims, all_values, title)
    return _save_figure(figure, out_png)


def plot_grouped_bars(
    groups: Mapping[str, Mapping[str, Sequence[float]]],
    out_png: str | os.PathLike,
    title: str = "",
    ylabel: str = "",
) -> Path:
    """Grouped bars: one group per key of ``groups`` (e.g. a metric), one bar per series inside it (e.g. a model).

    ``groups`` is ``{group: {series: values}}`` with the values of several seeds: each bar is their mean, its error
    bar the sample standard deviation (none for one value), and each value is drawn as a dot on the bar. A series
    keeps one colour across groups. Non-finite values are left out. The figure is 100 px wide per bar (at least 800)
    and 480 px high.
    """
    series_names = list(dict.fromkeys(name for bars in groups.values() for name in bars))
    width = 0.8 / max(len(series_names), 1)
    figure = _new_figure(max(8.0, 0.9 * len(groups) * max(len(series_names), 1) + 1.5), 4.8)
    axes = figure.add_subplot()
    for index, name in enumerate(series_names):
        colour = PALETTE[index % len(PALETTE)]
        for position, bars in enumerate(groups.values()):
            values = [v for v in (finite_number(x) for x in bars.get(name, ())) if v is not None]
            if not values:
                continue
            x = position - 0.4 + width * (index + 0.5)
            mean = sum(values) / len(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            axes.bar(x, mean, width * 0.9, color=colour, alpha=0.75, label=name if position == 0 else None)
            if len(values) > 1:
                axes.errorbar(x, mean, yerr=std, color="#222222", capsize=3, linewidth=1.0)
            axes.plot([x] * len(values), values, "o", color="#222222", markersize=2.5)
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels(list(groups), fontsize=9)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=9, frameon=False, ncols=min(len(series_names), 4))
    _style_axes(axes)
    return _save_figure(figure, out_png)


# ---------------------------------------------------------------------------------------------------------- RASA
def _rasa_rows(
    iterations_metrics: Sequence[Mapping[str, Any]], r2_key: str, mse_key: str
) -> list[tuple[float, float | None, float | None]]:
    """``(iteration, r2, mse)`` per entry sorted by iteration; r2 / mse fall back to ``linear_r2`` / ``linear_mse``
    and are None when not finite; a missing iteration is the entry's index."""

    def value(entry: Mapping[str, Any], key: str, fallback: str) -> float | None:
        found = finite_number(entry.get(key))
        return found if found is not None else finite_number(entry.get(fallback))

    rows = []
    for index, entry in enumerate(iterations_metrics):
        iteration = finite_number(entry.get("iteration"))
        x = float(index) if iteration is None else iteration
        rows.append((x, value(entry, r2_key, "linear_r2"), value(entry, mse_key, "linear_mse")))
    return sorted(rows, key=lambda row: row[0])


def _draw_rasa_mse(axes: Any, mse_points: list[tuple[float, float]]) -> list[Any]:
    """The MSE curve on a twin right axis of ``axes``; returns its line handles for the legend."""
    mse_axes = axes.twinx()
    handles = mse_axes.plot(
        *zip(*mse_points), color="#ff7f0e", marker="s", linestyle="--", linewidth=1.4, label="position MSE"
    )
    mse_axes.set_ylabel("position MSE", color="#ff7f0e")
    mse_axes.tick_params(axis="y", colors="#ff7f0e")
    mse_axes.spines["top"].set_visible(False)
    return handles


def _rasa_xticks(axes: Any, xs: list[float]) -> None:
    """Integer x ticks; up to 20 integer iterations are each ticked, iteration 0 labelled "before"."""
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if xs and len(xs) <= 20 and all(float(x).is_integer() for x in xs):
        axes.set_xticks(xs)
        axes.set_xticklabels(["before" if x == 0 else str(int(x)) for x in xs])


def plot_rasa_r2(
    iterations_metrics: Sequence[Mapping[str, Any]],
    out_png: str | os.PathLike,
    r2_key: str = "r2",
    mse_key: str = "mse",
) -> Path:
    """Plot the position R^2 (left axis) and MSE (right axis) per RASA iteration; iteration 0 = before removal.

    Each dict needs ``iteration`` and ``r2`` (falls back to ``linear_r2``, as :func:`franca.rasa.train_rasa` logs it)
    and optionally ``mse`` (falls back to ``linear_mse``); other keys are ignored and non-finite values skipped.
    The figure is 700 x 420 px.
    """
    rows = _rasa_rows(iterations_metrics, r2_key, mse_key)
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
        handles += _draw_rasa_mse(axes, mse_points)
    _rasa_xticks(axes, [x for x, _, _ in rows])
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


# ---------------------------------------------------------------------------------------------------- image grid
def _as_pil(image: Any) -> Any:
    """A PIL image from a PIL image, a path, or an [H, W] / [H, W, C] / [C, H, W] array (C in 1, 3) with values in
    [0, 1] or 0-255 (numpy array or torch tensor; NaN becomes 0)."""
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


def _bare_axes(axes: Any) -> None:
    """No ticks and no frame: a cell shows only its image."""
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(False)


def plot_image_grid(
    rows: Sequence[Sequence[Any]],
    out_png: str | os.PathLike,
    column_titles: Sequence[str] | None = None,
    row_titles: Sequence[str] | None = None,
    cell_inches: float = 1.9,
) -> Path:
    """Lay images out in a grid (e.g. one row per validation image: input | trained PCA | random-init PCA).

    Cells are PIL images, image paths or arrays ([H, W], [H, W, 3] or [3, H, W], values in [0, 1] or 0-255), or
    None for an empty cell; rows may be shorter than the widest one. Small feature maps are drawn with
    nearest-neighbour interpolation so that each patch stays a sharp square. Each cell is ``cell_inches`` square at
    100 dpi. Raises DataError when there is no image.
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
            _bare_axes(axes)
            if c < len(row) and row[c] is not None:
                axes.imshow(np.asarray(_as_pil(row[c]).convert("RGB")), interpolation="nearest")
            if r == 0 and column_titles and c < len(column_titles):
                axes.set_title(column_titles[c], fontsize=10)
            if c == 0 and row_titles and r < len(row_titles):
                axes.set_ylabel(row_titles[r], fontsize=9)
    return _save_figure(figure, out_png)
