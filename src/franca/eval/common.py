"""Plumbing shared by every evaluation protocol: model loading, data loaders and result files.

Each protocol's entry (``franca.eval.knn.evaluate_knn``, ``franca.eval.hummingbird.evaluate_hummingbird``, ...) takes
a model from :func:`load_model` and its results go to :func:`write_results`, so that every protocol writes the same
kind of JSON file. The command line's options and printed tables live in :mod:`franca.cli.eval_protocols`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from franca.core.errors import CheckpointError, ConfigError
from franca.core.io import atomic_write_text, ensure_output_dir, output_dir_problem
from franca.core.runtime import resolve_device
from franca.eval.defaults import DEFAULT_OUTPUT_ROOT
from franca.eval.output import format_table

__all__ = [
    "DEFAULT_OUTPUT_ROOT",
    "check_input_size",
    "ensure_output_dir",
    "flatten_scalars",
    "format_table",
    "load_model",
    "make_loader",
    "output_dir_problem",
    "write_results",
]


# Transitional: the argparse ``type=`` validators moved to franca.cli.options. These names stay readable here until
# the commands that still import them from this module (franca.cli.embed, .rasa, .demo, .data) import them from
# franca.cli.options; then this table and ``__getattr__`` are to be deleted (the library never reaches up into the CLI).
# --------------------------------------------------------------------------------------------------- model
def check_input_size(size: int, patch_size: int, option: str = "--size") -> None:
    """Raise ConfigError unless ``size`` is a positive multiple of ``patch_size``."""
    if size <= 0 or size % patch_size:
        lower = max(patch_size, size // patch_size * patch_size)
        raise ConfigError(
            f"{option} {size} is not a multiple of the patch size {patch_size}; use e.g. {lower} or {lower + patch_size}"
        )


def load_model(
    checkpoint: str | os.PathLike,
    rasa: str | os.PathLike | bool | None = None,
    device: str | torch.device | None = "auto",
    size: int | None = None,
) -> tuple[torch.nn.Module, torch.device]:
    """Load the backbone ``checkpoint`` (with a RASA head attached), move it to ``device`` in eval mode, frozen.

    ``rasa``: a file with the head or a folded DxD matrix, ``"checkpoint"`` (or True) for the ``rasa_head.*``
    tensors stored in ``checkpoint``, or None. ``device``: "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
    With ``size``, checks that it is a multiple of the patch size, so the error comes before any data is read.
    Returns (model, device).
    """
    from franca.models.checkpoints import load_backbone

    if isinstance(rasa, str) and rasa == "checkpoint" and not Path(rasa).exists():
        rasa = True
    elif isinstance(rasa, (str, os.PathLike)) and not Path(rasa).exists():
        raise CheckpointError(
            f"--rasa {os.fspath(rasa)}: no such file; give a RASA head file or 'checkpoint'"
        )
    resolved = resolve_device(device if device is not None else "auto")
    model = load_backbone(checkpoint, rasa=rasa)
    if size is not None:
        check_input_size(int(size), int(model.patch_size))
    model = model.to(resolved).eval()
    model.requires_grad_(False)
    return model, resolved


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int = 64,
    num_workers: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader for evaluation that skips unreadable samples (``franca.data.images.collate_skip_none``)."""
    from franca.data.images import collate_skip_none

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
    )


# --------------------------------------------------------------------------------------------------- results
def _jsonable(value: Any) -> Any:
    """Convert tensors, arrays, paths, tuples and NumPy scalars into plain JSON types (NaN/inf become null)."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist() if value.ndim else value.item())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, torch.device):
        return str(value)
    return repr(value)


def _arguments_dict(args: Any) -> dict[str, Any]:
    """The options of a run as JSON: a mapping, or an object with attributes (an ``argparse.Namespace``); names
    starting with ``_`` and callables are left out."""
    if args is None:
        return {}
    items = args.items() if isinstance(args, Mapping) else vars(args).items()
    return {key: _jsonable(value) for key, value in items if not key.startswith("_") and not callable(value)}


def flatten_scalars(results: Mapping[str, Any], prefix: str = "") -> dict[str, float | int | str]:
    """``{"k20": {"top1": 81.2}}`` -> ``{"k20/top1": 81.2}``: every scalar leaf of a nested dict, lists skipped."""
    flat: dict[str, float | int | str] = {}
    for key, value in results.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_scalars(value, name))
        elif (isinstance(value, torch.Tensor) and value.ndim == 0) or isinstance(value, np.generic):
            flat[name] = value.item()
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def write_results(
    results: Mapping[str, Any],
    output_dir: str | os.PathLike | None,
    name: str,
    args: Any = None,
) -> Path:
    """Write ``DIR/<name>.json`` and return its path (printing is the command line's business).

    The file holds ``protocol`` (= ``name``), ``checkpoint`` (from ``args`` or ``results``), ``arguments`` (the
    options: a mapping or an ``argparse.Namespace``), ``timestamp`` (UTC, ISO 8601), ``franca_version`` and
    ``metrics`` (``results`` made JSON-safe). It is written to a temporary name and renamed, so an interrupted run
    never leaves half a file. ``output_dir`` None means ``runs/eval/<name>``.
    """
    from franca import __version__

    directory = ensure_output_dir(output_dir if output_dir is not None else DEFAULT_OUTPUT_ROOT / name)
    arguments = _arguments_dict(args)
    checkpoint = arguments.get(
        "checkpoint", results.get("checkpoint") if isinstance(results, Mapping) else None
    )
    payload = {
        "protocol": name,
        "checkpoint": _jsonable(checkpoint),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "franca_version": __version__,
        "arguments": arguments,
        "metrics": _jsonable(results),
    }
    path = atomic_write_text(
        directory / f"{name}.json", json.dumps(payload, indent=2, allow_nan=False) + "\n"
    )
    return path
