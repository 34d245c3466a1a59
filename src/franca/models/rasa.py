"""RASA's removal maps and head files: what a backbone needs to apply a trained RASA head.

Every removal step t is a fixed linear map L_t = I - P_t on the final-norm patch tokens (P_t projects onto the two
directions the step's position regressor W_t [2, D] reads), so a whole head folds into one [D, D] matrix
L = L_{T-1} ... L_0; for the row-vector batches [..., D] of this project ``z_rasa = z @ L.T``, what
:meth:`~franca.models.vision_transformer.DinoVisionTransformer.set_rasa` applies. Training the steps is
:mod:`franca.rasa`'s job.

Official head files (``pre_pos_layers.{i}.weight`` [2, D] for i < T-1 and ``pos_pred.weight`` [2, D] for the last
step, 8 or 9 pre layers in the releases) are read by :func:`read_rasa_head` and written by :func:`save_rasa_head`;
:func:`rasa_matrix_from` is what :func:`franca.models.checkpoints.load_backbone` calls with its ``rasa`` argument.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from franca.core.errors import CheckpointError
from franca.core.io import atomic_torch_save
from franca.models.files import read_state_dict

# ----------------------------------------------------------------------------------------------------------------
# The removal maps
# ----------------------------------------------------------------------------------------------------------------


def removal_basis(weight: Tensor) -> Tensor:
    """Orthonormal rows [k, D] (k = 2, or 1 when the two rows are parallel) spanning the plane removed by ``weight``.

    Computed in float64 on the CPU, whatever the weight's device (every basis of a run is kept and combined there):
    u_r = r/|r|, u_c = normalise(c/|c| - <c/|c|, u_r> u_r).
    """
    if weight.ndim != 2 or weight.shape[0] != 2:
        raise ValueError(f"a RASA step weight must have shape [2, D], got {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError("a RASA step weight contains NaN or infinite values")
    row, col = w[0], w[1]
    row_norm = row.norm()
    if row_norm == 0:
        raise ValueError("the row-coordinate vector of a RASA step weight is zero; the head is corrupt")
    u_row = row / row_norm
    col_norm = col.norm()
    if col_norm == 0:
        return u_row.unsqueeze(0)
    col_unit = col / col_norm
    col_orth = col_unit - torch.dot(col_unit, u_row) * u_row
    orth_norm = col_orth.norm()
    if (
        orth_norm < 1e-12
    ):  # c parallel to r: the plane degenerates to the line of u_r (the official code gives NaN)
        return u_row.unsqueeze(0)
    return torch.stack([u_row, col_orth / orth_norm])


def remove_directions(z: Tensor, basis: Tensor) -> Tensor:
    """``z`` [..., D] without its components along the orthonormal rows of ``basis`` [k, D]: z - (z B^T) B."""
    return z - (z @ basis.T) @ basis


def complement_projector(basis: Tensor) -> Tensor:
    """I - B^T B [D, D]: the orthogonal projector that removes the orthonormal rows of ``basis`` [k, D] (column
    vectors: ``P @ z``; for row vectors it is symmetric, so ``z @ P`` too), in ``basis``'s dtype and device."""
    return torch.eye(basis.shape[1], dtype=basis.dtype, device=basis.device) - basis.T @ basis


def removal_projector(w: Tensor) -> Tensor:
    """The removal map L_t = I - u_r u_r^T - u_c u_c^T [D, D] of one step with weight ``w`` [2, D] (rows r, c).

    u_r = r/|r| and u_c is c/|c| made orthogonal to u_r (Gram-Schmidt) and normalised, so L_t is the orthogonal
    projector onto the complement of span(r, c): symmetric, idempotent, annihilates r and c. Note the minus sign on
    u_c u_c^T (the paper's Eq. 3 prints a plus). Computed in float64, returned in ``w``'s floating dtype.
    """
    projector = complement_projector(removal_basis(w))
    return projector.to(w.dtype if w.is_floating_point() else torch.float32)


