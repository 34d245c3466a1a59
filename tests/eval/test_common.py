"""The evaluation library's shared plumbing: result files, tables, and no argument parsing or printing in franca.eval."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import franca.eval
from franca.core.errors import ConfigError
from franca.core.io import ensure_output_dir
from franca.eval.common import flatten_scalars, write_results
from franca.eval.output import format_table

EVAL_SOURCES = sorted(Path(franca.eval.__file__).parent.glob("*.py"))


def test_write_results_writes_the_json_and_prints_nothing(tmp_path: Path, capsys) -> None:
    results = {"k20": {"top1": torch.tensor(81.5), "top5": 95.0}, "bad": float("nan")}
    path = write_results(results, tmp_path / "out", "knn", {"checkpoint": "model.pth", "_private": 1})
    assert capsys.readouterr() == ("", "")
    payload = json.loads(path.read_text())
    assert path == tmp_path / "out" / "knn.json" and payload["protocol"] == "knn"
    assert payload["checkpoint"] == "model.pth" and payload["arguments"] == {"checkpoint": "model.pth"}
    assert payload["metrics"] == {"k20": {"top1": 81.5, "top5": 95.0}, "bad": None}


def test_write_results_reads_a_namespace_of_options(tmp_path: Path) -> None:
    import argparse

    args = argparse.Namespace(checkpoint="c.safetensors", size=32, _eval_parser=object())
    payload = json.loads(write_results({"miou": 1.0}, tmp_path, "pca", args).read_text())
    assert payload["arguments"] == {"checkpoint": "c.safetensors", "size": 32}


def test_flatten_scalars_and_format_table() -> None:
    flat = flatten_scalars({"k20": {"top1": 81.25, "k": 20}, "heads": [1, 2], "name": "x", "ok": True})
    assert flat == {"k20/top1": 81.25, "k20/k": 20, "name": "x"}
    table = format_table(
        [{"metric": key, "value": value} for key, value in flat.items()], ["metric", "value"]
    )
    assert table.splitlines() == [
        "metric    value",
        "--------  -----",
        "k20/top1  81.25",
        "k20/k     20",
        "name      x",
    ]


def test_ensure_output_dir_names_the_file_in_the_way(tmp_path: Path) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=f"--out {a_file / 'sub'}: {a_file} is a file; give a folder"):
        ensure_output_dir(a_file / "sub", option="--out")
    assert ensure_output_dir(tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize("path", EVAL_SOURCES, ids=lambda path: path.name)
def test_the_eval_library_neither_parses_arguments_nor_prints(path: Path) -> None:
    """Only the command line (franca.cli.eval_protocols) parses arguments and prints; the library logs."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert "argparse" not in [alias.name for alias in node.names], path
        if isinstance(node, ast.ImportFrom):
            assert node.module != "argparse" and not (node.module or "").startswith("franca.cli"), path
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "print", f"{path.name}:{node.lineno} prints"
        if isinstance(node, ast.FunctionDef):
            assert node.name not in ("add_arguments", "run"), f"{path.name}: {node.name}"


def test_the_defaults_and_output_modules_import_no_torch() -> None:
    """The CLI builds its parsers from these two modules, so they must stay cheap to import."""
    import subprocess
    import sys

    code = (
        "import sys, franca.eval.defaults, franca.eval.output, franca.cli.options; "
        "sys.exit('torch' in sys.modules or 'numpy' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
