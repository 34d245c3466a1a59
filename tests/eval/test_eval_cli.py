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
    assert list(metrics) == [
        *("k3", "k20", "num_train", "num_test", "num_classes", "feature_dim", "temperature", "backend"),
        *("feature", "skipped_train", "skipped_val"),
    ]
    assert metrics["feature"] == "cls" and metrics["temperature"] == 0.07 and metrics["num_classes"] == 3
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
    assert list(metrics) == [
        *("dims", "feature_dim", "ks", "sliced", "pca", "pca_explained_variance"),
        *("skipped_train", "skipped_val", "plot"),
    ]
    assert metrics["ks"] == [3] and set(metrics["sliced"]["12"]) >= {"k3", "num_train", "backend"}
    assert metrics["pca_explained_variance"]["192"] == pytest.approx(1.0)
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
    assert list(metrics) == [
        *("top1", "top5", "best", "selected_on", "heads", "num_train", "num_holdout", "num_val"),
        *("num_classes", "epochs", "batch_size", "augment", "skipped_train", "skipped_val"),
    ]
    assert list(metrics["heads"][0]) == [
        *("name", "feature_set", "lr", "scaled_lr", "selection_top1", "val_top1", "val_top5")
    ]
    assert [head["feature_set"] for head in metrics["heads"]] == [
        "cls1",
        "cls1",
        "cls2+avgpool",
        "cls2+avgpool",
    ]
    assert metrics["selected_on"] == "held-out 20% of train" and metrics["augment"] is False
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
    assert list(metrics) == [
        *("top1", "top5", "mean_per_class", "best_C", "selected_on", "selection_metric", "selection_score"),
        *("sweep", "not_converged", "normalize", "max_iter", "tol", "num_train", "num_holdout", "num_test"),
        *("num_classes", "feature_dim", "feature", "skipped_train", "skipped_val"),
    ]
    assert list(metrics["sweep"][0]) == ["C", "top1", "mean_per_class", "converged"]
    assert (metrics["max_iter"], metrics["tol"], metrics["normalize"]) == (50, 1e-12, "none")
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


@pytest.mark.parametrize(
    ("protocol", "options", "message"),
    [
        ("knn", ["--ks", "5", "0"], "every k (--ks) must be >= 1"),
        ("sliced-knn", ["--temperature", "0"], "temperature (--temperature) must be > 0"),
        ("linear", ["--features", "cls1", "avgpool"], "unknown linear feature set 'avgpool'"),
        ("linear", ["--holdout", "1.5"], "held-out fraction (--holdout) must be in [0, 1)"),
        ("logreg", ["--cs", "1", "-2"], "C values (--cs) must be a non-empty list of positive numbers"),
    ],
)
def test_bad_settings_stop_before_the_model_is_read(tmp_path, capsys, protocol, options, message):
    """The settings are checked when built, before the (here missing) checkpoint is opened."""
    argv = ["eval", protocol, "--checkpoint", str(tmp_path / "missing.safetensors")]
    argv += [
        "--train",
        str(tmp_path),
        "--val",
        str(tmp_path),
        "--output-dir",
        str(tmp_path / "out"),
        *options,
    ]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and "missing.safetensors" not in error


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
