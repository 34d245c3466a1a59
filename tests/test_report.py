"""The HTML report: built from synthetic run outputs, checked as parsed HTML and as rendered by headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import math
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from franca.report import (
    ReportImage,
    ReportSection,
    default_facts,
    format_value,
    plot_image_grid,
    plot_loss_curves,
    plot_rasa_r2,
    plot_sliced_knn,
    render_report,
    write_metrics_json,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import browser  # noqa: E402  (the helper sits beside this file; tests/ is not a package)

LEVELS = 5
ITERATIONS = 40


class _PageParser(HTMLParser):
    """Collects <img> attributes, table cell texts per table, and every attribute value, with the stdlib parser."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.tables: list[list[list[str]]] = []
        self.attribute_values: list[str] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self.cell_classes: list[tuple[str, str]] = []
        self._cell_class = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        self.attribute_values.extend(attributes.values())
        if tag == "img":
            self.images.append(attributes)
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
            self._cell_class = attributes.get("class", "")

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            text = "".join(self._cell).strip()
            self._row.append(text)
            self.cell_classes.append((text, self._cell_class))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None


def _distinct_colours(png: Path) -> tuple[int, np.ndarray]:
    """Number of distinct RGB colours of a PNG (packed into one integer per pixel: fast) and its pixels."""
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))
    packed = pixels.astype(np.uint32)
    packed = (packed[..., 0] << 16) | (packed[..., 1] << 8) | packed[..., 2]
    return len(np.unique(packed)), pixels


def _parse(text: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(text)
    parser.close()
    return parser


def _write_fake_training_log(path: Path) -> None:
    """A metrics.jsonl like the trainer's: decreasing losses on 5 levels, one NaN (skipped) step, one torn line."""
    lines = []
    for iteration in range(ITERATIONS):
        decay = math.exp(-iteration / 15)
        record = {
            "iteration": iteration,
            "lr": 1e-3 * min(1.0, (iteration + 1) / 10),
            "teacher_temp": 0.04 + 0.03 * min(1.0, iteration / 30),
            "images_per_s": 20.0,
        }
        for level in range(LEVELS):
            record[f"dino_loss_level{level}"] = (6.0 + level) * (0.4 + 0.6 * decay)
            record[f"ibot_loss_level{level}"] = (5.0 + level) * (0.5 + 0.5 * decay)
        record["dino_loss"] = sum(record[f"dino_loss_level{j}"] for j in range(LEVELS)) / LEVELS
        record["ibot_loss"] = sum(record[f"ibot_loss_level{j}"] for j in range(LEVELS)) / LEVELS
        record["koleo_loss"] = -0.5 * decay
        record["loss"] = record["dino_loss"] + record["ibot_loss"] + 0.1 * record["koleo_loss"]
        if iteration == 17:  # a skipped step logs NaN losses
            record["loss"] = float("nan")
            record["dino_loss_level2"] = float("nan")
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + '\n{"iteration": 40, "loss": 1.2')  # torn last line of a killed run


def _pca_like_image(seed: int, size: int = 16, scale: int = 8) -> Image.Image:
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(colours).resize((size * scale, size * scale), Image.NEAREST)


