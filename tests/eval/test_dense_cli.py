"""``franca eval hummingbird / linear-seg / overcluster / pca`` end to end on a tiny backbone export."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from franca.cli import main

SIZE = 32


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A vit_tiny(patch 8, 32 px) export and a plain-layout tree with train/ and val/ sub-folders."""
    import torch

    from franca.models import vit_tiny
    from franca.models.checkpoints import save_backbone

    base = tmp_path_factory.mktemp("dense_cli")
    torch.manual_seed(0)
    checkpoint = save_backbone(vit_tiny(patch_size=8, img_size=SIZE), base / "tiny.safetensors")
    rng = np.random.default_rng(0)
    data = base / "data"
    for split, count in (("train", 6), ("val", 4)):
        (data / "images" / split).mkdir(parents=True)
        (data / "masks" / split).mkdir(parents=True)
        for index in range(count):
            mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
            mask[8:24, 8 + index % 4 : 24] = 1 + index % 2  # an object of class 1 or 2 on background
            mask[0, :] = 255
            image = rng.integers(0, 60, (SIZE, SIZE, 3)).astype(np.uint8)
            image[mask == 1] += np.array([180, 20, 20], dtype=np.uint8)
            image[mask == 2] += np.array([20, 180, 20], dtype=np.uint8)
            Image.fromarray(image).save(data / "images" / split / f"{split}{index}.png")
            Image.fromarray(mask, mode="L").save(data / "masks" / split / f"{split}{index}.png")
    return {"checkpoint": checkpoint, "data": data, "base": base}


def _run(argv: list[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(argv)


def _common(setup: dict[str, Path], out: Path) -> list[str]:
    return [
        "--checkpoint",
        str(setup["checkpoint"]),
        "--size",
        str(SIZE),
        "--device",
        "cpu",
        "--output-dir",
        str(out),
    ]


def test_hummingbird_cli_writes_results(tiny_setup, tmp_path: Path, capsys) -> None:
    data = str(tiny_setup["data"])
    argv = [
        "eval",
        "hummingbird",
        *_common(tiny_setup, tmp_path),
        "--train",
        data,
        "--val",
        data,
        "--batch-size",
        "4",
    ]
    assert _run(argv) == 0
    payload = json.loads((tmp_path / "hummingbird.json").read_text())
    assert payload["protocol"] == "hummingbird"
    metrics = payload["metrics"]
    assert 0.0 <= metrics["miou"] <= 100.0
    assert metrics["num_train_images"] == 6 and metrics["num_val_images"] == 4 and metrics["num_classes"] == 3
    assert metrics["memory_patches_total"] == 6 * 16 and metrics["k"] == 30 and metrics["temperature"] == 0.02
    assert metrics["train_data"]["layout"] == "plain" and metrics["val_data"]["split"] == "val"
    assert payload["arguments"]["checkpoint"] == str(tiny_setup["checkpoint"])
    printed = capsys.readouterr().out.splitlines()  # the metric table, then where the results went
    assert printed[0] == f"hummingbird ({tiny_setup['checkpoint']})" and printed[1].split() == [
        "metric",
        "value",
    ]
    assert any(line.split()[:1] == ["miou"] for line in printed)
    assert printed[-1] == f"hummingbird: results written to {tmp_path / 'hummingbird.json'}"


def test_linear_seg_and_overcluster_cli(tiny_setup, tmp_path: Path) -> None:
    data = str(tiny_setup["data"])
    argv = ["eval", "linear-seg", *_common(tiny_setup, tmp_path / "ls"), "--train", data, "--val", data]
    assert _run([*argv, "--epochs", "2", "--train-batch-size", "3", "--save-head"]) == 0
    metrics = json.loads((tmp_path / "ls" / "linear-seg.json").read_text())["metrics"]
    assert (
        0.0 <= metrics["miou"] <= 100.0 and len(metrics["train_loss"]) == 2 and metrics["feature_dim"] == 192
    )
    assert (tmp_path / "ls" / "linear_seg_head.pt").is_file()

    argv = ["eval", "overcluster", *_common(tiny_setup, tmp_path / "oc"), "--val", data]
    assert (
        _run(
            [
                *argv,
                "--clusters",
                "3",
                "8",
                "--seeds",
                "2",
                "--pca-dim",
                "8",
                "--kmeans-iters",
                "10",
                "--kmeans-redo",
                "1",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "oc" / "overcluster.json").read_text())["metrics"]
    assert set(metrics) >= {"k3", "k8", "seeds", "num_patches"}
    assert metrics["seeds"] == [0, 1] and metrics["num_patches"] == 4 * 16 and metrics["pca_dim"] == 8
    assert metrics["k3"]["matching"] == "hungarian" and metrics["k8"]["matching"] == "greedy"
    assert len(metrics["k8"]["miou_per_seed"]) == 2 and metrics["mask_size"] == SIZE


def test_pca_cli_writes_png(tiny_setup, tmp_path: Path) -> None:
    images = str(tiny_setup["data"] / "images" / "val")
    argv = [
        "eval",
        "pca",
        *_common(tiny_setup, tmp_path),
        "--images",
        images,
        "--foreground-threshold",
        "0.5",
    ]
    assert _run(argv) == 0
    metrics = json.loads((tmp_path / "pca.json").read_text())["metrics"]
    assert metrics["num_images"] == 4 and Path(metrics["grid"]).is_file()
    with Image.open(metrics["grid"]) as grid:
        assert grid.size == (2 * SIZE + 3 * 4, 4 * SIZE + 5 * 4)


def test_cli_reports_inconsistent_data_in_one_line(tiny_setup, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "masks").mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), dtype=np.uint8)).save(bad / "images" / "a.png")
    Image.fromarray(np.zeros((SIZE // 2, SIZE), dtype=np.uint8), mode="L").save(bad / "masks" / "a.png")
    argv = [
        "eval",
        "overcluster",
        *_common(tiny_setup, tmp_path / "out"),
        "--val",
        str(bad),
        "--num-classes",
        "2",
    ]
    assert _run(argv) == 2
    error = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("franca")
    ]  # not progress bars
    assert (
        len(error) == 1 and "masks/a.png" in error[0] and "images/a.png" in error[0] and "32x16" in error[0]
    )
    data = str(tiny_setup["data"])
    argv = [
        "eval",
        "hummingbird",
        *_common(tiny_setup, tmp_path),
        "--train",
        data,
        "--val",
        data,
        "--size",
        "30",
    ]
    assert _run(argv) == 2  # not a multiple of the patch size
    assert "multiple of the patch size" in capsys.readouterr().err


def test_size_defaults_to_the_resolution_the_checkpoint_records(tiny_setup, tmp_path: Path) -> None:
    """Without --size the model trained at 32 px is evaluated at 32 px (not 224: 7x upsampled images)."""
    data = str(tiny_setup["data"])
    common = [arg for arg in _common(tiny_setup, tmp_path) if arg not in ("--size", str(SIZE))]
    assert _run(["eval", "hummingbird", *common, "--train", data, "--val", data]) == 0
    metrics = json.loads((tmp_path / "hummingbird.json").read_text())["metrics"]
    assert metrics["size"] == SIZE and metrics["val_data"]["size"] == SIZE
    assert metrics["memory_patches_total"] == 6 * (SIZE // 8) ** 2  # a 4 x 4 grid per train image
