"""PCA feature maps: colours of planted structures and against a NumPy SVD, foreground thresholding, the settings
and the PNG grid."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from franca.core.errors import ConfigError, DataError
from franca.eval.pca_maps import PcaSettings, compose_grid, evaluate_pca, pca_feature_maps, pca_rgb, score_pca


def planted_groups(seed: int = 0, per_group: int = 60, dim: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Four groups at the vertices of a tetrahedron in a random 3-D subspace of R^dim, plus small noise."""
    rng = np.random.default_rng(seed)
    vertices = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64) * 5.0
    basis, _ = np.linalg.qr(rng.normal(size=(dim, 3)))
    groups = np.repeat(np.arange(4), per_group)
    features = vertices[groups] @ basis.T + rng.normal(scale=0.05, size=(groups.size, dim))
    return features, groups


def test_pca_colours_separate_planted_groups() -> None:
    features, groups = planted_groups()
    colours, foreground = pca_rgb(torch.from_numpy(features).float())
    assert colours.shape == (240, 3) and foreground.all()
    assert colours.min() >= 0.0 and colours.max() <= 1.0
    assert np.allclose(colours.min(axis=0), 0.0) and np.allclose(colours.max(axis=0), 1.0)
    means = np.stack([colours[groups == g].mean(axis=0) for g in range(4)])
    spreads = np.stack([colours[groups == g].std(axis=0) for g in range(4)])
    assert spreads.max() < 0.03
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(4, dtype=bool)].min() > 0.5


def test_foreground_threshold_splits_on_first_component_and_blacks_out_background() -> None:
    rng = np.random.default_rng(1)
    features, groups = planted_groups(seed=2, per_group=30)
    background = rng.normal(scale=0.05, size=(200, features.shape[1]))
    background[:, 0] += 60.0  # far away along one direction: the first principal component separates it
    data = np.concatenate([features, background])
    planted_foreground = np.arange(data.shape[0]) < features.shape[0]
    colours, foreground = pca_rgb(data, foreground_threshold=0.5)
    inverted_colours, inverted = pca_rgb(data, foreground_threshold=0.5, invert_foreground=True)
    assert np.array_equal(foreground, ~inverted)
    chosen, chosen_colours = (foreground, colours) if foreground[0] else (inverted, inverted_colours)
    assert np.array_equal(chosen, planted_foreground)
    assert np.all(chosen_colours[~chosen] == 0.0)
    # the refit on the foreground only separates the four planted groups
    means = np.stack([chosen_colours[:120][groups == g].mean(axis=0) for g in range(4)])
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(4, dtype=bool)].min() > 0.5


def test_threshold_that_keeps_nothing_falls_back_to_all_patches() -> None:
    features, _ = planted_groups()
    with pytest.warns(UserWarning, match="foreground threshold"):
        colours, foreground = pca_rgb(features, foreground_threshold=1.5)
    assert foreground.all() and np.allclose(colours.max(axis=0), 1.0)


def test_compose_grid_layout() -> None:
    red = Image.new("RGB", (10, 10), (255, 0, 0))
    blue = Image.new("RGB", (10, 10), (0, 0, 255))
    grid = compose_grid([red, red], [blue, blue], margin=2)
    assert grid.size == (2 * 10 + 3 * 2, 2 * 10 + 3 * 2)
    assert grid.getpixel((2, 2)) == (255, 0, 0) and grid.getpixel((2 + 10 + 2, 2)) == (0, 0, 255)
    assert grid.getpixel((0, 0)) == (255, 255, 255) and grid.getpixel((5, 2 + 10 + 2 + 3)) == (255, 0, 0)


def test_pca_maps_png_from_a_tiny_backbone(tmp_path: Path) -> None:
    from franca.models import vit_tiny

    model = vit_tiny(patch_size=8, img_size=32).eval()
    rng = np.random.default_rng(0)
    paths = []
    for index in range(3):
        path = tmp_path / f"img{index}.png"
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (tmp_path / "broken.png").write_bytes(b"broken")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grid = pca_feature_maps(model, [*paths, tmp_path / "broken.png"], PcaSettings(size=32, margin=4))
        result = evaluate_pca(model, paths[:2], tmp_path / "out", PcaSettings(size=32, margin=4))
    path = result.grid
    assert result.to_dict() == {
        "protocol": "pca",
        "grid": str(path),
        "num_images": 2,
        "num_skipped": 0,
        "size": 32,
        "foreground_threshold": None,
    }
    assert grid.info["num_images"] == 3 and grid.info["num_skipped"] == 1
    assert grid.size == (2 * 32 + 3 * 4, 3 * 32 + 4 * 4)
    assert path.is_file() and path.suffix == ".png"
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == (2 * 32 + 3 * 4, 2 * 32 + 3 * 4)
        tile = np.asarray(saved.convert("RGB"))[4 : 4 + 32, 8 + 32 : 8 + 64]
    # each 8 px patch of the map is one flat colour (nearest upsampling of a 4x4 grid)
    blocks = tile.reshape(4, 8, 4, 8, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()
    with pytest.raises(DataError), pytest.warns(UserWarning, match="unreadable"):
        pca_feature_maps(model, [tmp_path / "broken.png"], PcaSettings(size=32))


def test_score_pca_colours_are_the_min_max_scaled_svd_components() -> None:
    rng = np.random.default_rng(3)
    grids = rng.normal(size=(2, 3, 4, 6)) * np.array([5.0, 3.0, 2.0, 0.5, 0.2, 0.1])
    maps = score_pca(torch.from_numpy(grids).float())
    assert maps.colours.shape == (2, 3, 4, 3) and maps.colours.dtype == np.uint8 and maps.foreground.all()
    rows = grids.reshape(-1, 6)
    u, singular, _ = np.linalg.svd(rows - rows.mean(axis=0), full_matrices=False)
    scores = u[:, :3] * singular[:3]
    reference = (scores - scores.min(axis=0)) / (scores.max(axis=0) - scores.min(axis=0))
    colours = maps.colours.reshape(-1, 3).astype(np.float64) / 255.0
    for channel in range(3):  # a principal direction's sign is arbitrary: the colour may be 1 - reference
        error = min(np.abs(colours[:, channel] - reference[:, channel]).max(),
                    np.abs(colours[:, channel] - (1.0 - reference[:, channel])).max())  # fmt: skip
        assert error <= 0.5 / 255.0 + 1e-6
    images = maps.images(12)  # nearest upsampling of the 3 x 4 grid: each patch a flat 4 x 3 block
    assert len(images) == 2 and images[0].size == (12, 12)
    assert np.array_equal(np.asarray(images[1]), maps.colours[1].repeat(4, axis=0).repeat(3, axis=1))


def test_pca_settings_are_checked() -> None:
    for changes, message in (
        ({"size": 0}, "--size"),
        ({"resize_mode": "pad"}, "--resize-mode"),
        ({"tokens": "x"}, "--tokens"),
    ):
        with pytest.raises(ConfigError, match=message):
            PcaSettings(**changes)