SUMMARY_ROWS = [
    {"metric": "k-NN top-1", "trained": 0.61234, "random_init": 0.20011},
    {"metric": "linear probe top-1", "trained": 0.7, "random init": 0.25},
    {"metric": "HummingBird mIoU", "trained": 0.18, "random_init": 0.31},
    {"metric": "position R² after RASA", "trained": 0.05, "random_init": 0.4, "higher_is_better": False},
]
# Cells as a reader should see them, written by hand from SUMMARY_ROWS (4 significant digits, signed deltas).
EXPECTED_SUMMARY = [
    ["metric", "trained", "random init", "delta"],
    ["k-NN top-1", "0.6123", "0.2001", "+0.4122"],
    ["linear probe top-1", "0.7", "0.25", "+0.45"],
    ["HummingBird mIoU", "0.18", "0.31", "-0.13"],
    ["position R² after RASA", "0.05", "0.4", "-0.35"],
]
SECTION_TABLE = [
    {"model": "trained", "dims": 192, "k-NN top-1": 0.5, "note": "<b>not bold</b>"},
    {"model": "random init", "dims": 12, "k-NN top-1": float("nan"), "note": "a & b"},
]
EXPECTED_SECTION_TABLE = [
    ["model", "dims", "k-NN top-1", "note"],
    ["trained", "192", "0.5", "<b>not bold</b>"],
    ["random init", "12", "\u2013", "a & b"],
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the full report once from synthetic inputs; return the HTML path and the plot paths."""
    out = tmp_path_factory.mktemp("report")
    log = out / "metrics.jsonl"
    _write_fake_training_log(log)
    loss_png = plot_loss_curves(log, out / "loss.png", level_dims=[12, 24, 48, 96, 192])
    dims = [12, 24, 48, 96, 192]
    sliced = {
        "trained": {
            "sliced": {d: 0.3 + 0.06 * i for i, d in enumerate(dims)},
            "pca": {str(d): 0.32 + 0.05 * i for i, d in enumerate(dims)},
        },
        "random init": {"sliced": {d: 0.1 + 0.02 * i for i, d in enumerate(dims)}, "pca": {}},
    }
    knn_png = plot_sliced_knn(sliced, out / "sliced.png")
    rasa = [{"iteration": 0, "r2": 0.92, "mse": 0.006}]
    rasa += [
        {"iteration": t, "r2": 0.92 * 0.5**t, "mse": 0.006 + 0.01 * t, "seconds": 1.0} for t in range(1, 6)
    ]
    rasa_png = plot_rasa_r2(rasa, out / "rasa.png")
    pca_a, pca_b = _pca_like_image(1), _pca_like_image(2)
    pca_a_path = out / "pca_a.png"
    pca_a.save(pca_a_path)
    pca_b_path = out / "pca_b.png"
    pca_b.save(pca_b_path)
    grid_png = plot_image_grid(
        [[pca_a, np.random.default_rng(3).random((8, 8, 3))], [pca_b_path, pca_b]],
        out / "grid.png",
        column_titles=["trained", "random init"],
        row_titles=["image 1", "image 2"],
    )
    sections = [
        ReportSection(
            "Training <losses>",
            text="Loss per level.\n\nSecond paragraph with <script>alert(1)</script> text.",
            images=[ReportImage(loss_png, "Training losses")],
        ),
        ReportSection(
            "Sliced k-NN",
            table=SECTION_TABLE,
            table_caption="k-NN by dims",
            images=[(knn_png, "k-NN top-1 vs dims")],
        ),
        ReportSection("RASA", images=[ReportImage(rasa_png, "RASA R² per iteration")]),
        ReportSection(
            "PCA feature maps",
            images=[
                ReportImage(pca_a_path, "PCA map A (file)", display_width=256, pixelated=True),
                ReportImage(pca_b, "PCA map B (PIL)", display_width=256, pixelated=True),
                ReportImage(grid_png, "grid"),
            ],
        ),
    ]
    facts = default_facts(total_time_s=125.0, seed=0)
    html_path = render_report(
        out / "report.html",
        title="Franca demo & report",
        summary_rows=SUMMARY_ROWS,
        sections=sections,
        facts=facts,
    )
    return {"html": html_path, "loss": loss_png, "sliced": knn_png, "rasa": rasa_png, "grid": grid_png}


EXPECTED_IMAGES = 6  # loss, sliced k-NN, RASA, two PCA maps, the grid


def test_html_tables_images_and_no_external_urls(built: dict[str, Path]) -> None:
    text = built["html"].read_text(encoding="utf-8")
    page = _parse(text)
    assert page.tables[0] == EXPECTED_SUMMARY
    assert page.tables[1] == EXPECTED_SECTION_TABLE
    classes = dict(page.cell_classes)
    assert "good" in classes["+0.4122"] and "good" in classes["+0.45"]
    assert "bad" in classes["-0.13"]  # lower mIoU than random init is worse
    assert "good" in classes["-0.35"]  # lower position R² is better (higher_is_better False)
    assert len(page.images) == EXPECTED_IMAGES
    for attributes in page.images:
        prefix = "data:image/png;base64,"
        assert attributes["src"].startswith(prefix)
        data = base64.b64decode(attributes["src"][len(prefix) :], validate=True)
        assert len(data) > 1000
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG"
            assert image.width >= 100 and image.height >= 100
    lowered = text.lower()
    assert "http://" not in lowered and "https://" not in lowered
    assert not any(value.lower().startswith(("http:", "https:", "//")) for value in page.attribute_values)
    # Text is escaped: no injected markup survives as tags.
    assert "<script" not in lowered and "<b>" not in lowered
    assert "&lt;script&gt;" in text and "Training &lt;losses&gt;" in text
    assert "<title>Franca demo &amp; report</title>" in text
    assert "total time" in text and "2 min 5.0 s" in text


def test_plots_are_drawn(built: dict[str, Path], tmp_path: Path) -> None:
    # Loss figure: 13 x 6.6 inches at 100 dpi, with many colours (5 levels x 2 panels, total, lr...), not blank.
    colours, pixels = _distinct_colours(built["loss"])
    assert pixels.shape == (660, 1300, 3)
    assert colours > 50
    # Each viridis level colour of the legend/curves appears (levels 0..4 sampled at 0.1 + 0.8 j / 4).
    from matplotlib import colormaps

    for level in range(LEVELS):
        rgb = np.round(np.array(colormaps["viridis"](0.1 + 0.8 * level / 4)[:3]) * 255).astype(int)
        assert np.any(np.all(np.abs(pixels.astype(int) - rgb) <= 2, axis=-1)), f"level {level} colour missing"
    for name in ("sliced", "rasa", "grid"):
        assert _distinct_colours(built[name])[0] > 20, name
    with pytest.raises(Exception, match="no records"):
        plot_loss_curves([], tmp_path / "empty.png")
    with pytest.raises(Exception, match="does not exist"):
        plot_loss_curves(tmp_path / "missing.jsonl", tmp_path / "missing.png")


def test_format_value_and_metrics_json(tmp_path: Path) -> None:
    assert format_value(0.123456) == "0.1235"
    assert format_value(123456.7) == "123457"
    assert format_value(0.00012345) == "1.23e-04"
    assert format_value(3) == "3" and format_value(3, signed=True) == "+3"
    assert format_value(-0.5, signed=True) == "-0.5"
    assert format_value(float("nan")) == "\u2013" and format_value(None) == "\u2013"
    assert format_value(np.float32(0.25)) == "0.25"
    path = write_metrics_json(
        tmp_path / "out" / "metrics.json",
        {"b": float("nan"), "a": {"2": np.float64(0.5), 1: [float("inf"), 1]}, "c": np.arange(3)},
    )
    text = path.read_text()
    assert json.loads(text) == {"a": {"1": [None, 1], "2": 0.5}, "b": None, "c": [0, 1, 2]}
    assert text.index('"a"') < text.index('"b"') < text.index('"c"')
    assert "NaN" not in text and "Infinity" not in text
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temporary file left behind


def test_unreadable_image_is_listed_not_fatal(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = tmp_path / "good.png"
    _pca_like_image(4).save(good)
    out = render_report(
        tmp_path / "r.html",
        title="t",
        summary_rows=[],
        sections=[ReportSection("s", images=[broken, good, tmp_path / "missing.png"])],
    )
    page = _parse(out.read_text())
    assert len(page.images) == 1
    assert "2 image(s) could not be embedded" in out.read_text()


def test_chromium_renders_tables_and_images(built: dict[str, Path], tmp_path: Path) -> None:
    report = built["html"]
    executable = browser.find_or_install_chromium()
    if executable is None:
        pytest.skip(f"headless Chromium is not available: {browser.last_failure_reason}")
    dom = browser.render_dom(report, executable=executable)
    page = _parse(dom)
    assert page.tables[0] == EXPECTED_SUMMARY
    assert page.tables[1] == EXPECTED_SECTION_TABLE
    assert len(page.images) == EXPECTED_IMAGES
    assert all(img["src"].startswith("data:image/png;base64,") for img in page.images)

    shot = browser.screenshot(report, tmp_path / "report.png", width=1280, height=1800, executable=executable)
    colours, pixels = _distinct_colours(shot)
    assert pixels.shape == (1800, 1280, 3)
    assert colours > 100  # text, table borders, the green/red cells and plots were painted
    # The green "better" cell background (#e6f4ea) of the summary table is on screen.
    assert np.any(np.all(pixels == np.array([0xE6, 0xF4, 0xEA]), axis=-1))


def test_missing_chromium_gives_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no chromium, no apt-get
    assert browser.find_or_install_chromium() is None
    assert "apt-get is not available" in browser.last_failure_reason
    assert browser.find_or_install_chromium(install=False) is None
    assert "installing it is turned off" in browser.last_failure_reason


class _Headings(HTMLParser):
    """The text of every <h1>/<h2>, the <style> text and the Content-Security-Policy, in page order."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.style = ""
        self.policy = ""
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag in ("h1", "h2"):
            self.headings.append("")
            self._open = tag
        elif tag == "style":
            self._open = tag
        elif tag == "meta" and attributes.get("http-equiv") == "Content-Security-Policy":
            self.policy = attributes.get("content") or ""

    def handle_data(self, data: str) -> None:
        if self._open in ("h1", "h2"):
            self.headings[-1] += data
        elif self._open == "style":
            self.style += data

    def handle_endtag(self, tag: str) -> None:
        if tag == self._open:
            self._open = None


def test_template_escapes_cells_and_shows_every_section(tmp_path: Path) -> None:
    hostile = "<script>alert('x')</script>"
    titles = ["Data & training", "k-NN <top-1>", "Empty section", hostile]
    sections = [
        ReportSection(titles[0], text="one"),
        ReportSection(titles[1], table=[{"cell": hostile, "value": 0.5}], table_caption='caption "quoted"'),
        ReportSection(titles[2]),
        ReportSection(
            titles[3], images=[ReportImage(_pca_like_image(5), 'x" onerror="alert(1)', display_width=64)]
        ),
    ]
    rows = [{"metric": hostile, "trained": 1, "random_init": 2, "note": "n"}]
    out = render_report(
        tmp_path / "r.html", title="T", summary_rows=rows, sections=sections, facts={"<k>": "<v>"}
    )
    text = out.read_text(encoding="utf-8")
    page, headings = _parse(text), _Headings()
    headings.feed(text)
    assert headings.headings == ["T", "Summary: trained vs random init", *titles]
    assert "<script" not in text.lower() and "&lt;script&gt;" in text
    # Parsed back, every cell shows the hostile string as text.
    assert page.tables[0] == [
        ["metric", "trained", "random init", "delta", "note"],
        [hostile, "1", "2", "-1", "n"],
    ]
    assert page.tables[1] == [["cell", "value"], [hostile, "0.5"]]
    assert dict(page.cell_classes)["-1"] == "num bad" and dict(page.cell_classes)["0.5"] == "num"
    # A quote in a caption cannot open a new attribute of the <img>.
    (image,) = page.images
    assert sorted(image) == ["alt", "src", "style"]
    assert image["alt"] == 'x" onerror="alert(1)' and image["style"] == "width: 64px"
    assert "<dt>&lt;k&gt;</dt><dd>&lt;v&gt;</dd>" in text
    assert headings.policy == "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    assert "td.good { color: #1a7f37;" in headings.style  # the stylesheet is inlined


def test_missing_jinja2_names_the_report_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from franca.report import html as report_html

    monkeypatch.setitem(sys.modules, "jinja2", None)  # as if it were not installed
    report_html._template.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match=r"pip install 'franca\[report\]'") as raised:
            render_report(tmp_path / "r.html", title="t", summary_rows=[], sections=[])
    finally:
        report_html._template.cache_clear()
    assert raised.value.name == "jinja2"
    assert not (tmp_path / "r.html").exists()
