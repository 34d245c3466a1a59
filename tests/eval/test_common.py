"""The evaluation library's shared plumbing: result files, tables, data sets, features and labels of a split, their
provenance, and no argument parsing or printing in franca.eval."""

from __future__ import annotations

import ast
import json
import types
from pathlib import Path

import pytest
import torch

import franca.eval
from franca.core.errors import ConfigError, DataError
from franca.core.io import ensure_output_dir
from franca.eval.common import (
    Provenance,
    classification_datasets,
    count_classes,
    dataset_classes,
    feature_rows,
    flatten_scalars,
    provenance_dict,
    split_features,
    write_results,
)
from franca.eval.output import format_table
from franca.features import Features

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


def test_feature_rows_read_tensors_or_the_named_token_of_features() -> None:
    cls, pooled = torch.randn(4, 3), torch.randn(4, 3)
    features = Features(targets=torch.tensor([2, 0, 1, 2]), cls=cls, pooled=pooled, num_skipped=1)
    rows, labels = feature_rows(features, None, "avgpool", "train")
    assert rows is pooled and labels.tolist() == [2, 0, 1, 2] and labels.dtype == torch.int64
    rows, labels = feature_rows(features, [1, 1, 1, 1], "cls", "train")  # given labels win
    assert rows is cls and labels.tolist() == [1, 1, 1, 1]
    rows, labels = feature_rows(cls, torch.tensor([0, 1, 0, 1], dtype=torch.int32), "cls", "val")
    assert rows is cls and labels.dtype == torch.int64
    with pytest.raises(ConfigError, match="the val labels are missing"):
        feature_rows(cls, None, "cls", "val")
    with pytest.raises(DataError, match="train features \\(4, 3\\) do not match their 3 labels"):
        feature_rows(cls, [0, 1, 0], "cls", "train")
    with pytest.raises(ConfigError, match="no 'patch'"):
        feature_rows(features, None, "patch", "train")


def test_class_counts_and_provenance() -> None:
    assert count_classes(torch.tensor([0, 4, 1]), torch.tensor([2, 6])) == 7
    assert (
        dataset_classes(types.SimpleNamespace(classes=["a", "b", "c"])) == 3
        and dataset_classes(object()) is None
    )
    train = Features(targets=torch.zeros(2), cls=torch.zeros(2, 1), num_skipped=3)
    val = Features(targets=torch.zeros(1), cls=torch.zeros(1, 1))
    assert Provenance.of("cls", train, val) == Provenance("cls", 3, 0)
    assert Provenance.of("cls", train.cls, val) is None and provenance_dict(None) == {}
    assert Provenance("cls", 3, 0).to_dict() == {"feature": "cls", "skipped_train": 3, "skipped_val": 0}
    assert Provenance(None, 1, 2).to_dict() == {"skipped_train": 1, "skipped_val": 2}


def test_split_features_extract_each_split_with_its_labels() -> None:
    from franca.models import vit_tiny

    model = vit_tiny(patch_size=8, img_size=16).eval()
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    train_set = torch.utils.data.TensorDataset(images[:3], torch.tensor([1, 0, 1]))
    val_set = torch.utils.data.TensorDataset(images[3:], torch.tensor([0, 0]))
    train, val = split_features(model, train_set, val_set, ("cls",), batch_size=2, progress=False)
    with torch.no_grad():
        expected = model.forward_features(images)["x_norm_clstoken"]
    assert torch.allclose(torch.cat([train.cls, val.cls]), expected, atol=1e-5)
    assert train.targets.tolist() == [1, 0, 1] and val.targets.tolist() == [0, 0]


def test_classification_datasets_need_the_same_class_folders(tmp_path: Path) -> None:
    from PIL import Image

    for split, names in (("train", ("cat", "dog")), ("val", ("cat", "cow"))):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "0.png")
    with pytest.raises(ConfigError, match=r"val: its class folders differ .*\['cow'\]"):
        classification_datasets(str(tmp_path / "train"), str(tmp_path / "val"), 16)
    train, val = classification_datasets(str(tmp_path / "train"), str(tmp_path / "train"), 16)
    assert list(train.classes) == ["cat", "dog"] and len(val) == 2
