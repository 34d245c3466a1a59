"""CyclicMask and the per-batch mask construction of the collate function (method doc section 3).

A CyclicMask keeps one rectangular block of patches *visible* and masks everything else; with ``roll`` the
visible block is shifted cyclically, so it may wrap around the edges of the patch grid (a block on the torus).
The student sees only the visible patches of a masked global crop and predicts the teacher's assignments of the
masked ones (iBOT loss).

All randomness comes from an explicit ``torch.Generator`` so that a seeded data loader produces the same masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from franca.core.errors import ConfigError

__all__ = ["CyclicMask", "MaskBatch", "build_mask_batch"]


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    """One draw of U[low, high) as a Python float."""
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _randint(high_inclusive: int, generator: torch.Generator | None) -> int:
    """One draw of U{0, ..., high_inclusive}."""
    return int(torch.randint(0, high_inclusive + 1, (), generator=generator).item())


class CyclicMask:
    """Inverse block mask with a cyclic roll on a ``height`` x ``width`` patch grid.

    For a requested number of masked patches m (of N = height * width):

    1. m <= 0 masks nothing and m >= N masks everything; otherwise c = N - m patches stay visible.
    2. An aspect ratio a = exp(U[lo, hi]) is drawn with lo = max(log min_aspect, log(c / width^2)) and
       hi = min(log(1 / min_aspect), log(height^2 / c)) (lo is set to hi when lo > hi), which keeps the block
       inside the grid.
    3. The block is h = min(height, ceil(sqrt(c * a))) rows by w = min(width, ceil(sqrt(c / a))) columns, placed
       at a uniform top-left corner; its first c cells in row-major order are the visible ones, so exactly m
       patches are masked.
    4. With ``roll`` the visible cells are rolled cyclically by a uniform (row, column) shift.
    5. The mask is the complement of the visible cells.

    On very elongated grids (never on square ones) the clamped block can hold fewer than c cells; the block is then
    lengthened along the short side until it holds c cells, so the count stays exact.

    Calling the instance returns a BoolTensor [height, width], True where a patch is masked.
    """

    def __init__(self, height: int, width: int, min_aspect: float = 0.3, roll: bool = True) -> None:
        if height < 1 or width < 1:
            raise ConfigError(f"CyclicMask needs a patch grid of at least 1x1, got {height}x{width}")
        if not 0.0 < min_aspect <= 1.0:
            raise ConfigError(f"CyclicMask min_aspect must be in (0, 1], got {min_aspect}")
        self.height = height
        self.width = width
        self.num_patches = height * width
        self.min_aspect = min_aspect
        self.roll = roll
        self._log_aspect_range = (math.log(min_aspect), math.log(1.0 / min_aspect))

    def __repr__(self) -> str:
        return f"CyclicMask(height={self.height}, width={self.width}, min_aspect={self.min_aspect}, roll={self.roll})"

    def block_shape(self, num_visible: int, generator: torch.Generator | None = None) -> tuple[int, int]:
        """Draw the (rows, columns) of a block holding at least ``num_visible`` cells (steps 2-3 above)."""
        low = max(self._log_aspect_range[0], math.log(num_visible / self.width**2))
        high = min(self._log_aspect_range[1], math.log(self.height**2 / num_visible))
        if low > high:
            low = high
        aspect = math.exp(_uniform(low, high, generator))
        rows = min(self.height, math.ceil(math.sqrt(num_visible * aspect)))
        cols = min(self.width, math.ceil(math.sqrt(num_visible / aspect)))
        if rows * cols < num_visible:  # only on strongly non-square grids, see the class docstring
            rows = min(self.height, math.ceil(num_visible / cols))
            cols = min(self.width, math.ceil(num_visible / rows))
        return rows, cols

    def __call__(self, num_masked: int, generator: torch.Generator | None = None) -> Tensor:
        """Return a BoolTensor [height, width] with exactly ``min(max(num_masked, 0), N)`` True (masked) cells."""
        if num_masked <= 0:
            return torch.zeros(self.height, self.width, dtype=torch.bool)
        if num_masked >= self.num_patches:
            return torch.ones(self.height, self.width, dtype=torch.bool)

        num_visible = self.num_patches - num_masked
        rows, cols = self.block_shape(num_visible, generator)
        top = _randint(self.height - rows, generator)
        left = _randint(self.width - cols, generator)

        cell = torch.arange(num_visible)
        visible_rows = top + torch.div(cell, cols, rounding_mode="floor")
        visible_cols = left + cell % cols
        if self.roll:
            visible_rows = (visible_rows + _randint(self.height - 1, generator)) % self.height
            visible_cols = (visible_cols + _randint(self.width - 1, generator)) % self.width

        mask = torch.ones(self.height, self.width, dtype=torch.bool)
        mask[visible_rows, visible_cols] = False
        return mask


@dataclass
class MaskBatch:
    """Masks of one batch of global crops, in the layout the iBOT loss gathers from.

    Attributes:
        masks: BoolTensor [n_crops, N], True where a patch is masked; rows are row-major flattened grids.
        masked_indices: LongTensor [M], positions of the masked patches in ``masks.flatten()`` (the [n_crops * N]
            grid), in increasing order.
        masked_weights: FloatTensor [M], 1 / (number of masked patches of the same crop) for each masked patch, so
            the weights of every masked crop sum to 1.
        n_masked_patches: M, the total number of masked patches.
        upperbound: sum over masked crops of int(N * p_{i+1}), the official bound used to size padded buffers
            (M <= upperbound).
    """

    masks: Tensor
    masked_indices: Tensor
    masked_weights: Tensor
    n_masked_patches: int
    upperbound: int


def build_mask_batch(
    n_crops: int,
    mask_generator: CyclicMask,
    mask_probability: float = 0.5,
    ratio_min_max: Sequence[float] = (0.1, 0.65),
    generator: torch.Generator | None = None,
) -> MaskBatch:
    """Masks for ``n_crops`` global crops, as the official collate function builds them.

    ``int(n_crops * mask_probability)`` crops are masked with stratified ratios: with
    p = linspace(ratio_min, ratio_max, n_masked + 1), masked crop i draws r_i ~ U[p_i, p_{i+1}] and masks
    ``int(N * r_i)`` patches with ``mask_generator``. The other crops get an all-False mask, and the list is shuffled
    across crops so that masked and unmasked crops are mixed (and both global views get masked crops).
    """
    if n_crops < 0:
        raise ValueError(f"build_mask_batch needs n_crops >= 0, got {n_crops}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ConfigError(f"mask probability must be in [0, 1], got {mask_probability}")
    ratio_min, ratio_max = (float(value) for value in ratio_min_max)
    if not 0.0 <= ratio_min <= ratio_max <= 1.0:
        raise ConfigError(f"mask ratio min/max must satisfy 0 <= min <= max <= 1, got {tuple(ratio_min_max)}")

    num_patches = mask_generator.num_patches
    n_masked_crops = int(n_crops * mask_probability)
    bounds = torch.linspace(ratio_min, ratio_max, n_masked_crops + 1, dtype=torch.float64).tolist()

    masks: list[Tensor] = []
    upperbound = 0
    for i in range(n_masked_crops):
        ratio = _uniform(bounds[i], bounds[i + 1], generator)
        masks.append(mask_generator(int(num_patches * ratio), generator).flatten())
        upperbound += int(num_patches * bounds[i + 1])
    unmasked = torch.zeros(num_patches, dtype=torch.bool)
    masks.extend(unmasked for _ in range(n_crops - n_masked_crops))

    order = torch.randperm(n_crops, generator=generator).tolist()
    stacked = (
        torch.stack([masks[i] for i in order]) if n_crops else torch.zeros(0, num_patches, dtype=torch.bool)
    )

    per_crop_counts = stacked.sum(dim=1, keepdim=True).clamp(min=1).float()
    masked_weights = (1.0 / per_crop_counts).expand_as(stacked)[stacked]
    masked_indices = stacked.flatten().nonzero().flatten()
    return MaskBatch(
        masks=stacked,
        masked_indices=masked_indices,
        masked_weights=masked_weights,
        n_masked_patches=int(masked_indices.numel()),
        upperbound=upperbound,
    )
