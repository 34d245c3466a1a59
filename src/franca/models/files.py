"""Reading checkpoint files into flat ``{name: tensor}`` dicts, whatever holds them.

``.pth``/``.pt`` files (read with ``weights_only=True``: nothing beyond tensors and plain containers is unpickled),
``.safetensors`` files, sharded ``torch.distributed.checkpoint`` folders and transformers model folders; wrappers such
as ``{"teacher": {...}}`` are unwrapped. Backbone loading (:mod:`franca.models.checkpoints`), head files
(:mod:`franca.models.heads`, :mod:`franca.models.rasa`) and the trainer's resume all read through here, and every
problem is one :class:`~franca.core.errors.CheckpointError` line naming the file.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from franca.core.errors import CheckpointError
from franca.models.formats.transformers_dinov2 import (
    CONFIG_FILE,
    CONFIG_METADATA,
    is_transformers_folder,
    weights_files,
)

WRAPPER_KEYS = ("teacher", "model", "state_dict", "module")
StateDict = dict[str, Tensor]
DCP_METADATA = ".metadata"  # the file that makes a folder a complete torch.distributed.checkpoint

# torch.load's errors advise re-running with weights_only=False, which could run a pickled payload: never passed on
_TORCH_ADVICE = re.compile(
    r"weights_only|safe_globals|arbitrary code|trust|file an issue|documentation of", re.I
)
_PICKLED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def describe_source(source: Any) -> str:
    """How an error message names ``source``: its path, or "the given state dict"."""
    return str(source) if isinstance(source, (str, os.PathLike)) else "the given state dict"


def read_checkpoint(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """Read a ``.pth``/``.pt``/``.safetensors`` file into a flat tensor dict and its metadata (safetensors only).

    Wrappers such as ``{"teacher": {...}}``, ``{"model": {...}}`` or ``{"state_dict": {...}}`` are unwrapped (the
    EMA teacher is preferred); non-tensor entries are dropped.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such file; give the path of a .pth, .pt or .safetensors checkpoint"
        )
    if path.is_dir():
        if is_sharded_checkpoint(path):
            return _unwrap(read_sharded_checkpoint(path, keys=("teacher",)), path), {}
        if is_transformers_folder(path):  # its weights (every shard), and its config.json as metadata
            state, metadata = {}, {}
            for file in weights_files(path):
                part, part_metadata = read_checkpoint(file)
                state.update(part)
                metadata.update(part_metadata)
            return state, {**metadata, CONFIG_METADATA: (path / CONFIG_FILE).read_text(encoding="utf-8")}
        raise CheckpointError(
            f"{path}: is a directory; give the checkpoint file inside it (or a transformers model folder with "
            "config.json and model.safetensors)"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty; download or export it again")
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({error_reason(error)}); it may be truncated"
            ) from None
        return state, metadata
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - corrupt files raise many types (UnpicklingError, EOFError...)
        raise _torch_load_error(path, error) from None
    return _unwrap(obj, path), metadata


def error_reason(error: BaseException) -> str:
    """The first sentence of ``error`` that gives a reason, on one line and without torch's advice.

    ``torch.load`` suggests re-running with ``weights_only=False`` (or allow-listing globals), which would execute
    whatever the pickle holds; that advice is dropped, as are ANSI colour codes. Falls back to the error's type name.
    """
    failures = getattr(
        error, "failures", None
    )  # torch.distributed.checkpoint: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        inner = first[0] if isinstance(first, tuple) else first
        if isinstance(inner, BaseException):
            return error_reason(inner)
    text = _ANSI.sub("", str(error))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    sentences = (part.strip() for part in re.split(r"(?<=[.!?])\s+|\n+", text))
    reason = next((part for part in sentences if part and not _TORCH_ADVICE.search(part)), "")
    return reason[:200].rstrip(".") or type(error).__name__


