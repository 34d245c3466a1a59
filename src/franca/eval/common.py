"""Plumbing shared by every evaluation protocol: common CLI options, model loading, devices and result files.

Each protocol module (``franca.eval.knn``, ``franca.eval.hummingbird``, ...) calls :func:`add_common_arguments` from
its ``add_arguments(parser)``, :func:`load_model` at the start of ``run(args)`` and :func:`write_results` at the end,
so that every ``franca eval <protocol>`` command takes the same options and writes the same kind of JSON file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from franca.core.errors import CheckpointError, ConfigError
from franca.core.io import atomic_write_text
from franca.core.runtime import resolve_device

DEFAULT_OUTPUT_ROOT = Path("runs") / "eval"


# --------------------------------------------------------------------------------------------------- arguments
# argparse ``type=`` validators, shared by every command (``franca embed``, ``franca eval <protocol>``, ``franca rasa``)
# so that a bad value stops at parse time with argparse's one error line naming the option (exit status 2), before
# any model or data is read, instead of a DataLoader traceback or a failure after a long run.
def int_at_least(minimum: int, hint: str = "") -> Callable[[str], int]:
    """argparse type: an integer of at least ``minimum`` (``hint`` explains the smallest value in the message)."""

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an integer; give {minimum} or more{hint}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}; give {minimum} or more{hint}")
        return value

    return check


positive_int = int_at_least(1)  # batch sizes, counts
non_negative_int = int_at_least(0, " (0: load in the main process)")  # --num-workers


def output_dir_problem(path: str | os.PathLike) -> str | None:
    """Why the folder ``path`` cannot be used or created (a message naming the culprit), or None when it can.

    The nearest existing one of ``path`` and its parents must be a folder: ``path`` itself being a file, or a file
    standing where a parent folder would be created, are both reported as ``<file> is a file; give a folder``.
    """
    target = Path(path)
    for candidate in (target, *target.parents):
        if os.path.isdir(candidate):
            return None
        if os.path.lexists(candidate):
            if os.path.islink(candidate) and not os.path.exists(candidate):
                return f"{candidate} is a broken symbolic link; give a folder"
            kind = "a file" if os.path.isfile(candidate) else "not a folder"
            return f"{candidate} is {kind}; give a folder"
    return None


def output_folder(text: str) -> str:
    """argparse type of ``--output-dir``: a folder that exists or can be created (see :func:`output_dir_problem`)."""
    problem = output_dir_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def ensure_output_dir(path: str | os.PathLike, option: str = "--output-dir") -> Path:
    """Create the folder ``path`` (with its parents); ConfigError naming ``option`` and the culprit when it cannot."""
    problem = output_dir_problem(path)
    if problem is not None:
        raise ConfigError(f"{option} {path}: {problem}")
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{option} {path}: cannot create the folder ({error.strerror or error})") from error
    return directory


def output_file(suffixes: Sequence[str]) -> Any:
    """argparse type of an output file option (e.g. ``franca embed --out``): one of ``suffixes``, not a folder, in a
    folder that exists or can be created."""

    def check(text: str) -> str:
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(
                f"{text} is a folder; give a file name ending in {' or '.join(suffixes)}"
            )
        if Path(text).suffix not in suffixes:
            raise argparse.ArgumentTypeError(f"{text}: use a {' or '.join(suffixes)} file name")
        problem = output_dir_problem(Path(text).parent)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return text

    return check


def add_common_arguments(parser: argparse.ArgumentParser, protocol: str | None = None) -> None:
    """Add the options every protocol shares: --checkpoint, --rasa, --output-dir, --size, --batch-size, ...

    ``protocol`` only sets the shown default of --output-dir (``runs/eval/<protocol>``); without it the default is
    resolved by :func:`write_results` from the result name.
    """
    default_dir = str(DEFAULT_OUTPUT_ROOT / protocol) if protocol else None
    group = parser.add_argument_group("model and run")
    group.add_argument(
        "--checkpoint", required=True, metavar="CKPT", help="backbone checkpoint (.pth/.pt/.safetensors)"
    )
    group.add_argument(
        "--rasa",
        default=None,
        metavar="HEAD",
        help="attach a RASA head (file with the head or a folded DxD matrix) to the patch features; "
        "'checkpoint' uses the rasa_head.* tensors stored in --checkpoint",
    )
    group.add_argument(
        "--output-dir",
        type=output_folder,
        default=default_dir,
        metavar="DIR",
        help=f"where to write the JSON results (default: {default_dir or 'runs/eval/<protocol>'})",
    )
    group.add_argument(
        "--size", type=int, default=224, help="input side in pixels, a multiple of the patch size"
    )
    group.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    group.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    group.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    group.add_argument("--seed", type=int, default=0, help="seed of every random choice of the protocol")


# --------------------------------------------------------------------------------------------------- devices
# --------------------------------------------------------------------------------------------------- model
def check_input_size(size: int, patch_size: int, option: str = "--size") -> None:
    """Raise ConfigError unless ``size`` is a positive multiple of ``patch_size``."""
    if size <= 0 or size % patch_size:
        lower = max(patch_size, size // patch_size * patch_size)
        raise ConfigError(
            f"{option} {size} is not a multiple of the patch size {patch_size}; use e.g. {lower} or {lower + patch_size}"
        )


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.device]:
    """Load ``args.checkpoint`` (with ``args.rasa`` attached), move it to ``args.device`` in eval mode.

    Also checks that ``args.size`` (when present) is a multiple of the patch size, so the error comes before any
    data is read.
    """
    from franca.models.checkpoints import load_backbone

    rasa: Any = getattr(args, "rasa", None)
    if isinstance(rasa, str) and rasa == "checkpoint" and not Path(rasa).exists():
        rasa = True
    elif isinstance(rasa, str) and not Path(rasa).exists():
        raise CheckpointError(f"--rasa {rasa}: no such file; give a RASA head file or 'checkpoint'")
    device = resolve_device(getattr(args, "device", "auto"))
    model = load_backbone(args.checkpoint, rasa=rasa)
    size = getattr(args, "size", None)
    if size is not None:
        check_input_size(int(size), int(model.patch_size))
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model, device


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


def _arguments_dict(args: argparse.Namespace | Mapping[str, Any] | None) -> dict[str, Any]:
    if args is None:
        return {}
    items = vars(args).items() if isinstance(args, argparse.Namespace) else args.items()
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


def _format_cell(value: Any, precision: int) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.{precision}f}" if math.isfinite(value) else str(value)
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, precision: int = 2
) -> str:
    """An aligned plain-text table of ``rows`` (dicts) with the given ``columns`` (default: keys of the first row).

    Numbers are right-aligned and floats printed with ``precision`` decimals; a missing cell is blank.
    """
    if not rows:
        return ""
    columns = list(columns) if columns is not None else list(rows[0].keys())
    cells = [[_format_cell(row.get(column, ""), precision) for column in columns] for row in rows]
    numeric = [
        all(
            isinstance(row.get(column), (int, float)) and not isinstance(row.get(column), bool)
            for row in rows
        )
        for column in columns
    ]
    widths = [max(len(str(column)), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]

    def render(values: Iterable[str]) -> str:
        parts = [
            value.rjust(width) if is_number else value.ljust(width)
            for value, width, is_number in zip(values, widths, numeric)
        ]
        return "  ".join(parts).rstrip()

    header = render(str(column) for column in columns)
    rule = "  ".join("-" * width for width in widths)
    return "\n".join([header, rule, *(render(line) for line in cells)])


def write_results(
    results: Mapping[str, Any],
    output_dir: str | os.PathLike | None,
    name: str,
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    print_table: bool = True,
) -> Path:
    """Write ``DIR/<name>.json``, print an aligned table of the scalar metrics (unless ``print_table`` is False)
    and the file's path; returns the JSON path.

    The file holds ``protocol`` (= ``name``), ``checkpoint`` (from ``args`` or ``results``), ``arguments`` (the parsed
    options), ``timestamp`` (UTC, ISO 8601), ``franca_version`` and ``metrics`` (``results`` made JSON-safe). It is
    written to a temporary name and renamed, so an interrupted run never leaves half a file. ``output_dir`` None means
    ``runs/eval/<name>``.
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
    if print_table:
        scalars = flatten_scalars(results)
        if scalars:
            rows = [{"metric": key, "value": value} for key, value in scalars.items()]
            print(f"{name} ({checkpoint or 'model'})")
            print(format_table(rows, ["metric", "value"]))
    print(f"{name}: results written to {path}")
    return path
