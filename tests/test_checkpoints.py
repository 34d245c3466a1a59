"""Loading every checkpoint layout users meet, and one clear error for every broken one."""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from franca.core.errors import CheckpointError
from franca.models import build_model
from franca.models.checkpoints import load_backbone, resample_pos_embed, save_backbone
from franca.models.files import read_state_dict


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


# ------------------------------------------- broken exports, heads files and overrides: one line, never a traceback


def _rest(message: str, path: Path) -> str:
    """``message`` without the path it must name (test folders carry test names, which could match a key)."""
    assert str(path) in message, message
    return message.replace(str(path), "<file>")


def _rewrite_export(path: Path, out: Path, tensors: dict | None = None, metadata: dict | None = None) -> Path:
    """A copy of the export ``path`` with some tensors or metadata entries replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        stored = dict(handle.metadata())
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    state.update(tensors or {})
    stored.update(metadata or {})
    save_file(state, str(out), metadata=stored)
    return out


@pytest.fixture()
def export(tmp_path: Path) -> Path:
    return save_backbone(_reference_model(), tmp_path / "export.safetensors")


def _config_with(export: Path, **changes) -> str:
    from safetensors import safe_open

    with safe_open(str(export), framework="pt") as handle:
        config = json.loads(handle.metadata()["config"])
    config.update(changes)
    return json.dumps(config)


@pytest.mark.parametrize(
    ("key", "shape", "expected"),
    [("pos_embed", (1, 5, 128), "[1, 17, 128]"), ("blocks.0.attn.qkv.weight", (10, 128), "[384, 128]")],
)
def test_export_with_a_tensor_of_the_wrong_shape(
    tmp_path: Path, export: Path, key: str, shape: tuple, expected: str
) -> None:
    bad = _rewrite_export(export, tmp_path / "edited.safetensors", tensors={key: torch.zeros(shape)})
    with pytest.raises(CheckpointError) as excinfo:
        load_backbone(bad)
    message = _rest(_message(excinfo), bad)
    assert repr(key) in message
    assert str(list(shape)) in message and expected in message


def test_wrong_shape_in_an_official_layout_names_the_tensor(tmp_path: Path) -> None:
    state = _reference_model().state_dict()
    state["blocks.3.attn.proj.weight"] = torch.zeros(128, 7)
    path = tmp_path / "official.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_backbone(path, num_heads=2)
    message = _rest(_message(excinfo), path)
    assert "'blocks.3.attn.proj.weight'" in message and "[128, 7]" in message


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ("[1, 2, 3]", "config"),
        ("not json {", "config"),
        ("ffn_layer=gelu2", "ffn_layer"),
        ("embed_dim=64", "embed_dim"),
        ("colour=blue", "colour"),
        ("num_heads=0", "num_heads"),
        ("num_heads=3", "num_heads"),
        ("img_size=0", "img_size"),
        ("patch_size=0", "patch_size"),
        ("depth=-2", "depth"),
        ("embed_dim=abc", "embed_dim"),
    ],
)
def test_malformed_config_metadata(tmp_path: Path, export: Path, config: str, named: str) -> None:
    if "=" in config:
        key, value = config.split("=")
        config = _config_with(export, **{key: int(value) if value.lstrip("-").isdigit() else value})
    bad = _rewrite_export(export, tmp_path / "meta.safetensors", metadata={"config": config})
    with pytest.raises(CheckpointError) as excinfo:
        load_backbone(bad)
    message = _rest(_message(excinfo), bad)
    assert named in message


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_heads": 0},
        {"img_size": 0},
        {"img_size": -32},
        {"patch_size": 0},
        {"depth": -1},
        {"num_heads": -2},
    ],
)
def test_impossible_overrides(export: Path, overrides: dict) -> None:
    with pytest.raises(CheckpointError) as excinfo:
        load_backbone(export, **overrides)
    message = _rest(_message(excinfo), export)
    key, value = next(iter(overrides.items()))
    assert f"{key}={value}" in message


def _heads_file(tmp_path: Path, name: str = "teacher_heads.pth", **replaced: torch.Tensor) -> Path:
    """A teacher_heads.pth as training writes it: {"teacher": {dino_head.*, ibot_head.*}, "iteration": N}."""
    from franca.models.heads import MatryoshkaHead, heads_state_dict_official

    head = MatryoshkaHead(128, n_prototypes=64, hidden_dim=32, bottleneck_dim=16, nlayers=2)
    teacher = {
        **heads_state_dict_official(head, "dino_head."),
        **heads_state_dict_official(head, "ibot_head."),
    }
    teacher.update(replaced)
    path = tmp_path / name
    torch.save({"teacher": teacher, "iteration": 7}, path)
    return path


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("dino_head.last_layers.4.weight_v", (64,)),
        ("ibot_head.mlps.0.0.weight", (32,)),
        ("dino_head.matryoshka_projections.2.weight", (32,)),
        ("dino_head.last_layers.0.weight_g", (4, 1, 1)),
    ],
)
def test_heads_file_with_a_wrong_rank_tensor(tmp_path: Path, key: str, shape: tuple) -> None:
    from franca.models.heads import load_heads

    assert set(load_heads(_heads_file(tmp_path, "good.pth"))) == {"dino_head", "ibot_head"}
    path = _heads_file(tmp_path, **{key: torch.zeros(shape)})
    with pytest.raises(CheckpointError) as excinfo:
        load_heads(path)
    message = _rest(_message(excinfo), path)
    assert f"'{key}'" in message and str(list(shape)) in message


def test_heads_file_with_a_wrong_shape_names_the_official_key(tmp_path: Path) -> None:
    from franca.models.heads import load_heads

    path = _heads_file(tmp_path, **{"ibot_head.mlps.1.2.bias": torch.zeros(5)})
    with pytest.raises(CheckpointError) as excinfo:
        load_heads(path)
    message = _rest(_message(excinfo), path)
    assert "'ibot_head.mlps.1.2.bias'" in message and "[5]" in message
    assert "parametrizations" not in message


_TORCH_ADVICE = ("weights_only", "safe_globals", "arbitrary code", "\x1b")


@pytest.mark.parametrize("suffix", [".pth", ".pt"])
def test_random_bytes_never_pass_on_torch_advice(tmp_path: Path, suffix: str) -> None:
    from franca.models.heads import load_heads

    path = tmp_path / f"random{suffix}"
    path.write_bytes(
        torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(1)).byte().numpy().tobytes()
    )
    for load in (load_backbone, load_heads):
        with pytest.raises(CheckpointError) as excinfo:
            load(path)
        message = _rest(_message(excinfo), path)
        assert "not a readable PyTorch checkpoint" in message
        assert not any(advice in message for advice in _TORCH_ADVICE), message


def test_pickled_objects_never_pass_on_torch_advice(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"teacher": _NotATensor(), "x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_backbone(path)
    message = _rest(_message(excinfo), path)
    assert "_NotATensor" in message and not any(advice in message for advice in _TORCH_ADVICE), message


class _Records(logging.Handler):
    """Collects the records of one logger (pytest's logging plugin is off in this project's runs)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture()
