"""Self-contained HTML reports of a run: plots (matplotlib, Agg), tables and embedded images, plus metrics.json.

Everything a report shows is inside the one HTML file: images are base64 ``data:image/png`` URIs, the CSS is inline,
there is no JavaScript and a Content-Security-Policy forbids any fetch, so the page renders the same offline, when
mailed, or when opened years later. The page is the Jinja2 template ``templates/report.html.j2`` with autoescaping
on, so all text is escaped.

Modules: :mod:`~franca.report.plots` draws the figures (PNG files), :mod:`~franca.report.html` renders the page,
:mod:`~franca.report.format` formats numbers for tables and writes ``metrics.json``. The training log
``metrics.jsonl`` is read with :func:`franca.core.metrics_log.read_records` (the trainer writes it with the same
module). matplotlib and jinja2 come with the ``report`` extra (``pip install 'franca[report]'``).

Typical use (the ``make demo`` flow)::

    plot_loss_curves(run_dir / "metrics.jsonl", out / "loss.png")
    plot_sliced_knn({"trained": {"sliced": {...}, "pca": {...}}, "random init": {...}}, out / "sliced.png")
    plot_rasa_r2([{"iteration": 0, "r2": 0.9, "mse": 0.01}, ...], out / "rasa.png")
    render_report(out / "report.html", title="Franca demo", summary_rows=[...],
                  sections=[ReportSection("Training", images=[ReportImage(out / "loss.png", "losses")])],
                  facts=default_facts(total_time_s=...))
    write_metrics_json(out / "metrics.json", {...})
"""

from franca.report.format import MISSING, format_value, write_metrics_json
from franca.report.html import ReportImage, ReportSection, default_facts, render_report
from franca.report.plots import (
    load_metrics_records,
    plot_grouped_bars,
    plot_image_grid,
    plot_loss_curves,
    plot_rasa_r2,
    plot_sliced_knn,
)

__all__ = [
    "MISSING",
    "ReportImage",
    "ReportSection",
    "default_facts",
    "format_value",
    "load_metrics_records",
    "plot_grouped_bars",
    "plot_image_grid",
    "plot_loss_curves",
    "plot_rasa_r2",
    "plot_sliced_knn",
    "render_report",
    "write_metrics_json",
]
