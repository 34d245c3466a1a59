"""Position embeddings for the formats that resize them differently from franca.

Every franca backbone resizes its position grid at run time as its config says (``interpolate_offset``,
``interpolate_antialias``; :meth:`~franca.models.vision_transformer.DinoVisionTransformer.interpolate_pos_encoding`).
timm resizes with an antialiased bicubic to an explicit size, transformers' ``Dinov2Model`` with a plain bicubic to an
explicit size and ``Dinov2WithRegistersModel`` as timm does. A model whose config resizes as the target library does
is exported with its own grid (the features agree at every input size); any other is exported with the positions
franca computes for one input size (:func:`positions_at`), where the features agree exactly.

For ONNX, :func:`traceable_positions` computes franca's resize as two small matrices built from the input's height and
width inside the graph (bicubic is separable: rows then columns), so one exported graph takes any multiple of the
patch size and gives franca's features.
"""

from __future__ import annotations

import torch
from torch import Tensor

from franca.core.errors import ConfigError
from franca.models.vision_transformer import DinoVisionTransformer, ViTConfig

Size = tuple[int, int]
# The kernels of torch's bicubic: a = -0.75 without antialias (OpenCV's), a = -0.5 with it (PIL's).
_CUBIC_A = {False: -0.75, True: -0.5}


def image_size(model: DinoVisionTransformer, size: int | Size | None) -> Size:
    """``size`` as (height, width) px, each a multiple of the patch size; ``None`` is the model's own grid."""
    if size is None:
        side = model.grid_size * model.patch_size
        return side, side
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    patch = model.patch_size
    if height < patch or width < patch or height % patch or width % patch:
        raise ConfigError(
            f"image size {height}x{width} is not a positive multiple of the patch size {patch}; "
            f"choose e.g. {max(1, height // patch) * patch}x{max(1, width // patch) * patch}"
        )
    return int(height), int(width)


def resizes_like(config: ViTConfig, offset: float, antialias: bool) -> bool:
    """Whether a backbone of ``config`` resizes its positions as a library that uses ``offset`` and ``antialias``."""
    return float(config.interpolate_offset) == offset and bool(config.interpolate_antialias) == antialias


@torch.no_grad()
def positions_at(model: DinoVisionTransformer, size: Size) -> Tensor:
    """The position embedding [1, 1 + h*w, D] (fp32, CPU) franca adds for a ``size`` = (height, width) px input."""
    return model.interpolate_pos_encoding(size[0], size[1], torch.float32).detach().cpu().clone()


def _cubic(distance: Tensor, a: float) -> Tensor:
    """The bicubic convolution kernel at ``distance`` (zero beyond 2)."""
    x = distance.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_matrix(length: Tensor, grid: int, offset: Tensor, antialias: bool) -> Tensor:
    """The [length, grid] matrix (float64) that resizes a grid axis as ``F.interpolate(mode="bicubic")`` does.

    ``length`` (a 0-dim integer tensor, so that it stays symbolic in a traced graph) is the output size; the step
    between output samples is grid / (length + offset), as franca's ``interpolate_pos_encoding`` gives torch with a
    scale factor (offset > 0) or an explicit size (offset 0). Without antialias the taps outside the grid are
    clamped to its border, as torch does; with antialias (PIL's filter) each row is normalised over the grid.
    """
    out = torch.arange(length, dtype=torch.float64)
    step = grid / (length.to(torch.float64) + offset)
    a = _CUBIC_A[antialias]
    if not antialias:
        source = (out + 0.5) * step - 0.5
        taps = torch.arange(-2, grid + 2, dtype=torch.float64)  # every tap within 2 of a source position
        weights = _cubic(source[:, None] - taps[None, :], a)
        border = taps.clamp(0, grid - 1).long()
        fold = (border[:, None] == torch.arange(grid)[None, :]).to(
            torch.float64
        )  # [grid + 4, grid], constant
        return weights @ fold
    widen = torch.clamp(step, min=1.0)  # downsampling widens the filter by the step
    center = (out + 0.5) * step
    taps = torch.arange(grid, dtype=torch.float64)
    weights = _cubic((taps[None, :] - center[:, None] + 0.5) / widen, a)
    return weights / weights.sum(dim=1, keepdim=True)


def traceable_positions(model: DinoVisionTransformer, rows: Tensor, cols: Tensor) -> Tensor:
    """franca's position embedding [1, 1 + rows*cols, D] for a grid of ``rows`` x ``cols`` patches (0-dim tensors).

    Equal to ``model.interpolate_pos_encoding`` to float32 rounding (the resize runs in float64), written with tensor
    operations only so that a
    traced ONNX graph keeps the height and width symbolic. At the model's own grid the official code adds the stored
    positions unchanged, and torch's antialiased resize copies an axis whose length stays; the offset is zero there,
    which makes that matrix the identity.
    """
    grid, antialias = model.grid_size, bool(model.interpolate_antialias)
    offset = float(model.interpolate_offset)
    if antialias:  # torch's antialiased resize copies an axis whose length does not change
        row_offset = offset * (rows != grid).to(torch.float64)
        col_offset = offset * (cols != grid).to(torch.float64)
    else:
        row_offset = col_offset = offset * (1.0 - ((rows == grid) & (cols == grid)).to(torch.float64))
    pos_embed = model.pos_embed.float()
    patch = pos_embed[0, 1:].double().reshape(grid, grid * pos_embed.shape[-1])
    along_rows = resize_matrix(rows, grid, row_offset, antialias) @ patch
    along_rows = along_rows.reshape(-1, grid, pos_embed.shape[-1])  # [rows, grid, D]
    resized = torch.matmul(resize_matrix(cols, grid, col_offset, antialias), along_rows)
    return torch.cat([pos_embed[:, :1], resized.float().reshape(1, -1, pos_embed.shape[-1])], dim=1)
