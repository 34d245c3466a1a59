"""Tests of RASA: the removal maps, their folding into the backbone, head files, training and the CLI (CPU, tiny)."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.linear_model import LinearRegression

import franca
from franca.core.errors import CheckpointError, ConfigError
from franca.data.images import Batch
from franca.features import Features
from franca.models.rasa import (
    apply_rasa_iterative,
    complement_projector,
    fold_rasa,
    position_targets,
    rasa_matrix_from,
    read_rasa_head,
    removal_projector,
    remove_directions,
    save_rasa_head,
)
from franca.rasa import rasa_transform, train_rasa


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny matrices: a second intra-op thread only adds contention on the shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- a reference written from the method notes
def reference_removal(z: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Method notes section 5, step 3, in float64: z <- z - <z,u_r>u_r - <z,u_c>u_c for each weight in order."""
    z = z.double()
    for w in weights:
        r, c = w[0].double(), w[1].double()
        u_r = r / r.norm()
        c = c / c.norm()
        u_c = c - torch.dot(c, u_r) * u_r
        u_c = u_c / u_c.norm()
        z = z - (z @ u_r)[..., None] * u_r - (z @ u_c)[..., None] * u_c
    return z


def official_head(weights: Sequence[torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The official RASA head layout, by hand: all but the last step are pre_pos_layers, the last is pos_pred."""
    state = {f"{prefix}pre_pos_layers.{i}.weight": w.clone() for i, w in enumerate(weights[:-1])}
    state[f"{prefix}pos_pred.weight"] = weights[-1].clone()
    return state


def random_weights(count: int, dim: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, dim, generator=gen) for _ in range(count)]


# ---------------------------------------------------------------- removal maps
def test_removal_projector_annihilates_plane_and_keeps_its_complement() -> None:
    dim = 16
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    # non-orthogonal, unnormalised rows spanning the plane of q0, q1
    w = torch.stack([2.0 * q[:, 0] + 0.5 * q[:, 1], -1.0 * q[:, 0] + 3.0 * q[:, 1]]).float()
    projector = removal_projector(w).double()

    assert torch.allclose(w.double() @ projector.T, torch.zeros(2, dim, dtype=torch.float64), atol=1e-6)
    complement = q[:, 2:]  # [D, D-2], orthonormal, orthogonal to the plane
    assert torch.allclose(projector @ complement, complement, atol=1e-6)
    assert torch.allclose(projector @ projector, projector, atol=1e-6)
    expected = torch.eye(dim, dtype=torch.float64) - q[:, :2] @ q[:, :2].T
    assert torch.allclose(projector, expected, atol=1e-6)


def test_remove_directions_and_complement_projector_by_hand() -> None:
    basis = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])  # orthonormal rows
    z = torch.tensor([[3.0, 4.0, 5.0], [4.0, -3.0, 2.0]])
    # the first row lies in the span of the basis, the second is orthogonal to it
    assert torch.allclose(remove_directions(z, basis), torch.tensor([[0.0, 0.0, 0.0], [4.0, -3.0, 0.0]]))
    expected = torch.tensor([[0.64, -0.48, 0.0], [-0.48, 0.36, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(complement_projector(basis), expected, atol=1e-6)


def test_position_targets_by_hand() -> None:
    expected = torch.tensor([[0, 0], [0, 0.5], [0, 1], [1, 0], [1, 0.5], [1, 1]], dtype=torch.float32)
    assert torch.equal(position_targets(2, 3), expected)


def test_fold_equals_iterative_removal() -> None:
    dim = 24
    weights = random_weights(9, dim, seed=1)
    weights[3] = torch.stack([weights[3][0], weights[3][0] + 0.05 * weights[3][1]])  # nearly parallel rows
    z = torch.randn(5, 7, dim)
    expected = reference_removal(z, weights)

    folded = fold_rasa(weights)
    assert folded.shape == (dim, dim)
    assert torch.allclose((z @ folded.T).double(), expected, atol=1e-5)
    assert torch.allclose(apply_rasa_iterative(z, weights).double(), expected, atol=1e-5)
    # the order of the steps matters (the projectors do not commute): the reversed fold is different
    assert not torch.allclose(fold_rasa(weights[::-1]), folded, atol=1e-3)


# ---------------------------------------------------------------- through a real backbone
def test_backbone_with_head_file_matches_iterative_removal(tmp_path) -> None:
    model = franca.vit_tiny(patch_size=8, img_size=32).eval()
    export = franca.save_backbone(model, tmp_path / "tiny.safetensors")
    weights = random_weights(9, model.embed_dim, seed=2)
    head_file = tmp_path / "rasa_head.pth"
    torch.save(official_head(weights), head_file)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        raw = model.forward_features(images)["x_norm_patchtokens"]
    expected = reference_removal(raw, weights)

    loaded = franca.load_backbone(export, rasa=head_file)
    with torch.no_grad():
        out = loaded.forward_features(images)
    assert torch.allclose(out["x_norm_patchtokens"], raw, atol=1e-6)
    assert torch.allclose(out["x_norm_patchtokens_rasa"].double(), expected, atol=1e-5)

    again = franca.load_backbone(franca.save_backbone(loaded, tmp_path / "with_rasa.safetensors"))
    assert torch.equal(again.rasa.weight, loaded.rasa.weight)
    with torch.no_grad():
        assert torch.allclose(
            again.forward_features(images)["x_norm_patchtokens_rasa"].double(), expected, atol=1e-5
        )

    # a v1.0.0-style file: backbone and rasa_head tensors together, picked with rasa=True
    combined = {f"backbone.{key}": value for key, value in model.state_dict().items()}
    combined.update(official_head(weights, prefix="rasa_head."))
    official = franca.load_backbone({"teacher": combined}, rasa=True)
    assert torch.allclose(official.rasa.weight, loaded.rasa.weight, atol=1e-7)


# ---------------------------------------------------------------- head files
@pytest.mark.parametrize("pre_layers", [8, 9])
def test_head_file_round_trip_in_official_layout(tmp_path, pre_layers: int) -> None:
    weights = random_weights(pre_layers + 1, 12, seed=pre_layers)
    written_by_hand = tmp_path / "official.pth"
    torch.save(official_head(weights), written_by_hand)
    read = read_rasa_head(written_by_hand)
    assert len(read) == pre_layers + 1
    assert all(torch.equal(a, b) for a, b in zip(read, weights))
    assert all(
        torch.equal(a, b) for a, b in zip(read_rasa_head(official_head(weights, "rasa_head.")), weights)
    )

    saved = save_rasa_head(weights, tmp_path / "ours.pth")
    state = torch.load(saved, weights_only=True)
    assert set(state) == set(official_head(weights))
    assert all(torch.equal(state[key], value) for key, value in official_head(weights).items())


def test_head_errors_are_one_line_checkpoint_errors(tmp_path) -> None:
    weights = random_weights(4, 12, seed=0)
    gap = official_head(weights)
    del gap["pre_pos_layers.1.weight"]
    with pytest.raises(CheckpointError, match="pre_pos_layers"):
        read_rasa_head(gap)
    bad_shape = official_head(weights)
    bad_shape["pos_pred.weight"] = torch.randn(1, 12)
    with pytest.raises(CheckpointError, match="shape"):
        read_rasa_head(bad_shape)
    with pytest.raises(CheckpointError, match="no RASA head"):
        read_rasa_head({"norm.weight": torch.ones(12)})
    with pytest.raises(CheckpointError, match="16"):
        rasa_matrix_from(official_head(weights), embed_dim=16)
    with pytest.raises(CheckpointError, match="shape"):
        rasa_matrix_from(torch.eye(11), embed_dim=12)
    with pytest.raises(CheckpointError):
        rasa_matrix_from(3, embed_dim=12)  # type: ignore[arg-type]
    matrix = torch.randn(12, 12)
    assert rasa_matrix_from(matrix, embed_dim=12) is matrix


def test_rasa_transform_normalises_with_the_correct_imagenet_std() -> None:
    # black stays black under every jitter, blur, flip, crop and the rotation's zero fill
    out = rasa_transform(24)(Image.new("RGB", (40, 30)))
    assert out.shape == (3, 24, 24)
    expected = -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out, expected[:, None, None].expand(3, 24, 24), atol=1e-6)


# ---------------------------------------------------------------- training on a planted position code
def cross_validated_r2(features: np.ndarray, targets: np.ndarray) -> float:
    """2-fold (even/odd images) out-of-fold R^2 of least squares with bias, pooled over both coordinates."""
    folds = [features[0::2], features[1::2]]
    residual = total = 0.0
    for fit_fold, test_fold in ((0, 1), (1, 0)):
        x_fit = folds[fit_fold].reshape(-1, features.shape[-1])
        x_test = folds[test_fold].reshape(-1, features.shape[-1])
        y_fit = np.tile(targets, (folds[fit_fold].shape[0], 1))
        y_test = np.tile(targets, (folds[test_fold].shape[0], 1))
        prediction = LinearRegression().fit(x_fit, y_fit).predict(x_test)
        residual += float(((prediction - y_test) ** 2).sum())
        total += float(((y_test - y_test.mean(0)) ** 2).sum())
    return 1.0 - residual / total


def planted_features(images: int = 128, grid: int = 6, dim: int = 32) -> torch.Tensor:
    """Position coded linearly in a random 2-D subspace, random content in its complement: [M, grid^2, D]."""
    gen = torch.Generator().manual_seed(7)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    code = 2.0 * (position_targets(grid, grid) - 0.5) @ basis[:, :2].T
    content = torch.randn(images, grid * grid, dim - 2, generator=gen) @ basis[:, 2:].T
    return code + content


def test_train_rasa_removes_a_planted_position_code() -> None:
    features = planted_features()
    targets = position_targets(6, 6).numpy()
    assert (
        LinearRegression()
        .fit(features.reshape(-1, 32).numpy(), np.tile(targets, (128, 1)))
        .score(features.reshape(-1, 32).numpy(), np.tile(targets, (128, 1)))
        > 0.99
    )

    result = train_rasa(
        None, features, iterations=3, epochs_per_iteration=10, lr=5e-2, batch_size=16, seed=0, progress=False
    )
    assert len(result.weights) == 3 and all(w.shape == (2, 32) for w in result.weights)
    cleaned = reference_removal(features, result.weights).numpy()
    assert torch.allclose(features @ result.matrix.T, torch.from_numpy(cleaned).float(), atol=1e-5)

    # the metrics agree with an independent (scikit-learn) computation
    assert result.baseline["linear_r2"] == pytest.approx(
        cross_validated_r2(features.numpy(), targets), abs=1e-6
    )
    assert result.baseline["linear_r2"] > 0.99
    assert result.metrics[-1]["linear_r2"] == pytest.approx(cross_validated_r2(cleaned, targets), abs=1e-5)
    assert result.metrics[-1]["linear_r2"] < 0.05
    assert result.metrics[0]["predictor_r2"] > 0.9  # the first predictor found the code
    first = reference_removal(features, result.weights[:1])
    prediction = torch.sigmoid(features @ result.weights[0].T).numpy()
    sse = float(((prediction - targets) ** 2).sum())
    assert result.metrics[0]["predictor_mse"] == pytest.approx(sse / prediction.size, rel=1e-4)
    assert result.metrics[0]["linear_r2"] == pytest.approx(
        cross_validated_r2(first.numpy(), targets), abs=1e-5
    )
    summary = json.loads(result.to_json())
    assert summary["baseline"] == result.baseline and len(summary["iterations"]) == 3
    curve = result.curve()
    assert [point["iteration"] for point in curve] == [0, 1, 2, 3]
    assert curve[0]["linear_r2"] == result.baseline["linear_r2"]


def test_train_rasa_logs_its_steps_at_debug_level(caplog) -> None:
    """One DEBUG line before the removals and one per step, none at INFO: ``franca rasa`` shows INFO records and
    prints the whole table at the end, so the numbers are not shown twice."""
    with caplog.at_level(logging.DEBUG, logger="franca.rasa"):
        result = train_rasa(
            None,
            planted_features(images=16),
            iterations=2,
            epochs_per_iteration=1,
            batch_size=8,
            progress=False,
        )
    records = [record for record in caplog.records if record.name == "franca.rasa"]
    assert [record.levelno for record in records] == [logging.DEBUG] * 3
    assert f"{result.baseline['linear_r2']:.4f}" in records[0].getMessage()
    assert f"position R^2 left {result.metrics[1]['linear_r2']:.4f}" in records[2].getMessage()


def test_train_rasa_streamed_features_with_held_out_metrics() -> None:
    features = planted_features(images=96)
    batches = list(features[:64].split(16))
    result = train_rasa(
        None,
        batches,
        eval_data=features[64:],
        iterations=1,
        epochs_per_iteration=10,
        lr=5e-2,
        cache_features=False,
        seed=0,
        progress=False,
    )
    assert result.settings["metrics_on"] == "held-out data" and result.settings["batch_size"] == 128
    held_out = reference_removal(features[64:], result.weights).numpy()
    assert result.metrics[0]["linear_r2"] == pytest.approx(
        cross_validated_r2(held_out, position_targets(6, 6).numpy()), abs=1e-5
    )
    assert result.metrics[0]["linear_r2"] < 0.05


def grid_targets(rows: int, cols: int) -> np.ndarray:
    """(row/(rows-1), col/(cols-1)) per patch of a row-major grid, by hand."""
    row, col = np.meshgrid(np.arange(rows) / (rows - 1), np.arange(cols) / (cols - 1), indexing="ij")
    return np.stack([row.ravel(), col.ravel()], axis=1)


def test_train_rasa_on_a_features_object_with_a_non_square_grid() -> None:
    gen = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen))
    targets = grid_targets(4, 6)
    code = 2.0 * (torch.from_numpy(targets).float() - 0.5) @ basis[:, :2].T  # [24, D]
    patch = (code + torch.randn(96, 24, 30, generator=gen) @ basis[:, 2:].T).reshape(96, 4, 6, 32)
    features = Features(targets=torch.arange(96), patch=patch.clone())

    result = train_rasa(
        None, features, iterations=1, epochs_per_iteration=10, lr=5e-2, batch_size=16, seed=0, progress=False
    )
    assert torch.equal(features.patch, patch)  # the caller's features are not modified
    flat = patch.reshape(96, 24, 32)
    assert result.baseline["linear_r2"] == pytest.approx(cross_validated_r2(flat.numpy(), targets), abs=1e-6)
    cleaned = reference_removal(flat, result.weights).numpy()
    assert result.metrics[0]["linear_r2"] == pytest.approx(cross_validated_r2(cleaned, targets), abs=1e-5)
    assert result.metrics[0]["linear_r2"] < 0.05
    with pytest.raises(ConfigError, match=r"grid=\(6, 4\)"):
        train_rasa(None, features, grid=(6, 4), iterations=1, progress=False)


class CountingLoader:
    """Image batches (franca ``Batch`` objects, one with unreadable images dropped), counting the passes over them."""

    def __init__(self, images: torch.Tensor) -> None:
        self.batches = [
            Batch(inputs=images[:4], targets=torch.arange(4), num_skipped=1),
            Batch(inputs=None, targets=None, num_skipped=2),
            Batch(inputs=images[4:], targets=torch.arange(4, len(images)), num_skipped=0),
        ]
        self.passes = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        self.passes += 1
        return iter(self.batches)


@pytest.mark.parametrize("cache", [True, False])
def test_train_rasa_on_images_uses_the_backbone_patch_tokens(cache: bool) -> None:
    model = franca.vit_tiny(patch_size=8, img_size=32)
    # 20 images x 56 patches per fold: far more rows than the 192 + 1 unknowns of the closed-form fit
    images = torch.randn(40, 3, 64, 56)
    with torch.no_grad():
        patch = model.eval().forward_features(images)["x_norm_patchtokens"]  # [40, 8*7, D]
    loader = CountingLoader(images)
    result = train_rasa(
        model, loader, iterations=2, epochs_per_iteration=3, cache_features=cache, seed=0, progress=False
    )
    assert result.baseline["linear_r2"] == pytest.approx(
        cross_validated_r2(patch.double().numpy(), grid_targets(8, 7)), abs=1e-5
    )
    # cached: one extraction; streamed: the baseline pass, then per iteration its epochs and one metric pass
    assert loader.passes == (1 if cache else 1 + 2 * (3 + 1))
    assert result.settings["skipped_images"] == 3 and result.settings["train_items"] == (
        40 if cache else 3 * 128
    )
    assert not any(p.requires_grad for p in model.parameters())


def two_plane_features(images: int = 128, grid: int = 6, dim: int = 32) -> torch.Tensor:
    """Position coded twice, in two orthogonal random planes (amplitudes 2 and 1), random content elsewhere."""
    gen = torch.Generator().manual_seed(11)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    centred = position_targets(grid, grid) - 0.5
    code = 2.0 * centred @ basis[:, :2].T + 1.0 * centred @ basis[:, 2:4].T
    content = torch.randn(images, grid * grid, dim - 4, generator=gen) @ basis[:, 4:].T
    return code + content


def test_official_steps_after_the_first_only_shrink_position_information() -> None:
    """With the official steps the folded map has rank D-2: a linear read-out still finds the second plane's code."""
    features = two_plane_features()
    targets = position_targets(6, 6).numpy()
    result = train_rasa(
        None, features, iterations=2, epochs_per_iteration=10, lr=5e-2, batch_size=16, seed=0, progress=False
    )
    singular = torch.linalg.svdvals(result.matrix.double())
    assert int((singular < 1e-5).sum()) == 2
    after_one = cross_validated_r2(reference_removal(features, result.weights[:1]).numpy(), targets)
    after_two = cross_validated_r2(reference_removal(features, result.weights).numpy(), targets)
    assert after_one > 0.9 and after_two == pytest.approx(after_one, abs=1e-4)
    assert result.metrics[1]["linear_r2"] == pytest.approx(after_two, abs=1e-5)


def test_orthogonal_steps_remove_a_new_plane_each_step() -> None:
    features = two_plane_features()
    targets = position_targets(6, 6).numpy()
    result = train_rasa(
        None,
        features,
        iterations=2,
        epochs_per_iteration=10,
        lr=5e-2,
        batch_size=16,
        orthogonal_steps=True,
        seed=0,
        progress=False,
    )
    matrix = result.matrix.double()
    assert torch.allclose(matrix, matrix.T, atol=1e-6) and torch.allclose(matrix @ matrix, matrix, atol=1e-6)
    assert float(matrix.trace()) == pytest.approx(32 - 4, abs=1e-5)
    rows = [F.normalize(w, dim=1) for w in result.weights]
    assert float((rows[1] @ rows[0].T).abs().max()) < 1e-5  # the second plane is orthogonal to the first
    after_two = cross_validated_r2(reference_removal(features, result.weights).numpy(), targets)
    assert after_two < 0.05
    assert result.metrics[1]["linear_r2"] == pytest.approx(after_two, abs=1e-5)


# ---------------------------------------------------------------- command line
def test_cli_end_to_end(tmp_path, capsys) -> None:
    from franca.cli import rasa as rasa_cli

    model = franca.vit_tiny(patch_size=8, img_size=32)
    checkpoint = franca.save_backbone(model, tmp_path / "tiny.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(16):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"{index:02d}.png")
    (images / "broken.png").write_bytes(b"not an image")
    output = tmp_path / "out"

    parser = argparse.ArgumentParser()
    rasa_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--checkpoint", str(checkpoint), "--data", str(images), "--output-dir", str(output)]
        + [
            "--iterations",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--quiet",
            "--holdout",
            "0.25",
        ]
    )
    with pytest.warns(UserWarning, match="broken.png"):
        assert rasa_cli.run(args) == 0

    summary = json.loads((output / "rasa_metrics.json").read_text())
    assert [entry["iteration"] for entry in summary["iterations"]] == [1, 2]
    for entry in summary["iterations"]:
        assert {"train_loss", "predictor_r2", "predictor_mse", "linear_r2", "linear_mse"} <= set(entry)
    assert set(summary["baseline"]) == {"linear_r2", "linear_mse"}
    assert summary["settings"]["size"] == 32 and summary["settings"]["heldout_images"] == 4
    assert summary["settings"]["train_images"] == 13
    assert summary["settings"]["metrics_on"] == "held-out data"

    head = torch.load(output / "rasa_head.pth", weights_only=True)
    assert set(head) == {"pre_pos_layers.0.weight", "pos_pred.weight"}
    weights = [head["pre_pos_layers.0.weight"], head["pos_pred.weight"]]
    loaded = franca.load_backbone(output / "backbone_rasa.safetensors")
    expected = reference_removal(
        torch.eye(192), weights
    ).T  # columns of L, i.e. L itself since L e_i = L[:, i]
    assert torch.allclose(loaded.rasa.weight.double(), expected, atol=1e-5)
    printed = capsys.readouterr().out
    assert "before" in printed and "load_backbone" in printed
