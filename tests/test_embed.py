"""``franca embed`` end to end on generated images of every mode, with broken files among them."""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from franca.cli import main
from franca.core.errors import DataError
from franca.features.files import read_embedding_paths
from franca.models import vit_tiny
from franca.models.checkpoints import save_backbone


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
    assert read_embedding_paths(out) == paths
    lines = (tmp_path / "features.paths.jsonl").read_text(encoding="ascii").splitlines()
    assert [json.loads(line) for line in lines] == paths
    assert torch.isfinite(patch).all()


def test_embed_rows_match_a_direct_forward(tmp_path: Path, checkpoint: Path, image_folder: Path) -> None:
    from franca.data.images import load_image
    from franca.models.checkpoints import load_backbone

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
    names = [Path(json.loads(line)).name for line in (tmp_path / "cls.paths.jsonl").read_text().splitlines()]
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


def _png_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _embed(folder: Path, checkpoint: Path, out: Path, *extra: str) -> int:
    argv = ["embed", str(folder), "--checkpoint", str(checkpoint), "--out", str(out), "--size", "32"]
    return main([*argv, "--device", "cpu", "--batch-size", "2", *extra])


@pytest.mark.skipif(
    sys.platform != "linux", reason="file names that are not UTF-8 need a byte-name file system"
)
@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_embed_paths_round_trip_non_utf8_and_newline_names(
    tmp_path: Path, checkpoint: Path, capsys, suffix: str
) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    names = [b"bad\xff.png", b"new\nline.png", b"plain.png", "\u00e9t\u00e9.png".encode()]
    for index, name in enumerate(names):
        with open(os.fsencode(folder) + b"/" + name, "wb") as handle:
            handle.write(_png_bytes(index))
    with open(os.fsencode(folder) + b"/broken\xfe.jpg", "wb") as handle:
        handle.write(b"not an image")  # unreadable: its name is printed in the summary
    out = tmp_path / f"features{suffix}"
    with pytest.warns(UserWarning, match="unreadable"):
        assert _embed(folder, checkpoint, out, "--tokens", "cls,mean") == 0
    printed = capsys.readouterr().out
    assert "embedded 4 of 5 images (1 unreadable, skipped)" in printed
    assert "broken\\xfe.jpg" in printed  # shown escaped, not as a crash
    paths_file = tmp_path / "features.paths.jsonl"
    lines = paths_file.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 5  # one line per row, whatever the names hold
    rows = [json.loads(line) for line in lines[:-1]]
    assert sorted(os.fsencode(Path(row).name) for row in rows) == sorted(names)
    assert rows == read_embedding_paths(out)
    for row in rows:  # the exact bytes come back: the files can be opened with them
        assert os.path.isfile(os.fsencode(row))
    assert not (tmp_path / "features.paths.txt").exists()
    if suffix == ".npy":
        kinds = {kind: np.load(tmp_path / f"features.{kind}.npy") for kind in ("cls", "mean")}
    else:
        with safe_open(str(out), framework="np") as handle:
            kinds = {kind: handle.get_tensor(kind) for kind in ("cls", "mean")}
            assert json.loads(handle.metadata()["paths"]) == rows
    assert all(value.shape == (4, 192) for value in kinds.values())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_embed_failure_while_writing_leaves_the_previous_outputs_in_step(
    tmp_path: Path, checkpoint: Path, image_folder: Path, monkeypatch, capsys
) -> None:
    import franca.features.files

    out = tmp_path / "features.npy"
    with pytest.warns(UserWarning):
        assert _embed(image_folder, checkpoint, out) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert {"features.npy", "features.paths.jsonl"} <= set(before)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(franca.features.files, "_write_paths", fail)
    (image_folder / "nested" / "c_gray.jpg").unlink()  # the new run would have other rows
    capsys.readouterr()
    with pytest.warns(UserWarning):
        assert _embed(image_folder, checkpoint, out) == 2
    err = capsys.readouterr().err  # the progress bar also goes to stderr
    assert "Traceback" not in err and err.endswith("\n")
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(
        f"franca embed: error: {out.parent}: no space left to write"
    )
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # neither output replaced, no temporary file left


def test_read_embedding_paths_reads_the_old_text_list(tmp_path: Path) -> None:
    (tmp_path / "old.paths.txt").write_text("/data/a.png\n/data/b c.png\n")
    assert read_embedding_paths(tmp_path / "old.npy") == ["/data/a.png", "/data/b c.png"]
    with pytest.raises(DataError, match="new.paths.jsonl"):
        read_embedding_paths(tmp_path / "new.safetensors")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_embed_folder_with_a_fifo_named_like_an_image_finishes(
    tmp_path: Path, checkpoint: Path, capsys
) -> None:
    folder = tmp_path / "with_fifo"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png_bytes())
    fifo = folder / "x.jpg"
    os.mkfifo(fifo)
    out = tmp_path / "f.npy"
    outcome: dict[str, object] = {}

    def target() -> None:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            try:
                outcome["code"] = _embed(folder, checkpoint, out)
            except BaseException as error:
                outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(120)
    if thread.is_alive():  # unblock the reader stuck on the FIFO so the thread can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(30)
        pytest.fail("franca embed blocked on a FIFO in the input folder")
    assert outcome.get("code") == 0, outcome
    assert "embedded 1 of 1 images (0 unreadable, skipped)" in capsys.readouterr().out
    assert [Path(p).name for p in read_embedding_paths(out)] == ["a.png"]


def test_embed_runs_an_onnx_export_with_onnxruntime(tmp_path: Path, image_folder: Path) -> None:
    """`franca embed` on a .onnx file (runtime auto) gives the PyTorch features of the exported model to 1e-5."""
    pytest.importorskip("onnxruntime")
    from franca.models.formats.onnx_graph import export_onnx

    torch.manual_seed(0)
    model = vit_tiny(patch_size=8, img_size=32).eval()
    torch_ckpt = save_backbone(model, tmp_path / "tiny.safetensors")
    onnx_file = export_onnx(model, tmp_path / "tiny.onnx")
    assert _embed(image_folder, torch_ckpt, tmp_path / "torch.safetensors", "--tokens", "cls,mean") == 0
    assert _embed(image_folder, onnx_file, tmp_path / "onnx.safetensors", "--tokens", "cls,mean") == 0
    with (
        safe_open(str(tmp_path / "torch.safetensors"), framework="pt") as expected,
        safe_open(str(tmp_path / "onnx.safetensors"), framework="pt") as got,
    ):
        for key in ("cls", "mean"):
            assert torch.allclose(got.get_tensor(key), expected.get_tensor(key), atol=1e-5)
    rasa_argv = ["--runtime", "onnx", "--rasa", str(tmp_path / "head.pth")]
    assert _embed(image_folder, onnx_file, tmp_path / "x.npy", *rasa_argv) == 2
