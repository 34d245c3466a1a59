"""Writing files so that nothing half-written is ever where a reader looks, and a full disk is one line.

Every file franca writes (checkpoints, exports, metrics, results, reports, embeddings) goes through
:func:`atomic_target`: it is written under a hidden temporary name beside its final path (``.<name>.tmp``), flushed to
disk, and renamed over the final path only when complete, so a reader (or a resume) sees the old file or the new one,
never a part; a failed write removes its temporary.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from franca.core.errors import ConfigError, DiskFullError

_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def temporary_path(path: str | os.PathLike) -> Path:
    """The hidden temporary name :func:`atomic_target` writes ``path`` under."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def remove_path(path: Path) -> None:
    """Delete a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_directory(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _fsync_file(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike, needed: int = 0) -> Iterator[Path]:
    """Yield the temporary path to write ``path``'s new content to (a file, or a folder the block creates).

    When the block finishes, the file is flushed to disk and renamed over ``path`` (a previous file stays until then);
    when it raises, the temporary is removed and the error re-raised, a full disk as one :class:`DiskFullError` line
    naming the folder and ``needed`` bytes. Several targets entered together (``contextlib.ExitStack``) are renamed
    only once every one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    remove_path(tmp)
    with explain_disk_full(path, needed, tmp):
        yield tmp
        if tmp.is_file():
            _fsync_file(tmp)
        os.replace(tmp, path)
    fsync_directory(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_target`); returns the path."""
    with atomic_target(path, len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_target`); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(obj: Any, path: str | os.PathLike, needed: int = 0) -> Path:
    """``torch.save`` of ``obj`` to ``path`` atomically (see :func:`atomic_target`); returns the path."""
    import torch

    with atomic_target(path, needed) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)


def _errors_in(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception chained to it (causes, contexts, and the per-rank failures that
    ``torch.distributed.checkpoint`` collects in a ``CheckpointException``)."""
    seen: set[int] = set()
    pending: list[Any] = [error]
    while pending:
        item = pending.pop()
        if isinstance(item, tuple):  # DCP stores (exception, traceback) pairs
            pending.extend(item)
            continue
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        pending.extend([item.__cause__, item.__context__, *getattr(item, "failures", {}).values()])


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an exception chained to it) says the disk or the quota is full."""
    return any(
        (isinstance(item, OSError) and item.errno in _DISK_FULL_ERRNOS)
        or "No space left on device" in str(item)
        for item in _errors_in(error)
    )


def format_bytes(size: int) -> str:
    """``1.50 GiB``, ``12.0 MiB``: sizes for messages."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**27 else f"{size / 2**20:.1f} MiB"


@contextlib.contextmanager
def explain_disk_full(target: Path, needed: int, *temporaries: Path) -> Iterator[None]:
    """Remove ``temporaries`` when the write inside fails; a full disk becomes one :class:`DiskFullError` line
    naming the folder and the bytes needed (the files already in place stay as they were)."""
    try:
        yield
    except BaseException as error:
        for path in temporaries:
            remove_path(path)
        if not is_disk_full(error):
            raise
        folder = target.parent
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        raise DiskFullError(
            f"{folder}: no space left to write {target.name} (about {format_bytes(needed)} needed, "
            f"{format_bytes(free)} free); free some space (or lower train.keep_last, or move the output to a larger "
            "disk) and run the same command again: a training run resumes from its newest complete checkpoint"
        ) from None


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
