"""``franca embed`` end to end on generated images of every mode, with broken files among them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from franca.checkpoints import save_backbone
from franca.cli import main
from franca.models import vit_tiny


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_backbone(vit_tiny(patch_size=8, img_size=32), tmp_path / "tiny.safetensors")


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "nested" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "a_rgb.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "b_rgba.png")
    Image.fromarray(rgb).convert("L").save(root / "nested" / "c_gray.jpg")
    Image.fromarray(rgb).convert("P").save(root / "nested" / "d_palette.gif")
    Image.fromarray(rgb).convert("CMYK").save(root / "nested" / "e_cmyk.jpg")
    Image.fromarray((rng.integers(0, 4096, (30, 30))).astype(np.uint16)).save(
        root / "nested" / "deeper" / "f_16bit.png"
    )
    (root / "g_broken.jpg").write_bytes(b"not an image at all")
    (root / "h_empty.png").write_bytes(b"")
    full = root / "a_rgb.png"
    (root / "i_truncated.png").write_bytes(full.read_bytes()[:200])
    (root / "notes.txt").write_text("not an image")
    return root


def test_embed_folder_writes_features_and_paths(
    tmp_path: Path, checkpoint: Path, image_folder: Path, capsys
) -> None:
    out = tmp_path / "features.safetensors"
    code = main(
        [
            "embed",
            str(image_folder),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--size",
            "32",
            "--batch-size",
            "3",
            "--tokens",
            "cls,patch,mean",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "embedded 6 of 9 images (3 unreadable, skipped)" in printed
    with safe_open(str(out), framework="pt") as handle:
        paths = json.loads(handle.metadata()["paths"])
        cls, patch, mean = handle.get_tensor("cls"), handle.get_tensor("patch"), handle.get_tensor("mean")
    assert cls.shape == (6, 192) and patch.shape == (6, 16, 192)
    torch.testing.assert_close(mean, patch.mean(dim=1))
    # sorted by path components: nested/deeper/ comes before nested/e_cmyk.jpg
    assert [Path(p).name for p in paths] == [
        "a_rgb.png",
        "b_rgba.png",
        "c_gray.jpg",
        "d_palette.gif",
        "f_16bit.png",
        "e_cmyk.jpg",
    ]
    assert (tmp_path / "features.paths.txt").read_text().splitlines() == paths
    assert torch.isfinite(patch).all()


def test_embed_rows_match_a_direct_forward(tmp_path: Path, checkpoint: Path, image_folder: Path) -> None:
    from franca.checkpoints import load_backbone
    from franca.data.images import load_image

    out = tmp_path / "cls.npy"
    assert (
        main(
            [
                "embed",
                str(image_folder / "a_rgb.png"),
                str(image_folder / "nested" / "*.jpg"),
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(out),
                "--size",
                "32",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    features = np.load(out)
    names = [Path(p).name for p in (tmp_path / "cls.paths.txt").read_text().splitlines()]
    assert names == ["a_rgb.png", "c_gray.jpg", "e_cmyk.jpg"]
    # independent preprocessing: shorter side to round(32*256/224)=37 bicubic, center crop 32, ImageNet normalisation
    image = load_image(image_folder / "nested" / "c_gray.jpg")
    w, h = image.size
    scale = 37 / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    left, top = (image.width - 32) // 2, (image.height - 32) // 2
    array = np.asarray(image.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255
    array = (array - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    x = torch.from_numpy(array.transpose(2, 0, 1)).float()[None]
    with torch.no_grad():
        expected = load_backbone(checkpoint)(x)[0].numpy()
    np.testing.assert_allclose(features[1], expected, atol=0.05)


def test_embed_errors_are_one_line(tmp_path: Path, checkpoint: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["embed", str(empty), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no images found" in err and len(err.splitlines()) == 1
    (empty / "x.png").write_bytes(b"")
    assert (
        main(
            [
                "embed",
                str(empty),
                "--checkpoint",
                str(tmp_path / "missing.pth"),
                "--out",
                str(tmp_path / "x.npy"),
            ]
        )
        == 2
    )
    assert "missing.pth" in capsys.readouterr().err