def fold_rasa(weights: Sequence[Tensor]) -> Tensor:
    """Fold T removal steps (weights [2, D], in training order) into one matrix L = L_{T-1} ... L_0 [D, D].

    Apply it as ``z_rasa = z @ L.T`` to row-vector features [..., D] (``L @ z`` for a column vector), which is how
    :meth:`DinoVisionTransformer.set_rasa` uses it; the result equals :func:`apply_rasa_iterative`. The product is
    formed in float64 and returned in float32.
    """
    if len(weights) == 0:
        raise ValueError("fold_rasa needs at least one RASA step weight")
    dim = weights[0].shape[-1]
    folded = torch.eye(dim, dtype=torch.float64, device=weights[0].device)
    for weight in weights:
        if weight.shape[-1] != dim:
            raise ValueError(f"RASA step weights disagree on the feature size: {dim} and {weight.shape[-1]}")
        folded = removal_projector(weight.to(torch.float64)) @ folded
    return folded.to(torch.float32)


def apply_rasa_iterative(z: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """Remove the position directions of each step in turn from features ``z`` [..., D] (reference path).

    For every weight [2, D] in order: z <- z - <z, u_r> u_r - <z, u_c> u_c. Returns a new tensor [..., D] in ``z``'s
    dtype; equals ``z @ fold_rasa(weights).T`` up to rounding.
    """
    for weight in weights:
        z = remove_directions(z, removal_basis(weight).to(device=z.device, dtype=z.dtype))
    return z


def position_targets(h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """Regression targets [h*w, 2]: (row/(h-1), col/(w-1)) in [0, 1] for a row-major grid of output patches.

    The targets come from the grid of output tokens, so image flips and rotations do not change them. A side of
    length 1 gets coordinate 0 (the official code would divide by zero).
    """
    rows = torch.arange(h, dtype=torch.float32, device=device) / max(h - 1, 1)
    cols = torch.arange(w, dtype=torch.float32, device=device) / max(w - 1, 1)
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([grid_rows.reshape(-1), grid_cols.reshape(-1)], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Head files
# ----------------------------------------------------------------------------------------------------------------

_PRE_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)pre_pos_layers\.(?P<index>\d+)\.weight$")
_PRED_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)pos_pred\.weight$")


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "the given RASA state dict"


def read_rasa_head(source: str | os.PathLike | Mapping[str, Any]) -> list[Tensor]:
    """The removal weights [2, D] of a RASA head, in application order: ``pre_pos_layers.0 ... n-1``, then ``pos_pred``.

    ``source`` is a head file (``.pth``/``.pt``/``.safetensors``, read with
    :func:`franca.models.files.read_state_dict`, so wrappers such as ``{"state_dict": ...}`` are unwrapped) or a state
    dict. Any number of pre layers is accepted (the releases have 8 or 9); keys may carry one common prefix such as
    ``rasa_head.`` or ``head.`` (Lightning checkpoints). Raises :class:`CheckpointError` when the layout is wrong.
    """
    where = _describe(source)
    state = read_state_dict(source)
    pre: dict[str, dict[int, Tensor]] = {}
    pred: dict[str, Tensor] = {}
    for key, value in state.items():
        if match := _PRE_KEY.match(key):
            pre.setdefault(match["prefix"], {})[int(match["index"])] = value
        elif match := _PRED_KEY.match(key):
            pred[match["prefix"]] = value
    prefixes = sorted(set(pre) | set(pred))
    if not prefixes:
        sample = ", ".join(sorted(state)[:4])
        raise CheckpointError(
            f"{where}: no RASA head tensors (pre_pos_layers.<i>.weight / pos_pred.weight) among its keys ({sample}); "
            "give a RASA head file"
        )
    if len(prefixes) > 1:
        shown = ", ".join(repr(p) for p in prefixes)
        raise CheckpointError(
            f"{where}: holds several RASA heads (key prefixes {shown}); extract the one you want"
        )
    prefix = prefixes[0]
    if prefix not in pred:
        raise CheckpointError(
            f"{where}: the RASA head has no {prefix}pos_pred.weight (its last removal step)"
        )
    layers = pre.get(prefix, {})
    if sorted(layers) != list(range(len(layers))):
        missing = sorted(set(range(max(layers) + 1)) - set(layers))
        raise CheckpointError(
            f"{where}: RASA pre_pos_layers {missing[:5]} are missing; the head file is incomplete"
        )
    weights = [layers[index] for index in range(len(layers))] + [pred[prefix]]
    dim = weights[-1].shape[-1]
    for index, weight in enumerate(weights):
        name = f"{prefix}pre_pos_layers.{index}.weight" if index < len(layers) else f"{prefix}pos_pred.weight"
        if weight.ndim != 2 or weight.shape != (2, dim):
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(weight.shape)}, expected [2, {dim}] (only 2-D position heads exist)"
            )
        if not torch.isfinite(weight).all():
            raise CheckpointError(
                f"{where}: {name} contains NaN or infinite values; the head file is corrupt"
            )
    return [weight.detach().to(torch.float32).clone() for weight in weights]


