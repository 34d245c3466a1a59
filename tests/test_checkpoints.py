"""Loading every checkpoint layout users meet, and one clear error for every broken one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from franca.checkpoints import load_backbone, read_state_dict, resample_pos_embed, save_backbone
from franca.errors import CheckpointError
from franca.models import build_model


class _NotATensor:
    """A custom class: unpickling it would run arbitrary code paths, so loading must refuse it."""


def _reference_model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(3)
    options = {"embed_dim": 128, "depth": 4, "num_heads": 2, "patch_size": 8, "img_size": 32}
    options.update(kwargs)
    model = build_model("vit_tiny", **options).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _official_release_layout(model: torch.nn.Module, chunks: int = 4) -> dict:
    """The v1.0.0 file layout: {"teacher": {...}} with module./backbone. prefixes, chunked blocks and heads."""
    depth = len(model.blocks)
    per_chunk = depth // chunks
    teacher = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            rest = key.split(".", 2)[2]
            key = f"blocks.{index // per_chunk}.{index}.{rest}"
        teacher[f"module.backbone.{key}"] = value.clone()
    teacher["module.dino_head.mlps.0.0.weight"] = torch.randn(16, 8)
    teacher["module.ibot_head.last_layers.0.weight_g"] = torch.ones(32, 1)
    teacher["module.rasa_head.pos_pred.weight"] = torch.randn(2, 128)
    return {"teacher": teacher}


def _features(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.forward_features(x)


def _assert_same_features(a: torch.nn.Module, b: torch.nn.Module, size: int = 32) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    fa, fb = _features(a, x), _features(b, x)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(fa[key], fb[key], rtol=0, atol=0)


def test_official_release_layout_loads_exactly(tmp_path: Path) -> None:
    model = _reference_model(ffn_layer="swiglu")
    path = tmp_path / "franca_vitb14_In21K.pth"
    torch.save(_official_release_layout(model), path)
    loaded = load_backbone(path, num_heads=2)
    assert loaded.config.ffn_layer == "swiglu" and loaded.n_blocks == 4 and loaded.patch_size == 8
    assert loaded.config.ffn_hidden_dim == model.config.resolved_ffn_hidden_dim()
    _assert_same_features(model, loaded)


def test_rasa_tensors_of_a_release_file_attach_on_request(tmp_path: Path) -> None:
    pytest.importorskip("franca.rasa")
    model = _reference_model()
    state = _official_release_layout(model)
    state["teacher"] = {k: v for k, v in state["teacher"].items() if "rasa_head" not in k}
    for i in range(3):
        state["teacher"][f"module.rasa_head.pre_pos_layers.{i}.weight"] = torch.randn(2, 128)
    state["teacher"]["module.rasa_head.pos_pred.weight"] = torch.randn(2, 128)
    loaded = load_backbone(state, rasa=True, num_heads=2)
    assert "x_norm_patchtokens_rasa" in _features(loaded, torch.randn(1, 3, 32, 32))


def test_backbone_only_flat_release_and_dinov2_layouts(tmp_path: Path) -> None:
    for ffn, registers in (("swiglu", 0), ("mlp", 0), ("mlp", 4)):
        model = _reference_model(ffn_layer=ffn, num_register_tokens=registers)
        path = tmp_path / f"flat_{ffn}_{registers}.pth"
        torch.save(model.state_dict(), path)
        loaded = load_backbone(path, num_heads=2)
        assert loaded.config.ffn_layer == ffn and loaded.num_register_tokens == registers
        _assert_same_features(model, loaded)


def test_state_dict_source_and_grid_inference() -> None:
    model = _reference_model(img_size=48)  # a 6x6 grid, as a 518-px release has 37x37
    loaded = load_backbone(model.state_dict(), num_heads=2)
    assert loaded.grid_size == 6 and loaded.config.img_size == 48
    _assert_same_features(model, loaded, size=32)


def test_export_round_trip_keeps_architecture(tmp_path: Path) -> None:
    model = _reference_model(num_register_tokens=2, ffn_layer="mlp")
    path = save_backbone(model, tmp_path / "export.safetensors")
    loaded = load_backbone(path)  # num_heads comes from the stored metadata
    assert loaded.config == model.config
    _assert_same_features(model, loaded)
    assert not list(tmp_path.glob("*.tmp"))


def test_export_round_trip_with_rasa_matrix(tmp_path: Path) -> None:
    model = _reference_model()
    matrix = torch.eye(128) - 0.5 * torch.outer(torch.ones(128), torch.ones(128)) / 128
    model.set_rasa(matrix)
    loaded = load_backbone(save_backbone(model, tmp_path / "with_rasa.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    out = _features(loaded, x)
    torch.testing.assert_close(out["x_norm_patchtokens_rasa"], out["x_norm_patchtokens"] @ matrix.T)


def test_img_size_override_resamples_positions() -> None:
    model = _reference_model(img_size=32)
    loaded = load_backbone(model.state_dict(), num_heads=2, img_size=64)
    assert loaded.grid_size == 8
    expected = resample_pos_embed(model.pos_embed.detach(), 8)
    torch.testing.assert_close(loaded.pos_embed.detach(), expected)
    # corners of the resampled grid stay close to the original corners (a smooth resize, not a shuffle)
    old = model.pos_embed.detach()[0, 1:].reshape(4, 4, -1)
    new = loaded.pos_embed.detach()[0, 1:].reshape(8, 8, -1)
    assert torch.linalg.norm(new[0, 0] - old[0, 0]) < torch.linalg.norm(new[0, 0] - old[3, 3])


def test_teacher_preferred_over_student() -> None:
    teacher, student = _reference_model(), _reference_model()
    with torch.no_grad():
        student.norm.weight.fill_(3.0)
    state = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state.update({f"student.backbone.{k}": v for k, v in student.state_dict().items()})
    loaded = load_backbone({"model": state}, num_heads=2)
    _assert_same_features(teacher, loaded)


# ---------------------------------------------------------------- errors, each one clear line naming the file


def _message(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as excinfo:
        load_backbone(tmp_path / "nope.pth")
    assert "nope.pth" in _message(excinfo) and "no such file" in _message(excinfo)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n" * 10)
    with pytest.raises(CheckpointError) as excinfo:
        load_backbone(path)
    assert "notes.pth" in _message(excinfo)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "cut.pth"
    torch.save(_reference_model().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as excinfo:
        load_backbone(path)
    assert "cut.pth" in _message(excinfo) and "truncated" in _message(excinfo)


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = save_backbone(_reference_model(), tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError) as excinfo:
        load_backbone(path)
    assert "cut.safetensors" in _message(excinfo)


def test_arbitrary_objects_are_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"teacher": _NotATensor(), "x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_backbone(path)
    assert "evil.pth" in _message(excinfo) and "not loaded for safety" in _message(excinfo)


def test_unknown_layout(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_backbone(path)
    assert "resnet.pth" in _message(excinfo) and "unknown layout" in _message(excinfo)


def test_missing_backbone_tensor(tmp_path: Path) -> None:
    state = _reference_model().state_dict()
    del state["blocks.2.attn.proj.weight"]
    path = tmp_path / "incomplete.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_backbone(path, num_heads=2)
    assert "incomplete.pth" in _message(excinfo) and "blocks.2.attn.proj.weight" in _message(excinfo)


def test_missing_block(tmp_path: Path) -> None:
    state = {k: v for k, v in _reference_model().state_dict().items() if not k.startswith("blocks.1.")}
    path = tmp_path / "gap.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="blocks \\[1\\] are missing"):
        load_backbone(path)


def test_extra_backbone_tensor(tmp_path: Path) -> None:
    state = _reference_model().state_dict()
    state["blocks.0.attn.extra_scale"] = torch.ones(1)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_backbone(path, num_heads=2)
    assert "extra.pth" in _message(excinfo) and "blocks.0.attn.extra_scale" in _message(excinfo)


def test_override_that_disagrees_with_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "small.pth"
    torch.save(_reference_model().state_dict(), path)
    with pytest.raises(CheckpointError) as excinfo:
        load_backbone(path, embed_dim=768)
    assert "small.pth" in _message(excinfo) and "embed_dim=128" in _message(excinfo)
    with pytest.raises(CheckpointError, match="unknown backbone option"):
        load_backbone(path, colour="blue")
    with pytest.raises(CheckpointError, match="not divisible"):
        load_backbone(path, num_heads=3)


def test_read_state_dict_unwraps() -> None:
    state = {"teacher": {"a": torch.zeros(1), "iteration": 5}}
    assert list(read_state_dict(state)) == ["a"]
    with pytest.raises(CheckpointError, match="no tensors"):
        read_state_dict({"epoch": 3})