def _torch_load_error(path: Path, error: BaseException) -> CheckpointError:
    """The one-line error for a file ``torch.load(weights_only=True)`` refused or could not read."""
    pickled = _PICKLED_GLOBAL.search(str(error))
    if pickled:
        return CheckpointError(
            f"{path}: holds Python objects other than tensors ({pickled.group(1)}), which are not loaded for safety; "
            "re-save it with torch.save(state_dict) or export it with franca.save_backbone"
        )
    return CheckpointError(
        f"{path}: not a readable PyTorch checkpoint ({error_reason(error)}); it is probably truncated, corrupt or "
        "not a checkpoint at all: download or export it again"
    )


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete ``torch.distributed.checkpoint`` folder (one shard file per rank + metadata)."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file()


def read_sharded_checkpoint(path: str | os.PathLike, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The nested state dict saved in a ``torch.distributed.checkpoint`` folder, consolidated in this process.

    ``keys`` limits the read to some top-level entries (``("teacher",)`` reads a tenth of a training checkpoint).
    Runs without collectives, so one process may call it inside a distributed job.
    """
    # lazy: torch.distributed.checkpoint takes ~0.6 s to import; only sharded checkpoints need it
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    try:
        planner = _EmptyStateDictLoadPlanner(keys=set(keys) if keys else None)
    except TypeError:  # torch < 2.5: no key filter, read everything
        planner = _EmptyStateDictLoadPlanner()
    try:
        with dcp_single_process():
            # the private loader that torch's own dcp_to_torch_save uses: the public load() fills a copy of the
            # (empty) dict it is given, and would run collectives inside a distributed job
            _load_state_dict(state, storage_reader=FileSystemReader(str(path)), planner=planner, no_dist=True)
    except _dcp_errors() as error:
        raise CheckpointError(f"{path}: not a readable sharded checkpoint ({error_reason(error)})") from None
    return state


def _dcp_errors() -> tuple[type[BaseException], ...]:
    """What a failed ``torch.distributed.checkpoint`` read raises: any Exception, or its CheckpointException, which
    derives from BaseException (so that ``except Exception`` in user code does not swallow it)."""
    # lazy: torch.distributed.checkpoint takes ~0.6 s to import; only sharded checkpoints need it
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def dcp_load(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.distributed.checkpoint.load`` of folder ``path`` into ``state`` (in place).

    With a process group, every rank must call it (the ranks plan the reads together); without one it reads in this
    process alone.
    """
    # lazy: torch.distributed.checkpoint takes ~0.6 s to import; only sharded checkpoints need it
    from torch.distributed.checkpoint import FileSystemReader, load

    try:
        with dcp_single_process():
            load(state, storage_reader=FileSystemReader(str(path)))
    except _dcp_errors() as error:  # on every rank: the ranks read together
        raise CheckpointError(f"{path}: not a readable sharded checkpoint ({error_reason(error)})") from None


_DCP_SINGLE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized"


@contextlib.contextmanager
def dcp_single_process() -> Iterator[None]:
    """Silence torch.distributed.checkpoint's warning that it runs in one process without a process group (which is
    what franca means when it calls it so: one training process, or the conversion commands)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DCP_SINGLE_PROCESS)
        yield


def ignore_dcp_single_process_warning() -> None:
    """:func:`dcp_single_process` for the rest of the process: an asynchronous save warns from its own thread, after
    any ``with`` block around the call has ended."""
    warnings.filterwarnings("ignore", message=_DCP_SINGLE_PROCESS)


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte header length followed by a JSON object."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path)


def _unwrap(obj: Any, source: Any) -> StateDict:
    for _ in range(3):
        if isinstance(obj, Mapping):
            wrapper = next((key for key in WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
            if wrapper is None:
                break
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{describe_source(source)}: holds a {type(obj).__name__}, not a state dict of tensors"
        )
    state = {str(key): value for key, value in obj.items() if isinstance(value, Tensor)}
    if not state:
        raise CheckpointError(f"{describe_source(source)}: contains no tensors; is it a model checkpoint?")
    return state


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> StateDict:
    """A flat ``{name: tensor}`` dict from a checkpoint path or an (optionally wrapped) state dict."""
    if isinstance(source, Mapping):
        return _unwrap(source, source)
    return read_checkpoint(source)[0]