def save_rasa_head(weights: Sequence[Tensor], path: str | os.PathLike) -> Path:
    """Write removal weights [2, D] in the official head layout: a plain ``torch.save`` of a tensor dict.

    The first T-1 steps become ``pre_pos_layers.{i}.weight`` and the last ``pos_pred.weight``, so the official
    ``RASAHead(D, n_pos_layers=T-1)`` loads the file, and ``torch.load(path, weights_only=True)`` reads it. The file is
    written under a temporary name and renamed.
    """
    if len(weights) == 0:
        raise ValueError("save_rasa_head needs at least one RASA step weight")
    state = {f"pre_pos_layers.{index}.weight": w for index, w in enumerate(weights[:-1])}
    state["pos_pred.weight"] = weights[-1]
    state = {
        key: value.detach().to("cpu", torch.float32).contiguous().clone() for key, value in state.items()
    }
    return atomic_torch_save(state, path)


def rasa_matrix_from(
    rasa: str | os.PathLike | Mapping[str, Any] | Tensor | Sequence[Tensor], embed_dim: int
) -> Tensor:
    """The folded RASA matrix [D, D] (``z_rasa = z @ M.T``) from a head file, a head state dict or a matrix.

    A [D, D] tensor is returned as is after a shape check; a path or state dict is read with :func:`read_rasa_head`
    and folded with :func:`fold_rasa`; a sequence of [2, D] step weights is folded directly. Raises
    :class:`CheckpointError` when the input is of another kind or its feature size is not ``embed_dim``.
    """
    if isinstance(rasa, Tensor):
        if rasa.shape != (embed_dim, embed_dim):
            raise CheckpointError(
                f"the RASA matrix has shape {tuple(rasa.shape)}, but this backbone needs [{embed_dim}, {embed_dim}]"
            )
        return rasa
    if isinstance(rasa, (str, os.PathLike, Mapping)):
        weights = read_rasa_head(rasa)
        where = _describe(rasa)
    elif isinstance(rasa, Sequence) and rasa and all(isinstance(w, Tensor) for w in rasa):
        weights, where = list(rasa), "the given RASA weights"
        if any(w.shape != (2, weights[0].shape[-1]) for w in weights):
            raise CheckpointError(f"{where}: every RASA step weight must have shape [2, D]")
    else:
        raise CheckpointError(
            f"rasa={type(rasa).__name__}: give a RASA head file, a head state dict or a [{embed_dim}, {embed_dim}] matrix"
        )
    dim = weights[0].shape[-1]
    if dim != embed_dim:
        raise CheckpointError(
            f"{where}: the RASA head is for {dim}-dim features, but the backbone has {embed_dim}"
        )
    return fold_rasa(weights)
