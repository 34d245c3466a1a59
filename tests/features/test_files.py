"""franca.features.embed / franca.features.files: features of image files, checked against the backbone's own outputs,
and the feature files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from franca.core.errors import ConfigError
from franca.data.augmentations import eval_transform
from franca.data.images import load_image
from franca.features import EmbeddingResult, embed_images, read_embedding_paths, save_embeddings


@pytest.fixture(scope="module")
def model():
    from franca.models import vit_tiny

    torch.manual_seed(0)
    return vit_tiny(patch_size=8, img_size=32, num_register_tokens=2).eval()


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(1)
    paths = []
    for index, shape in enumerate([(40, 36, 3), (32, 50, 3), (33, 33, 3)]):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(paths[-1])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    return [paths[0], tmp_path / "broken.png", paths[1], paths[2]]


def _backbone_outputs(model, paths: list[Path]) -> dict[str, torch.Tensor]:
    """The backbone's own outputs for the readable images, preprocessed one by one."""
    batch = torch.stack([eval_transform(32)(load_image(path)) for path in paths])
    with torch.no_grad():
        return model.forward_features(batch)


def test_tokens_are_stored_under_the_names_asked_for(model, images: list[Path]) -> None:
    with pytest.warns(UserWarning, match="broken.png"):
        result = embed_images(
            model, images, size=32, batch_size=2, tokens=["mean", "cls", "patch", "pooled", "registers"]
        )
    assert list(result.features) == [
        "mean",
        "cls",
        "patch",
        "registers",
    ]  # 'pooled' is 'mean' again: kept once
    assert result.paths == [images[0], images[2], images[3]] and result.skipped == [images[1]]
    assert result.grid == (4, 4)
    out = _backbone_outputs(model, result.paths)
    assert torch.allclose(result.features["cls"], out["x_norm_clstoken"], atol=1e-5)
    assert result.features["patch"].shape == (3, 16, 192)
    assert torch.allclose(result.features["patch"], out["x_norm_patchtokens"], atol=1e-5)
    assert torch.allclose(result.features["mean"], out["x_norm_patchtokens"].sum(1) / 16, atol=1e-5)
    assert torch.allclose(result.features["registers"], out["x_norm_regtokens"], atol=1e-5)


def test_rasa_tokens_and_errors(model, images: list[Path]) -> None:
    with pytest.raises(ConfigError, match="token kind 'patch_rasa' needs a RASA head"):
        embed_images(model, images, size=32, tokens=["cls", "patch_rasa"])
    with pytest.raises(ConfigError, match="--size 30 is not a multiple of the patch size 8"):
        embed_images(model, images, size=30)
    with pytest.raises(ConfigError, match="unknown token kind 'logits'"):
        embed_images(model, images, size=32, tokens=["logits"])
    direction = torch.nn.functional.normalize(torch.randn(1, 192), dim=-1)
    model.set_rasa(torch.eye(192) - direction.T @ direction)
    try:
        with pytest.warns(UserWarning):
            result = embed_images(model, images, size=32, tokens=["patch_rasa", "avgpool_rasa"])
    finally:
        model.set_rasa(None)
    patch = _backbone_outputs(model, result.paths)["x_norm_patchtokens"]
    by_hand = patch - (patch @ direction.T) @ direction
    assert torch.allclose(result.features["patch_rasa"], by_hand, atol=1e-5)
    assert torch.allclose(result.features["avgpool_rasa"], by_hand.mean(dim=1), atol=1e-5)


def test_no_readable_image_gives_zero_rows(model, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.warns(UserWarning):
        result = embed_images(model, [tmp_path / "a.png"], size=32, tokens=["cls", "mean"])
    assert {name: tuple(value.shape) for name, value in result.features.items()} == {
        "cls": (0, 192),
        "mean": (0, 192),
    }
    assert result.paths == [] and result.skipped == [tmp_path / "a.png"]


def test_npy_outputs_of_an_earlier_run_are_replaced(tmp_path: Path) -> None:
    out = tmp_path / "f.npy"
    rows = [Path("/data/a.png"), Path("/data/b.png")]
    first = EmbeddingResult({"registers": torch.ones(2, 4, 3), "pooled": torch.zeros(2, 3)}, rows)
    assert save_embeddings(first, out) == [
        tmp_path / "f.registers.npy",
        tmp_path / "f.pooled.npy",
        tmp_path / "f.paths.jsonl",
    ]
    second = EmbeddingResult({"cls": torch.arange(6.0).reshape(2, 3)}, rows[::-1])
    assert save_embeddings(second, out) == [out, tmp_path / "f.paths.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy", "f.paths.jsonl"]  # the old tokens are gone
    assert np.array_equal(np.load(out), np.arange(6.0, dtype=np.float32).reshape(2, 3))
    assert read_embedding_paths(out) == ["/data/b.png", "/data/a.png"]
    lines = (tmp_path / "f.paths.jsonl").read_text(encoding="ascii").splitlines()
    assert [json.loads(line) for line in lines] == ["/data/b.png", "/data/a.png"]
