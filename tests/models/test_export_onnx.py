"""ONNX out: one graph with dynamic batch, height and width that onnx.checker accepts and onnxruntime runs to franca's
features, its position resize against torch's F.interpolate, and the onnxruntime runner in franca's feature path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from franca.core.errors import ConfigError
from franca.features import TensorImages, embed_images, extract_features, forward_tokens
from franca.models import build_model
from franca.models.export import ONNX_OPSET, OnnxBackbone, export_backbone
from franca.models.formats.positions import resize_matrix

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


def _random(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return module.eval()


@pytest.mark.parametrize(
    ("offset", "antialias"), [(0.1, False), (0.0, False), (0.0, True), (0.1, True)], ids=str
)
@pytest.mark.parametrize("grid", [4, 9])
def test_resize_matrices_equal_torch_bicubic(offset: float, antialias: bool, grid: int) -> None:
    image = torch.randn(1, 1, grid, grid, dtype=torch.float64)
    for rows, cols in [(2, 7), (grid + 3, grid - 1), (1, 16), (grid + 1, grid + 1)]:
        if offset:
            scale = ((rows + offset) / grid, (cols + offset) / grid)
            expected = F.interpolate(image, scale_factor=scale, mode="bicubic", antialias=antialias)
        else:
            expected = F.interpolate(image, size=(rows, cols), mode="bicubic", antialias=antialias)
        across = resize_matrix(torch.tensor(rows), grid, offset, antialias)
        down = resize_matrix(torch.tensor(cols), grid, offset, antialias)
        torch.testing.assert_close(across @ image[0, 0] @ down.T, expected[0, 0], atol=1e-9, rtol=1e-9)


def _run(path, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain onnxruntime, as a user runs the file."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    values = session.run(names, {"images": images.numpy()})
    return {name: torch.from_numpy(value) for name, value in zip(names, values)}


def _assert_same(path, model, batch: int, height: int, width: int) -> None:
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch * height + width))
    got = _run(path, x)
    with torch.no_grad():
        expected = model.forward_features(x)
    assert set(got) <= set(expected)
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-5)


def test_one_graph_gives_franca_features_at_every_size_and_batch(tmp_path) -> None:
    model = _random(build_model("vit_tiny", depth=2, img_size=56, ffn_layer="swiglu", num_register_tokens=2))
    model.set_rasa(torch.randn(192, 192, generator=torch.Generator().manual_seed(3)) * 0.1)
    export = export_backbone(model, tmp_path / "model.onnx", "onnx")
    assert export.details == {
        "opset": ONNX_OPSET,
        "outputs": ["x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_norm_patchtokens_rasa"],
    }
    proto = onnx.load(str(export.path))
    onnx.checker.check_model(proto, full_check=True)
    assert {entry.domain: entry.version for entry in proto.opset_import}[""] == ONNX_OPSET
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "", "height", "width"]
    for batch in (1, 3):
        for height, width in [(56, 56), (70, 98), (518, 224)]:  # the stored grid, a rectangle, a large input
            _assert_same(export.path, model, batch, height, width)


def test_the_antialiased_resize_of_register_models_is_in_the_graph(tmp_path) -> None:
    model = build_model(
        "vit_tiny", depth=1, img_size=70, ffn_layer="mlp", interpolate_offset=0.0, interpolate_antialias=True
    )
    export = export_backbone(_random(model), tmp_path / "model.onnx", "onnx")
    for height, width in [(42, 84), (98, 98), (70, 28)]:  # smaller, larger and one side unchanged
        _assert_same(export.path, model, 2, height, width)


def test_the_runner_serves_franca_feature_extraction(tmp_path) -> None:
    model = _random(build_model("vit_tiny", depth=2, img_size=56, num_register_tokens=4))
    model.set_rasa(torch.randn(192, 192, generator=torch.Generator().manual_seed(5)) * 0.1)
    runner = OnnxBackbone(export_backbone(model, tmp_path / "model.onnx", "onnx").path, threads=1)
    assert (runner.patch_size, runner.embed_dim, runner.num_register_tokens) == (14, 192, 4)
    images = torch.randn(3, 3, 42, 70)
    tokens = ["cls", "registers", "patch", "pooled", "patch_rasa", "pooled_rasa"]
    with torch.no_grad():
        expected = forward_tokens(model, images, tokens)
    got = forward_tokens(runner, images, tokens)
    for name in tokens:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)
    features = extract_features(
        runner, TensorImages(images, batch_size=2), ["cls"], device="cpu", progress=False
    )
    torch.testing.assert_close(features.cls, expected["cls"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="last block only"):
        forward_tokens(runner, images, ["cls_blocks"], n_blocks=2)


def test_the_runner_embeds_image_files(tmp_path) -> None:
    from PIL import Image

    model = _random(build_model("vit_tiny", depth=1, img_size=28))
    runner = OnnxBackbone(export_backbone(model, tmp_path / "model.onnx", "onnx").path)
    paths = []
    for index, colour in enumerate([(200, 10, 30), (5, 120, 250)]):
        paths.append(tmp_path / f"{index}.png")
        Image.new("RGB", (50, 40), colour).save(paths[-1])
    kwargs = {"size": 42, "tokens": ["cls", "mean"], "progress": False}
    expected = embed_images(model, paths, **kwargs).features
    got = embed_images(runner, paths, **kwargs).features
    for name in ("cls", "mean"):
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)


def test_onnx_exports_are_onnx_files(tmp_path) -> None:
    model = build_model("vit_tiny", depth=1, img_size=28)
    with pytest.raises(ConfigError, match=".onnx"):
        export_backbone(model, tmp_path / "model.safetensors", "onnx")
    with pytest.raises(ConfigError, match="img_size applies"):
        export_backbone(model, tmp_path / "model.onnx", "onnx", img_size=56)


def test_weights_past_the_protobuf_limit_go_to_one_data_file_beside_the_graph(tmp_path, monkeypatch) -> None:
    """The branch a ViT-g export (4.5 GB) takes, on a tiny model: the limit is lowered below its weights."""
    import shutil

    from franca.core.errors import CheckpointError
    from franca.models.formats import onnx_graph

    model = _random(build_model("vit_tiny", depth=2, img_size=56, num_register_tokens=2))
    model.set_rasa(torch.randn(192, 192, generator=torch.Generator().manual_seed(7)) * 0.1)
    weight_bytes = 4 * sum(param.numel() for param in model.parameters())
    inline = export_backbone(model, tmp_path / "inline" / "model.onnx", "onnx").path
    assert [p.name for p in inline.parent.iterdir()] == ["model.onnx"]  # under the limit: one file
    monkeypatch.setattr(onnx_graph, "_PROTOBUF_LIMIT", weight_bytes // 4)
    path = export_backbone(model, tmp_path / "big" / "model.onnx", "onnx").path
    data = path.with_name("model.onnx.data")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert data.stat().st_size >= 0.9 * weight_bytes and path.stat().st_size < 0.1 * weight_bytes
    stored = onnx.load(str(path), load_external_data=False).graph.initializer
    assert {t.name for t in stored if t.data_location == onnx.TensorProto.EXTERNAL} >= {"rasa_matrix_t"}
    onnx.checker.check_model(str(path), full_check=True)  # the path-based checker reads the .data file
    for height, width in [(56, 56), (70, 98)]:
        _assert_same(path, model, 2, height, width)

    size = data.stat().st_size
    export_backbone(
        model, path, "onnx"
    )  # over the earlier export: the data file is replaced, not appended to
    assert data.stat().st_size == size
    _assert_same(path, model, 1, 42, 42)

    runner = OnnxBackbone(path, threads=1)  # what `franca embed --runtime onnx` runs
    torch.testing.assert_close(
        runner.rasa.weight, model.rasa.weight
    )  # the RASA matrix read from the .data file
    images = torch.randn(2, 3, 42, 70)
    tokens = ["cls", "registers", "patch", "patch_rasa"]
    with torch.no_grad():
        expected = forward_tokens(model, images, tokens)
    got = forward_tokens(runner, images, tokens)
    for name in tokens:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)

    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(path, moved / "model.onnx")  # the graph without its data
    with pytest.raises(CheckpointError) as error:
        OnnxBackbone(moved / "model.onnx")
    message = str(error.value)
    assert "\n" not in message and str(moved / "model.onnx.data") in message and "missing" in message
    shutil.copy(data, moved / "model.onnx.data")  # moved together: it runs
    torch.testing.assert_close(
        OnnxBackbone(moved / "model.onnx")(images), expected["cls"], atol=1e-5, rtol=1e-5
    )

    monkeypatch.setattr(
        onnx_graph, "_PROTOBUF_LIMIT", 2 * weight_bytes
    )  # the same model now fits in the graph
    export_backbone(model, path, "onnx")
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # the old weights file is gone with it
    _assert_same(path, model, 1, 42, 42)
