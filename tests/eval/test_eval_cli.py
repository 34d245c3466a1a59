"""``franca eval knn / sliced-knn / linear / logreg`` end to end on a tiny backbone and generated ImageFolders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from franca.cli import main
from franca.cli.eval import PROTOCOLS
from franca.models import vit_tiny
from franca.models.checkpoints import save_backbone

COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 30)}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved vit_tiny(patch 8, 32 px) checkpoint and train (3 x 6 + 1 corrupt) / val (3 x 3) ImageFolder trees."""
    root = tmp_path_factory.mktemp("eval_cli")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    (root / "train" / "red" / "broken.png").write_bytes(b"not a png")
    checkpoint = save_backbone(vit_tiny(patch_size=8, img_size=32), root / "tiny.safetensors")
    return root, checkpoint


def output_of(workspace, protocol):
    return workspace[0] / "out" / protocol / f"{protocol}.json"


def run_protocol(workspace, protocol, *extra):
    root, checkpoint = workspace
    output = root / "out" / protocol
    argv = ["eval", protocol, "--checkpoint", str(checkpoint), "--train", str(root / "train")]
    argv += ["--val", str(root / "val"), "--size", "32", "--batch-size", "8", "--device", "cpu"]
    argv += ["--output-dir", str(output), *extra]
    with pytest.warns(UserWarning, match="unreadable"):
        status = main(argv)
    assert status == 0
    payload = json.loads((output / f"{protocol}.json").read_text())
    assert payload["protocol"] == protocol
    assert payload["checkpoint"] == str(checkpoint)
    assert payload["arguments"]["size"] == 32 and "timestamp" in payload
    return payload["metrics"], output


def test_knn_cli(workspace, capsys):
    metrics, _ = run_protocol(workspace, "knn", "--ks", "3", "20")
    assert set(metrics["k3"]) == {"top1", "top5", "k"} and metrics["k20"]["k"] == 18
    assert 0.0 <= metrics["k3"]["top1"] <= metrics["k3"]["top5"] <= 100.0
    assert (
        metrics["k20"]["top5"] == 100.0
    )  # all 18 train images vote, so each of the 3 classes is in the top 3
    assert metrics["num_train"] == 18 and metrics["num_test"] == 9 and metrics["feature_dim"] == 192
    assert metrics["skipped_train"] == 1 and metrics["skipped_val"] == 0
    captured = capsys.readouterr()
    assert "top1" in captured.out
    # the library logs the skipped file; the command line shows it on stderr, the tables alone go to stdout
    note = "franca: train features: skipped 1 unreadable image(s), used 18"
    assert note in captured.err.splitlines() and "unreadable" not in captured.out
    assert captured.out.rstrip().splitlines()[-1] == f"knn: results written to {output_of(workspace, 'knn')}"


def test_sliced_knn_cli(workspace):
    metrics, output = run_protocol(workspace, "sliced-knn", "--dims", "12", "48", "192", "--ks", "3")
    assert metrics["dims"] == [12, 48, 192]
    assert set(metrics["sliced"]) == {"12", "48", "192"} and set(metrics["pca"]) == {"12", "48", "192"}
    assert (output / "sliced-knn.png").read_bytes()[:4] == b"\x89PNG"


def test_linear_cli(workspace):
    metrics, _ = run_protocol(
        workspace,
        "linear",
        "--features",
        "cls1",
        "cls2+avgpool",
        "--lrs",
        "0.01",
        "0.1",
        "--epochs",
        "2",
        "--probe-batch-size",
        "8",
        "--holdout",
        "0.2",
    )
    assert metrics["best"]["feature_set"] in ("cls1", "cls2+avgpool") and metrics["best"]["lr"] in (0.01, 0.1)
    assert len(metrics["heads"]) == 4 and metrics["num_holdout"] == 3 and metrics["num_train"] == 15
    assert 0.0 <= metrics["top1"] <= 100.0


def test_linear_cli_with_augmentation(workspace):
    metrics, _ = run_protocol(
        workspace,
        "linear",
        "--features",
        "cls1",
        "--lrs",
        "0.1",
        "--epochs",
        "1",
        "--probe-batch-size",
        "8",
        "--augment",
    )
    assert metrics["augment"] is True and metrics["num_holdout"] == 3 and len(metrics["heads"]) == 1
    assert metrics["skipped_train"] == 1


def test_logreg_cli(workspace):
    metrics, _ = run_protocol(workspace, "logreg", "--c-values", "3", "--max-iter", "50")
    assert any(metrics["best_C"] == pytest.approx(c) for c in (1e-6, 10**-0.5, 1e5))
    assert len(metrics["sweep"]) == 3 and metrics["skipped_train"] == 1
    assert 0.0 <= metrics["top1"] <= 100.0


def test_size_not_multiple_of_patch_is_a_one_line_error(workspace, capsys):
    root, checkpoint = workspace
    argv = [
        "eval",
        "knn",
        "--checkpoint",
        str(checkpoint),
        "--train",
        str(root / "train"),
        "--val",
        str(root / "val"),
    ]
    assert main([*argv, "--size", "30", "--device", "cpu", "--output-dir", str(root / "bad")]) == 2
    assert "multiple of the patch size 8" in capsys.readouterr().err
    assert not (root / "bad" / "knn.json").exists()


def test_eval_without_protocol_prints_help(capsys):
    assert main(["eval"]) == 1
    assert "knn" in capsys.readouterr().out


def test_building_the_eval_parsers_imports_no_protocol_module():
    """``franca eval --help`` builds every protocol's parser from torch-free modules; a protocol's library module
    (and torch) is imported only when it runs."""
    import subprocess
    import sys

    code = (
        "import argparse, sys; import franca.cli.eval as e; e.add_arguments(argparse.ArgumentParser()); "
        "heavy = [m for m in sys.modules if m == 'torch' or m.startswith(('franca.eval.knn', 'franca.eval.common'))]; "
        "sys.exit(str(heavy) if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_protocol_module_has_its_options_and_run():
    import importlib

    for name, (module_name, _help) in PROTOCOLS.items():
        module = importlib.import_module(module_name)
        assert module_name.startswith("franca.cli.eval_protocols."), name
        assert callable(module.add_arguments) and callable(module.run), name
