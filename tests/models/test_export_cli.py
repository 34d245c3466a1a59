"""``franca export``: each format written from a checkpoint, read back by its library or franca, and the option
mistakes refused in one line."""

from __future__ import annotations

import pytest
import torch

from franca.cli import export as export_cli
from franca.cli import main
from franca.models import build_model
from franca.models.checkpoints import load_backbone, save_backbone
from franca.models.export import FORMATS


@pytest.fixture()
def checkpoint(tmp_path):
    model = build_model("vit_tiny", depth=1, img_size=42, num_register_tokens=2).eval()
    with torch.no_grad():
        model.pos_embed.normal_(generator=torch.Generator().manual_seed(0))
    return save_backbone(model, tmp_path / "backbone.safetensors"), model


def _features(model, size: tuple[int, int]) -> torch.Tensor:
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.forward_features(x)["x_norm_patchtokens"]


def test_the_parser_names_the_library_formats() -> None:
    assert export_cli.FORMATS == FORMATS


def test_safetensors_and_timm_exports_read_back(tmp_path, checkpoint, capsys) -> None:
    path, model = checkpoint
    out = tmp_path / "copy.safetensors"
    assert main(["export", "--checkpoint", str(path), "--format", "safetensors", "--out", str(out)]) == 0
    assert f"franca.load_backbone('{out}')" in capsys.readouterr().out
    torch.testing.assert_close(_features(load_backbone(out), (56, 28)), _features(model, (56, 28)))
    timm_out = tmp_path / "timm.safetensors"
    args = [
        "export",
        "--checkpoint",
        str(path),
        "--format",
        "timm",
        "--out",
        str(timm_out),
        "--img-size",
        "56x28",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "timm.create_model('vit_giant_patch14_reg4_dinov2', pretrained=True" in printed
    assert "exactly at 56x28 px" in printed


def test_onnx_export_from_the_command_line(tmp_path, checkpoint, capsys) -> None:
    pytest.importorskip("onnxruntime")
    path, model = checkpoint
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(path), "--format", "onnx", "--out", str(out)]) == 0
    assert "opset 17" in capsys.readouterr().out
    from franca.models.export import OnnxBackbone

    x = torch.randn(1, 3, 70, 28)
    with torch.no_grad():
        expected = model.forward_features(x)["x_norm_clstoken"]
    torch.testing.assert_close(OnnxBackbone(out)(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "timm", "--rasa", "head.pth"], "--rasa: the timm format has no place for a RASA head"),
        (["--format", "onnx", "--img-size", "224"], "--img-size applies to --format timm or hf"),
        (["--format", "hf", "--opset", "18"], "--opset applies to --format onnx only"),
    ],
)
def test_option_mistakes_are_one_line(tmp_path, checkpoint, capsys, extra: list[str], message: str) -> None:
    path, _ = checkpoint
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("franca export: error:") and message in err and len(err.splitlines()) == 1


def test_img_size_is_parsed_at_the_command_line(capsys) -> None:
    assert export_cli.image_size("518") == 518
    assert export_cli.image_size("518x392") == (518, 392)
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", "c.pth", "--format", "timm", "--out", "o", "--img-size", "big"])
    assert "HEIGHTxWIDTH" in capsys.readouterr().err
