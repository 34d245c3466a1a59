"""PCA feature maps: colours of planted structures, foreground thresholding and the PNG grid."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from franca.core.errors import DataError
from franca.eval.pca_maps import compose_grid, pca_feature_maps, pca_rgb, save_pca_maps


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
        grid = pca_feature_maps(model, [*paths, tmp_path / "broken.png"], size=32, margin=4)
        path = save_pca_maps(model, paths[:2], tmp_path / "out", size=32, margin=4)
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
        pca_feature_maps(model, [tmp_path / "broken.png"], size=32)