def checkpoint_log() -> Iterator[_Records]:
    handler = _Records()
    logger = logging.getLogger("franca.models")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _poisoned(state: dict, keys: list[str]) -> dict:
    state = dict(state)
    for index, key in enumerate(keys):
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan") if index % 2 == 0 else float("inf")
    return state


def test_non_finite_backbone_weights_load_with_one_warning(tmp_path: Path, checkpoint_log: _Records) -> None:
    keys = ["blocks.0.attn.qkv.weight", "blocks.1.attn.proj.bias", "norm.weight"]
    path = tmp_path / "nan.pth"
    torch.save(_poisoned(_reference_model().state_dict(), keys), path)
    model = load_backbone(path, num_heads=2)
    assert torch.isnan(model.blocks[0].attn.qkv.weight).any()
    warnings = [r for r in checkpoint_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = _rest(warnings[0].getMessage(), path)
    assert "3 tensors" in message and "blocks.0.attn.qkv.weight" in message
    assert "\n" not in message
    checkpoint_log.records.clear()
    load_backbone(_reference_model().state_dict(), num_heads=2)
    assert not checkpoint_log.records


def test_non_finite_head_weights_load_with_one_warning(tmp_path: Path, checkpoint_log: _Records) -> None:
    from franca.models.heads import load_heads

    good = torch.load(_heads_file(tmp_path, "good.pth"), weights_only=True)["teacher"]
    path = _heads_file(tmp_path, **_poisoned(good, ["ibot_head.mlps.0.0.weight"]))
    heads = load_heads(path)
    assert set(heads) == {"dino_head", "ibot_head"}
    warnings = [r.getMessage() for r in checkpoint_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ibot_head.mlps.0.0.weight" in _rest(warnings[0], path)


@pytest.fixture()
def one_image(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), (120, 30, 200)).save(folder / "a.png")
    return folder


@pytest.mark.parametrize("fault", ["random", "shape", "num_heads", "ffn_layer"])
def test_cli_reports_a_broken_checkpoint_in_one_line(
    tmp_path: Path, export: Path, one_image: Path, fault: str, capsys
) -> None:
    from franca.cli import main

    if fault == "random":
        bad = tmp_path / "bad.pth"
        bad.write_bytes(bytes(range(256)) * 20)
    else:
        bad = tmp_path / "bad.safetensors"
        tensors = {"pos_embed": torch.zeros(1, 5, 128)} if fault == "shape" else None
        metadata = None
        if fault == "num_heads":
            metadata = {"config": _config_with(export, num_heads=0)}
        elif fault == "ffn_layer":
            metadata = {"config": _config_with(export, ffn_layer="gelu2")}
        _rewrite_export(export, bad, tensors=tensors, metadata=metadata)
    capsys.readouterr()
    for argv in (
        ["embed", str(one_image), "--checkpoint", str(bad), "--out", str(tmp_path / "f.npy")],
        [
            "eval",
            "pca",
            "--checkpoint",
            str(bad),
            "--images",
            str(one_image),
            "--output-dir",
            str(tmp_path / "o"),
        ],
    ):
        code = main(argv)
        err = capsys.readouterr().err
        assert code != 0
        assert len(err.strip().splitlines()) == 1 and "bad." in err and "Traceback" not in err, err
        assert "weights_only" not in err


def test_cli_warns_about_non_finite_weights_in_one_line(tmp_path: Path, one_image: Path, capsys) -> None:
    from franca.cli import main

    model = _reference_model(num_heads=2)
    state = _poisoned(model.state_dict(), ["blocks.2.ls1.gamma"])
    with torch.no_grad():
        model.load_state_dict(state)
    path = save_backbone(model, tmp_path / "nan.safetensors")
    capsys.readouterr()
    code = main(["embed", str(one_image), "--checkpoint", str(path), "--out", str(tmp_path / "f.npy")])
    err = capsys.readouterr().err
    assert code == 0
    lines = [line for line in err.splitlines() if "NaN" in line]
    assert len(lines) == 1 and "nan.safetensors" in lines[0] and "blocks.2.ls1.gamma" in lines[0], err


def test_error_reason_drops_torch_advice() -> None:
    from franca.models.files import error_reason

    text = (
        "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in "
        "`torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely "
        "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted "
        "source.\nPlease file an issue with the following so that we can make `weights_only=True` compatible with "
        "your use case: WeightsUnpickler error: \n\nUnsupported operand 200\n\nCheck the documentation of torch.load "
        "to learn more about types accepted by default with weights_only https://pytorch.org/docs/stable/."
    )
    assert error_reason(pickle.UnpicklingError(text)) == "Unsupported operand 200"
    only_advice = "Re-running `torch.load` with `weights_only` set to `False` will likely succeed."
    assert error_reason(RuntimeError(only_advice)) == "RuntimeError"
