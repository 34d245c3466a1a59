"""Hugging Face transformers in and out: folders that ``AutoModel.from_pretrained`` loads offline with no missing key
and whose ``last_hidden_state`` is franca's normed tokens, and transformers models that franca.load_backbone reads.
Every model is built locally from a config (no download)."""

from __future__ import annotations

import json

import pytest
import torch

from franca.core.errors import CheckpointError, ConfigError
from franca.models import build_model
from franca.models.checkpoints import load_backbone
from franca.models.export import export_backbone

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


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


def _assert_same(hf_model, model, height: int, width: int) -> None:
    """transformers' last_hidden_state (after its layernorm) against franca's tokens, within 1e-5."""
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height + width))
    with torch.no_grad():
        hidden = hf_model(pixel_values=x).last_hidden_state
        ours = model.forward_features(x)
    first = 1 + model.num_register_tokens
    torch.testing.assert_close(hidden[:, 0], ours["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden[:, 1:first], ours["x_norm_regtokens"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden[:, first:], ours["x_norm_patchtokens"], atol=1e-5, rtol=1e-5)


def _load(folder) -> torch.nn.Module:
    model, info = transformers.AutoModel.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


@pytest.mark.parametrize(
    ("ffn", "registers", "antialias", "architecture"),
    [
        ("mlp", 0, False, "Dinov2Model"),
        ("swiglu", 0, False, "Dinov2Model"),
        ("mlp", 2, True, "Dinov2WithRegistersModel"),
        ("swiglu", 4, True, "Dinov2WithRegistersModel"),
    ],
)
def test_transformers_gives_franca_features_at_every_size(
    tmp_path, ffn: str, registers: int, antialias: bool, architecture: str
) -> None:
    model = _franca(ffn, registers, interpolate_offset=0.0, interpolate_antialias=antialias)
    export = export_backbone(model, tmp_path / "hf", "hf")
    assert export.exact_size is None and export.details["architecture"] == architecture
    assert sorted(p.name for p in export.path.iterdir()) == ["config.json", "model.safetensors"]
    hf_model = _load(export.path)
    assert type(hf_model).__name__ == architecture
    for height, width in [(56, 56), (70, 98), (42, 28)]:
        _assert_same(hf_model, model, height, width)
    if registers == 0:  # the class the issue names loads it too
        _assert_same(transformers.Dinov2Model.from_pretrained(str(export.path)).eval(), model, 56, 70)


def test_a_model_that_resizes_otherwise_is_exact_at_the_stored_size(tmp_path) -> None:
    model = _franca("swiglu", 0, layerscale_init=None, proj_bias=False)  # no LayerScale: ones; no bias: zeros
    export = export_backbone(model, tmp_path / "hf", "hf", img_size=70)
    assert export.exact_size == (70, 70)
    assert json.loads((export.path / "config.json").read_text())["image_size"] == 70
    _assert_same(_load(export.path), model, 70, 70)
    with pytest.raises(ConfigError, match="square"):
        export_backbone(model, tmp_path / "rect", "hf", img_size=(70, 98))


def test_an_export_reads_back_into_franca(tmp_path) -> None:
    model = _franca("mlp", 4)  # the default resize: the export's metadata keeps it
    export = export_backbone(model, tmp_path / "hf", "hf")
    back = load_backbone(export.path)
    x = torch.randn(2, 3, 70, 42)
    with torch.no_grad():
        torch.testing.assert_close(
            back.forward_features(x)["x_norm_patchtokens"], model.forward_features(x)["x_norm_patchtokens"]
        )


def _hf_model(registers: int, swiglu: bool) -> torch.nn.Module:
    options = {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,  # not 128 // 64: only config.json can tell
        "image_size": 56,
        "patch_size": 14,
        "use_swiglu_ffn": swiglu,
    }
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **options)
        return _random(transformers.Dinov2WithRegistersModel(config))
    return _random(transformers.Dinov2Model(transformers.Dinov2Config(**options)))


@pytest.mark.parametrize(("registers", "swiglu"), [(0, False), (0, True), (4, False)])
def test_load_backbone_reads_transformers_folders_and_state_dicts(
    tmp_path, registers: int, swiglu: bool
) -> None:
    hf_model = _hf_model(registers, swiglu)
    hf_model.save_pretrained(str(tmp_path / "saved"))
    model = load_backbone(tmp_path / "saved")
    assert model.config.num_heads == 4 and model.config.num_register_tokens == registers
    for height, width in [(56, 56), (98, 70)]:
        _assert_same(hf_model, model, height, width)
    from_state = load_backbone(hf_model.state_dict(), num_heads=4)  # no config.json: the heads are given
    _assert_same(hf_model, from_state, 70, 42)


def test_a_transformers_config_franca_cannot_compute_is_refused(tmp_path) -> None:
    hf_model = _hf_model(0, False)
    hf_model.save_pretrained(str(tmp_path / "saved"))
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    config["hidden_act"] = "relu"
    (tmp_path / "saved" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="hidden_act='relu'"):
        load_backbone(tmp_path / "saved")


def test_an_ffn_width_transformers_cannot_express_is_refused(tmp_path) -> None:
    model = _franca("mlp", 0, ffn_hidden_dim=300)
    with pytest.raises(ConfigError, match="mlp_ratio is an integer"):
        export_backbone(model, tmp_path / "hf", "hf")
    assert not (tmp_path / "hf").exists()


def _assert_loads_like(folder, hf_model, registers: int) -> None:
    model = load_backbone(folder)
    assert model.config.num_heads == 4 and model.config.num_register_tokens == registers
    for height, width in [(56, 56), (98, 70)]:
        _assert_same(hf_model, model, height, width)


def _assert_missing_shard_is_named(folder, shard) -> None:
    shard.rename(shard.with_name(shard.name + ".moved"))
    with pytest.raises(CheckpointError) as error:
        load_backbone(folder)
    message = str(error.value)
    assert "\n" not in message and str(shard) in message and "missing" in message


@pytest.mark.parametrize("registers", [0, 4])
def test_load_backbone_reads_sharded_safetensors_folders(tmp_path, registers: int) -> None:
    hf_model = _hf_model(registers, swiglu=registers == 0)
    folder = tmp_path / "saved"
    hf_model.save_pretrained(str(folder), max_shard_size=300_000)  # ~0.8 MB of weights: several shards
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    assert set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()) == {
        shard.name for shard in shards
    }
    _assert_loads_like(folder, hf_model, registers)
    _assert_missing_shard_is_named(folder, shards[1])


def test_load_backbone_reads_sharded_pytorch_bin_folders(tmp_path) -> None:
    """The layout transformers 4 wrote with safe_serialization=False (huggingface_hub writes it the same way)."""
    from huggingface_hub import save_torch_state_dict

    hf_model = _hf_model(4, swiglu=False)
    folder = tmp_path / "saved"
    hf_model.config.save_pretrained(str(folder))
    save_torch_state_dict(hf_model.state_dict(), folder, max_shard_size=300_000, safe_serialization=False)
    shards = sorted(folder.glob("pytorch_model-*-of-*.bin"))
    assert len(shards) > 1 and (folder / "pytorch_model.bin.index.json").is_file()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "pytorch_model.bin.index.json"] + [shard.name for shard in shards]
    )
    _assert_loads_like(folder, hf_model, 4)
    _assert_missing_shard_is_named(folder, shards[0])


def test_a_shard_index_naming_a_file_outside_its_folder_is_refused(tmp_path) -> None:
    hf_model = _hf_model(0, swiglu=False)
    folder = tmp_path / "saved"
    hf_model.save_pretrained(str(folder), max_shard_size=300_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file in its folder"):
        load_backbone(folder)
