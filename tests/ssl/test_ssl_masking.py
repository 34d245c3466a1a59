"""Tests of CyclicMask and build_mask_batch against the rules of method doc section 3."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from franca.core.errors import ConfigError
from franca.ssl import CyclicMask, build_mask_batch


def is_row_major_prefix_of_block(visible: np.ndarray) -> bool:
    """True if the visible cells are the first c cells, in row-major order, of an axis-aligned rectangle."""
    rows, cols = np.nonzero(visible)
    if rows.size == 0:
        return False
    top, left = rows.min(), cols.min()
    width = cols.max() - left + 1
    count = rows.size
    expected = np.zeros_like(visible)
    cell = np.arange(count)
    expected[top + cell // width, left + cell % width] = True
    return bool((expected == visible).all())


def is_one_block_on_torus(visible: np.ndarray) -> bool:
    """True if some cyclic roll of the grid turns the visible cells into a row-major prefix of a rectangle."""
    height, width = visible.shape
    return any(
        is_row_major_prefix_of_block(np.roll(visible, (dy, dx), axis=(0, 1)))
        for dy in range(height)
        for dx in range(width)
    )


@pytest.mark.parametrize("shape", [(16, 16), (7, 5), (2, 12), (12, 2), (1, 9)])
def test_exact_masked_counts(shape: tuple[int, int]) -> None:
    height, width = shape
    num_patches = height * width
    mask_generator = CyclicMask(height, width)
    generator = torch.Generator().manual_seed(0)
    for num_masked in range(-1, num_patches + 3):
        mask = mask_generator(num_masked, generator)
        assert mask.shape == shape and mask.dtype == torch.bool
        assert int(mask.sum()) == min(max(num_masked, 0), num_patches)


def test_nothing_and_everything() -> None:
    mask_generator = CyclicMask(4, 4)
    assert not mask_generator(0).any()
    assert mask_generator(16).all()
    assert mask_generator(100).all()


@pytest.mark.parametrize("shape", [(8, 8), (6, 9), (3, 10), (12, 2)])
def test_visible_cells_form_one_block_on_the_torus(shape: tuple[int, int]) -> None:
    height, width = shape
    mask_generator = CyclicMask(height, width, roll=True)
    generator = torch.Generator().manual_seed(1)
    wraps = 0
    for num_masked in range(1, height * width):
        visible = ~mask_generator(num_masked, generator).numpy()
        assert is_one_block_on_torus(visible), (num_masked, visible.astype(int))
        wraps += not is_row_major_prefix_of_block(visible)
    assert wraps > 0  # the roll really moves blocks across the edges


def test_without_roll_the_block_does_not_wrap() -> None:
    mask_generator = CyclicMask(8, 8, roll=False)
    generator = torch.Generator().manual_seed(2)
    for num_masked in range(1, 64):
        assert is_row_major_prefix_of_block(~mask_generator(num_masked, generator).numpy())


def _block_extent(visible: np.ndarray) -> tuple[int, int, int]:
    rows, cols = np.nonzero(visible)
    return rows.size, int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def test_block_aspect_ratio_bounds() -> None:
    height = width = 16
    min_aspect = 0.3
    mask_generator = CyclicMask(height, width, min_aspect=min_aspect, roll=False)
    generator = torch.Generator().manual_seed(3)
    for num_masked in list(range(20, 240, 7)) * 6:
        num_visible, block_height, block_width = _block_extent(~mask_generator(num_masked, generator).numpy())
        longest = min(width, math.ceil(math.sqrt(num_visible / min_aspect)))
        # w = ceil(sqrt(c / a)) and h = ceil(sqrt(c * a)) with a in [min_aspect, 1 / min_aspect]
        assert min(width, math.sqrt(num_visible * min_aspect)) <= block_width <= longest
        assert block_height <= min(height, math.ceil(math.sqrt(num_visible / min_aspect)))
    # the aspect ratio is random: for c = 128 of 256, a is clamped to [c / W^2, H^2 / c] = [0.5, 2], so the
    # width w = ceil(sqrt(128 / a)) spans 8..16 (8 only at a = 2 exactly)
    widths = [_block_extent(~mask_generator(128, generator).numpy())[2] for _ in range(200)]
    assert min(widths) <= 10 and max(widths) >= 15


def test_seeded_generator_is_deterministic() -> None:
    mask_generator = CyclicMask(16, 16)
    first = [mask_generator(100, torch.Generator().manual_seed(9)) for _ in range(3)]
    second = [mask_generator(100, torch.Generator().manual_seed(9)) for _ in range(3)]
    other = mask_generator(100, torch.Generator().manual_seed(10))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], other)


def test_invalid_configuration() -> None:
    with pytest.raises(ConfigError):
        CyclicMask(0, 4)
    with pytest.raises(ConfigError):
        CyclicMask(4, 4, min_aspect=1.5)
    with pytest.raises(ConfigError):
        build_mask_batch(4, CyclicMask(4, 4), mask_probability=1.5)
    with pytest.raises(ConfigError):
        build_mask_batch(4, CyclicMask(4, 4), ratio_min_max=(0.7, 0.2))


def test_mask_batch_layout_and_weights() -> None:
    num_patches = 64
    batch = build_mask_batch(
        10,
        CyclicMask(8, 8),
        mask_probability=0.5,
        ratio_min_max=(0.1, 0.65),
        generator=torch.Generator().manual_seed(4),
    )
    assert batch.masks.shape == (10, num_patches) and batch.masks.dtype == torch.bool
    counts = batch.masks.sum(dim=1)
    assert (
        int((counts > 0).sum()) == 5
    )  # int(10 * 0.5) masked crops, all with at least int(64 * 0.1) = 6 patches
    flat = batch.masks.flatten()
    assert batch.masked_indices.dtype == torch.long
    assert torch.equal(batch.masked_indices, torch.tensor([i for i in range(flat.numel()) if flat[i]]))
    assert batch.n_masked_patches == int(counts.sum()) == batch.masked_indices.numel()
    crop_of_token = batch.masked_indices // num_patches
    for index, crop in enumerate(crop_of_token.tolist()):
        assert batch.masked_weights[index].item() == pytest.approx(1.0 / counts[crop].item())
    weight_per_crop = torch.zeros(10).index_add_(0, crop_of_token, batch.masked_weights)
    torch.testing.assert_close(weight_per_crop, (counts > 0).float())
    bounds = np.linspace(0.1, 0.65, 6)
    assert batch.upperbound == sum(int(num_patches * bound) for bound in bounds[1:])
    assert batch.n_masked_patches <= batch.upperbound


def test_mask_batch_counts_of_masked_crops() -> None:
    assert int((build_mask_batch(5, CyclicMask(4, 4), 0.5).masks.sum(1) > 0).sum()) == 2
    assert not build_mask_batch(3, CyclicMask(4, 4), 0.0).masks.any()
    empty = build_mask_batch(0, CyclicMask(4, 4))
    assert empty.masks.shape == (0, 16) and empty.n_masked_patches == 0 and empty.upperbound == 0


def test_mask_batch_stratified_ratios_and_shuffling() -> None:
    num_patches, n_crops, n_masked = 256, 8, 4
    bounds = np.linspace(0.1, 0.65, n_masked + 1)
    generator = torch.Generator().manual_seed(5)
    sorted_counts = []
    position_of_largest = []
    masked_positions = np.zeros(n_crops)
    for _ in range(150):
        batch = build_mask_batch(n_crops, CyclicMask(16, 16), 0.5, (0.1, 0.65), generator=generator)
        counts = batch.masks.sum(dim=1).numpy()
        masked = np.sort(counts[counts > 0])
        assert masked.size == n_masked
        for i, count in enumerate(masked):
            assert int(num_patches * bounds[i]) <= count <= int(num_patches * bounds[i + 1])
        sorted_counts.append(masked)
        position_of_largest.append(int(np.argmax(counts)))
        masked_positions += counts > 0
    sorted_counts = np.array(sorted_counts)
    # r_i ~ U[p_i, p_{i+1}]: each stratum's mean count sits in the middle of its interval
    for i in range(n_masked):
        middle = num_patches * (bounds[i] + bounds[i + 1]) / 2
        assert abs(sorted_counts[:, i].mean() - middle) < 3
    # shuffled: every crop position is masked in some batches and not in others, and the largest mask moves
    assert (masked_positions > 20).all() and (masked_positions < 130).all()
    assert len(set(position_of_largest)) == n_crops


def test_mask_batch_is_deterministic_with_a_seed() -> None:
    def make(seed: int):
        return build_mask_batch(8, CyclicMask(8, 8), generator=torch.Generator().manual_seed(seed)).masks

    assert torch.equal(make(11), make(11))
    assert not torch.equal(make(11), make(12))
