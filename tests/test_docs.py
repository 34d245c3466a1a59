"""Every reference to a project document (``docs/<name>.md``) points at a file, and every cited section exists.

A reference is ``docs/`` + a file name ending in ``.md``, in any text file (.py .md .yaml .txt .sh) of src/, tests/,
benchmarks/, configs/, docs/ or README.md, optionally followed (after an optional comma) by a quoted section title
(``"Project defaults"``) and/or a section number: ``§4.3``, ``section 8`` or ``sections 4-8``. Section numbers follow
one convention in every document: a Markdown heading that starts with the number and a dot or a space
(``## 4. Title``, ``### 4.3 Title``). A quoted title must appear in one of the document's headings.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEARCHED = ("src", "tests", "benchmarks", "configs", "docs", "README.md")
SUFFIXES = {".py", ".md", ".yaml", ".txt", ".sh"}
SKIPPED_DIRS = {"__pycache__", "out"}  # benchmarks/out: ignored benchmark output

_NUMBER = r"\d+(?:\.\d+)*"
# "docs/" not preceded by a path or word character (so URLs such as https://host/docs/x.md are not references),
# optionally behind "./" or "../" (relative links); closing quotes or backticks may follow the name.
REFERENCE = re.compile(
    r"(?<![\w./-])(?:\.\.?/)*docs/(?P<name>[\w-]+(?:\.[\w-]+)*)\.md\b[`'\"]*"
    r"(?:,?\s*\"(?P<title>[^\"\n]+)\")?"
    rf"(?:,?\s*(?:§\s*|sections?\s+)(?P<first>{_NUMBER})(?:\s*[-–]\s*(?P<last>{_NUMBER}))?)?"
)
HEADING = re.compile(r"^#{1,6}\s+(?P<text>.+?)\s*$", re.MULTILINE)


def _text_files() -> list[Path]:
    files = []
    for entry in SEARCHED:
        path = ROOT / entry
        if path.is_file():
            files.append(path)
            continue
        for item in sorted(path.rglob("*")) if path.is_dir() else []:
            parts = item.relative_to(ROOT).parts[:-1]
            if any(p in SKIPPED_DIRS or p.startswith(".") or p.endswith(".egg-info") for p in parts):
                continue
            if item.is_file() and item.suffix in SUFFIXES:
                files.append(item)
    return files


def _references() -> list[tuple[str, str, str | None, str | None, str | None]]:
    """(where, document name, quoted title, first section number, last section number) for every reference."""
    found = []
    for path in _text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in REFERENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            where = f"{path.relative_to(ROOT)}:{line}"
            found.append((where, match["name"], match["title"], match["first"], match["last"]))
    return found


def _headings(name: str) -> list[str]:
    return [m["text"] for m in HEADING.finditer((ROOT / "docs" / f"{name}.md").read_text(encoding="utf-8"))]


def _has_numbered_heading(headings: list[str], number: str) -> bool:
    pattern = re.compile(rf"^{re.escape(number)}(?:\.(?!\d)|\s)")
    return any(pattern.match(text) for text in headings)


def test_references_are_found() -> None:
    """The scan itself works: the project cites its documents, with and without sections."""
    references = _references()
    assert len(references) > 10
    assert any(first is not None for _, _, _, first, _ in references)


def test_pattern_reads_the_reference_forms() -> None:
    doc = "docs" + "/example.md"
    cases = {
        f"see ``{doc}`` §4.3.": ("example", None, "4.3", None),
        f"({doc}, section 8)": ("example", None, "8", None),
        f"in [{doc}](../{doc}), sections 4-8": ("example", None, None, None),
        f"({doc}, sections 4-8)": ("example", None, "4", "8"),
        f'({doc}, "Project defaults", §4.3):': ("example", "Project defaults", "4.3", None),
        f"{doc} explains": ("example", None, None, None),
    }
    for text, expected in cases.items():
        match = REFERENCE.search(text)
        assert match is not None, text
        assert (match["name"], match["title"], match["first"], match["last"]) == expected, text
    assert REFERENCE.search("https://pytorch.org/" + doc) is None
    assert _has_numbered_heading(["4. Augmentations", "4.3 Per-size values"], "4.3")
    assert _has_numbered_heading(["4. Augmentations"], "4")
    assert not _has_numbered_heading(["4.3 Per-size values"], "4")
    assert not _has_numbered_heading(["14. Other"], "4")


@pytest.mark.parametrize("reference", _references(), ids=lambda r: f"{r[0]}->{r[1]}")
def test_reference_resolves(reference: tuple[str, str, str | None, str | None, str | None]) -> None:
    where, name, title, first, last = reference
    document = ROOT / "docs" / f"{name}.md"
    assert document.is_file(), f"{where} cites docs/{name}.md, which is not in the repository"
    headings = _headings(name)
    if title is not None:
        assert any(title.lower() in text.lower() for text in headings), (
            f'{where} cites the section "{title}" of docs/{name}.md, which has no such heading'
        )
    for number in (first, last):
        if number is not None:
            assert _has_numbered_heading(headings, number), (
                f"{where} cites section {number} of docs/{name}.md, which has no heading numbered '{number}.'"
            )
