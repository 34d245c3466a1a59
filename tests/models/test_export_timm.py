"""timm in and out: exports that timm's own DINOv2 ViT loads with no missing key and that give franca's features, and
timm state dicts that franca.load_backbone reads. Everything is built locally (no download)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from franca.core.errors import CheckpointError, ConfigError
from franca.models import build_model
from franca.models.checkpoints import load_backbone
from franca.models.export import export_backbone

timm = pytest.importorskip("timm")

TIMM_RESIZE = {"interpolate_offset": 0.0, "interpolate_antialias": True}  # timm's run-time position resize


def _random(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return module.eval()


def _franca(ffn: str, registers: int, **options) -> torch.nn.Module:
    model = build_model(
        "vit_tiny", depth=2, img_size=56, ffn_layer=ffn, num_register_tokens=registers, **options
    )
    return _random(model)


def _assert_same(timm_model, model, height: int, width: int) -> None:
    """timm's forward_features [B, 1+R+N, D] against franca's dict, token by token, within 1e-5."""
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height * width))
    with torch.no_grad():
        tokens = timm_model.forward_features(x)
        ours = model.forward_features(x)
    first = 1 + model.num_register_tokens
    torch.testing.assert_close(tokens[:, 0], ours["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 1:first], ours["x_norm_regtokens"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, first:], ours["x_norm_patchtokens"], atol=1e-5, rtol=1e-5)


def _timm_from(export) -> torch.nn.Module:
    """timm's model of an export, built from the name and keywords the export states, weights loaded strictly."""
    reference = timm.create_model(
        export.details["model"], pretrained=False, **export.details["kwargs"]
    ).eval()
    result = reference.load_state_dict(load_file(export.path), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return reference


@pytest.mark.parametrize(("ffn", "registers"), [("mlp", 0), ("swiglu", 0), ("mlp", 4), ("swiglu", 2)])
def test_timm_gives_franca_features_at_every_size(tmp_path, ffn: str, registers: int) -> None:
    model = _franca(ffn, registers, layerscale_init=1e-5, **TIMM_RESIZE)
    export = export_backbone(model, tmp_path / "timm.safetensors", "timm")
    assert export.exact_size is None  # the model resizes as timm does
    assert ("reg4" in export.details["model"]) == bool(registers)
    assert ("giant" in export.details["model"]) == (ffn == "swiglu")
    reference = _timm_from(export)
    for height, width in [(56, 56), (70, 98), (42, 28)]:
        _assert_same(reference, model, height, width)


def test_a_model_that_resizes_otherwise_is_exact_at_the_stored_size(tmp_path) -> None:
    model = _franca("swiglu", 2)  # franca's default resize: bicubic with the 0.1 offset, no antialias
    export = export_backbone(model, tmp_path / "timm.safetensors", "timm", img_size=(70, 98))
    assert export.exact_size == (70, 98)
    assert export.details["kwargs"]["img_size"] == [70, 98]
    # loaded the way a timm user loads a file: timm's pretrained path with its checkpoint filter
    reference = timm.create_model(
        export.details["model"],
        pretrained=True,
        pretrained_cfg_overlay={"file": str(export.path)},
        **export.details["kwargs"],
    ).eval()
    _assert_same(reference, model, 70, 98)
    with pytest.raises(CheckpointError, match="rectangular input"):  # franca keeps square grids
        load_backbone(export.path)
    native = export_backbone(model, tmp_path / "native.safetensors", "timm")
    assert native.exact_size == (56, 56)
    _assert_same(_timm_from(native), model, 56, 56)
    x = torch.randn(1, 3, 84, 84)
    with torch.no_grad():  # elsewhere timm resizes by its own rule, which is why the export states the size
        gap = (
            _timm_from(native).forward_features(x)[:, 3:] - model.forward_features(x)["x_norm_patchtokens"]
        ).abs()
    assert gap.max() > 1e-4


def test_the_export_states_its_timm_model_and_reads_back_into_franca(tmp_path) -> None:
    # timm's one proj_bias flag: zero biases stand in; no LayerScale: timm's init_values=None
    model = _franca("mlp", 4, proj_bias=False, layerscale_init=None)
    export = export_backbone(model, tmp_path / "timm.safetensors", "timm")
    with safe_open(str(export.path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["timm_model"] == "vit_small_patch14_reg4_dinov2"
    assert json.loads(metadata["timm_kwargs"]) == export.details["kwargs"]
    assert export.details["kwargs"]["proj_bias"] is True and not export.details["kwargs"]["init_values"]
    _assert_same(_timm_from(export), model, 56, 56)
    back = load_backbone(export.path)
    x = torch.randn(2, 3, 70, 42)
    with torch.no_grad():
        torch.testing.assert_close(
            back.forward_features(x)["x_norm_patchtokens"], model.forward_features(x)["x_norm_patchtokens"]
        )


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("vit_small_patch14_reg4_dinov2", {}),
        ("vit_small_patch14_reg4_dinov2", {"no_embed_class": False}),  # registers with positions
        ("vit_giant_patch14_dinov2", {"embed_dim": 192, "num_heads": 3}),
        ("vit_giant_patch14_reg4_dinov2", {"embed_dim": 192, "num_heads": 3}),
    ],
)
def test_load_backbone_reads_timm_state_dicts(name: str, extra: dict) -> None:
    reference = timm.create_model(
        name, pretrained=False, img_size=56, depth=2, num_classes=5, dynamic_img_size=True, **extra
    )
    reference = _random(reference)  # with a classifier head, which the backbone drops
    model = load_backbone(reference.state_dict())
    assert model.config.interpolate_offset == 0.0 and model.config.interpolate_antialias
    assert model.config.ffn_layer == ("swiglu" if "giant" in name else "mlp")
    for height, width in [(56, 56), (98, 70)]:
        _assert_same(reference, model, height, width)


def test_timm_mlp_models_without_registers_have_the_official_layout() -> None:
    reference = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=56, depth=2, dynamic_img_size=True
    )
    reference = _random(reference)
    model = load_backbone(reference.state_dict())  # indistinguishable from an official file: official resize
    _assert_same(reference, model, 56, 56)
    model = load_backbone(reference.state_dict(), **TIMM_RESIZE)  # timm's resize, asked for
    _assert_same(reference, model, 70, 98)


def test_img_size_must_be_a_multiple_of_the_patch(tmp_path) -> None:
    with pytest.raises(ConfigError, match="multiple of the patch size 14"):
        export_backbone(_franca("mlp", 0), tmp_path / "t.safetensors", "timm", img_size=100)
    with pytest.raises(ConfigError, match=".safetensors"):
        export_backbone(_franca("mlp", 0), tmp_path / "t.pth", "timm")


def test_the_top_level_franca_api_exports_for_timm(tmp_path) -> None:
    import franca

    model = _franca("swiglu", 2)
    export = franca.export_backbone(model, tmp_path / "top.safetensors", "timm")
    _assert_same(_timm_from(export), model, 56, 56)  # timm's own model gives franca's features
