"""Training checkpoints and exports of a run directory.

Layout of ``<run>/``::

    config.yaml                       the resolved configuration
    metrics.jsonl                     one JSON line per logged step
    checkpoints/checkpoint_<iter>.pt  full training state (student, teacher, optimizer, scaler, RNG, position), or
    checkpoints/checkpoint_<iter>.dcp/  the same state as a torch.distributed.checkpoint folder (FSDP runs): every rank
                                      writes its own shards, and a run resumes from it on any world size
    teacher_backbone.safetensors      the EMA teacher backbone: franca.load_backbone(...) reads it
    teacher_heads.pth                 the teacher heads in the official layout: franca.load_heads(...) reads it
    .franca.lock                      held by the process training into the folder (RunLock)

Every file and folder is written under a temporary name and renamed into place (a folder by rank 0 once every rank
has finished), so a killed process never leaves a partial checkpoint where a resume would read it. A training
checkpoint's ``teacher`` entry has the official release layout (``backbone.*``, ``dino_head.*``, ``ibot_head.*``),
so ``load_backbone``/``load_heads`` read it directly as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open

from franca.core import distributed as dist_utils
from franca.core.errors import CheckpointError, RunDirectoryBusyError
from franca.core.io import (
    atomic_target,
    atomic_torch_save,
    explain_disk_full,
    fsync_directory,
    remove_path,
    temporary_path,
)
from franca.models.checkpoints import save_backbone
from franca.models.files import (
    dcp_single_process,
    ignore_dcp_single_process_warning,
    is_sharded_checkpoint,
    read_sharded_checkpoint,
)
from franca.models.vision_transformer import DinoVisionTransformer

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".franca.lock"
BACKBONE_EXPORT = "teacher_backbone.safetensors"
HEADS_EXPORT = "teacher_heads.pth"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)\.(pt|dcp)$")
# what a file must hold to be resumed from (the rest is optional: scaler, random states, counters)
TRAINING_STATE_KEYS = ("iteration", "student", "teacher", "optimizer")


_LOCKED_RUNS: set[Path] = set()  # the run directories this process holds


class RunLock:
    """An exclusive lock on a run directory (``<run>/.franca.lock``), held while a process trains into it.

    A POSIX record lock: the operating system releases it when the holder exits, however it exits (``kill -9``
    included), so it never goes stale, and forked data workers do not inherit it (an orphaned worker never blocks a
    relaunch). Within one process a set of held directories plays the same role (POSIX locks do not exclude their
    own process). The file records the holder's pid and host for the message a second writer gets. Where
    ``fcntl`` is missing (Windows) only the in-process check applies.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._key = Path(run_dir).resolve()
        self._handle: Any = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunDirectoryBusyError` naming the process that holds it."""
        if self._handle is not None:
            return
        if self._key in _LOCKED_RUNS:
            raise self._busy(f"pid {os.getpid()}, this process")
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            import fcntl  # POSIX only: the ImportError below is the Windows fallback

            fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: no lock between processes
            pass
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise self._busy(holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle
        _LOCKED_RUNS.add(self._key)

    def _busy(self, holder: str) -> RunDirectoryBusyError:
        return RunDirectoryBusyError(
            f"{self.path.parent}: another franca process ({holder}) is training into this run directory; "
            "wait for it to finish or stop it, or choose another output directory"
        )

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file releases the lock
            self._handle = None
            _LOCKED_RUNS.discard(self._key)


def state_bytes(state: Any) -> int:
    """The bytes of the tensors in a nested state (this process's shards for sharded tensors)."""
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(value) for value in state)
    return 0


def official_teacher_state(teacher_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full teacher state dict (``backbone.*``, ``dino_head.*``, ``ibot_head.*``) with the official head key names.

    Weight-normalised prototypes get the old ``weight_g``/``weight_v`` names; a shared iBOT head is written under both
    prefixes, as the official files do.
    """
    state = {}
    for key, value in teacher_state.items():
        if key.startswith(("dino_head.", "ibot_head.")):
            key = key.replace("parametrizations.weight.original0", "weight_g")
            key = key.replace("parametrizations.weight.original1", "weight_v")
        state[key] = value
    if not any(key.startswith("ibot_head.") for key in state):
        state.update(
            {"ibot_head." + k[len("dino_head.") :]: v for k, v in state.items() if k.startswith("dino_head.")}
        )
    return state


def native_teacher_state(official: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`official_teacher_state`: the heads' weight-norm parametrisation under the module's own
    names (``parametrizations.weight.original0``/``original1``) instead of ``weight_g``/``weight_v``."""
    state = {}
    for key, value in official.items():
        if key.startswith(("dino_head.", "ibot_head.")):
            key = key.replace("weight_g", "parametrizations.weight.original0")
            key = key.replace("weight_v", "parametrizations.weight.original1")
        state[key] = value
    return state


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of the complete checkpoints of a run (files and sharded folders), oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and (path.is_file() if match.group(2) == "pt" else is_sharded_checkpoint(path)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def rotate_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints (``keep_last <= 0`` keeps all)."""
    if keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            remove_path(old)


def save_checkpoint(
    run_dir: str | os.PathLike, iteration: int, state: dict[str, Any], keep_last: int = 3
) -> Path:
    """Write ``checkpoints/checkpoint_<iteration>.pt`` atomically, then delete all but the ``keep_last`` newest."""
    path = Path(run_dir) / CHECKPOINT_DIR / f"checkpoint_{iteration:08d}.pt"
    atomic_torch_save(state, path, state_bytes(state))
    rotate_checkpoints(run_dir, keep_last)
    return path


def use_sharded_checkpoints(checkpoint_format: str, networks_sharded: bool) -> bool:
    """Whether a run writes sharded checkpoints (``train.checkpoint_format``, validated with the config):
    ``sharded``, or ``auto`` with sharded (FSDP) networks."""
    return checkpoint_format == "sharded" or (checkpoint_format == "auto" and networks_sharded)


class ShardedCheckpointWriter:
    """Writes training checkpoints as ``torch.distributed.checkpoint`` folders; every rank calls every method.

    Each rank writes its own shards (DTensors are saved shard by shard, replicated tensors once), in parallel, into
    ``checkpoints/.checkpoint_<iter>.dcp.tmp``; once every rank has finished, rank 0 renames the folder into place and
    deletes the checkpoints beyond ``keep_last``. With ``asynchronous``, :meth:`save` returns as soon as the state is
    copied to host memory and the files are written in a background thread; the folder is published by the next
    :meth:`save` or by :meth:`wait` (a run that is killed before that resumes from the previous checkpoint).
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int, asynchronous: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.asynchronous = asynchronous
        self._pending: tuple[Any, Path, Path, int] | None = None
        self._async_group: Any = None
        if asynchronous and not dist_utils.is_enabled():
            ignore_dcp_single_process_warning()

    def save(self, iteration: int, state: dict[str, Any]) -> Path:
        """Save ``state`` (sharded tensors allowed) as checkpoint ``iteration``; returns the final folder's path."""
        # lazy: torch.distributed.checkpoint takes ~0.6 s to import; only sharded checkpoints need it
        import torch.distributed.checkpoint as dcp

        self.wait()
        final = self.run_dir / CHECKPOINT_DIR / f"checkpoint_{iteration:08d}.dcp"
        tmp = temporary_path(final)
        if dist_utils.is_main_process():
            remove_path(tmp)
            tmp.mkdir(parents=True)
        dist_utils.barrier()
        needed = state_bytes(state)
        with dcp_single_process(), explain_disk_full(final, needed, tmp):
            if not self.asynchronous:
                dcp.save(state, checkpoint_id=tmp)
                self._publish(tmp, final)
                return final
            response = dcp.async_save(state, checkpoint_id=tmp, process_group=self._group())
        future = getattr(response, "upload_completion", response)  # torch >= 2.9 may return a response object
        self._pending = (future, tmp, final, needed)
        return final

    def wait(self) -> None:
        """Finish and publish the checkpoint being written in the background, if any."""
        if self._pending is None:
            return
        future, tmp, final, needed = self._pending
        self._pending = None
        with explain_disk_full(final, needed, tmp):
            future.result()
        self._publish(tmp, final)

    def _group(self) -> Any:
        """A process group of its own for the background writer's collectives (created on first use, by every rank).

        Sharing the training's group would interleave the writer's collectives with the step's all-reduces in a
        different order on each rank; gloo, because NCCL must not be driven from a second thread.
        """
        if not dist_utils.is_enabled():
            return None
        if self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def _publish(self, tmp: Path, final: Path) -> None:
        dist_utils.barrier()
        if dist_utils.is_main_process():
            remove_path(final)  # an older copy of the same iteration (a run restarted further back)
            os.replace(tmp, final)
            fsync_directory(final.parent)
            rotate_checkpoints(self.run_dir, self.keep_last)
        dist_utils.barrier()


def consolidate_checkpoint(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the sharded checkpoint folder ``source`` as one ``torch.save`` file ``out`` (atomically).

    The file holds the same nested state (student, teacher in the official layout, optimizer, ...), so ``franca
    train`` resumes from it, and ``franca.load_backbone`` / ``load_heads`` read its teacher.
    """
    if not is_sharded_checkpoint(source):
        raise CheckpointError(f"{source}: not a sharded checkpoint folder (it has no .metadata file)")
    state = read_sharded_checkpoint(source)
    return atomic_torch_save(state, out, state_bytes(state))


def shard_checkpoint(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the single-file checkpoint ``source`` as a ``torch.distributed.checkpoint`` folder ``out``.

    The folder holds unsharded tensors; a run of any world size resumes from it, each rank reading its own slices.
    Written under a temporary name and renamed into place.
    """
    # lazy: torch.distributed.checkpoint takes ~0.6 s to import; only sharded checkpoints need it
    import torch.distributed.checkpoint as dcp

    state = load_checkpoint(source)
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out}: already exists; choose a new folder name")
    with atomic_target(out, state_bytes(state)) as tmp, dcp_single_process():
        tmp.mkdir(parents=True)
        dcp.save(state, checkpoint_id=tmp)
    return out


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that killed saves left in a run directory (``*.tmp`` files and folders of the run
    folder and of its checkpoint folder). Call it only while holding the run's :class:`RunLock`: a live writer's
    temporaries look the same."""
    stale: list[Path] = []
    for folder in (Path(run_dir), Path(run_dir) / CHECKPOINT_DIR):
        if folder.is_dir():
            stale += sorted(folder.glob("*.tmp"))  # hidden names (.x.tmp) included: pathlib's * matches dots
    for path in stale:
        remove_path(path)
    return stale


def sharded_checkpoint_shapes(path: str | os.PathLike, entry: str) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors under top-level ``entry`` of a sharded checkpoint folder, read from its metadata
    (keys without the ``<entry>.`` prefix)."""
    # lazy: torch.distributed.checkpoint takes ~0.6 s to import; only sharded checkpoints need it
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = f"{entry}."
    return {
        key[len(prefix) :]: tuple(item.size)
        for key, item in metadata.items()
        if key.startswith(prefix) and hasattr(item, "size")
    }


def export_iterations(run_dir: str | os.PathLike) -> tuple[int | None, int | None]:
    """The iterations recorded in the run's teacher exports (backbone, heads); None for a missing or unreadable one."""
    run_dir = Path(run_dir)
    backbone = heads = None
    with contextlib.suppress(Exception), safe_open(str(run_dir / BACKBONE_EXPORT), framework="pt") as handle:
        backbone = int((handle.metadata() or {})["iteration"])
    with contextlib.suppress(Exception):
        heads = int(
            torch.load(run_dir / HEADS_EXPORT, map_location="cpu", weights_only=True, mmap=True)["iteration"]
        )
    return backbone, heads


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (tensors and plain containers only); a sharded folder is consolidated in memory.

    Raises :class:`CheckpointError` (one line) for a file that cannot be read or holds no training state.
    """
    if is_sharded_checkpoint(path):
        state = read_sharded_checkpoint(path)
    else:
        try:
            # memory-mapped: each rank pages in only what it copies into its shards, not a private copy of the state
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # noqa: BLE001 - any failure means the file cannot be resumed from
            # torch's own text may advise weights_only=False, which would run whatever pickle the file holds
            reason = type(error).__name__ if "weights_only" in str(error) else _first_line(error)
            raise CheckpointError(
                f"{path}: not a readable training checkpoint, probably truncated or corrupt ({reason})"
            ) from None
    missing = [key for key in TRAINING_STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not a training checkpoint (no {', '.join(repr(k) for k in missing)} entry); "
            "a run resumes only from the checkpoints/checkpoint_<iteration> files franca train writes"
        )
    return state


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def export_teacher(
    run_dir: str | os.PathLike, official_state: dict[str, torch.Tensor], backbone_config: Any, iteration: int
) -> tuple[Path, Path]:
    """Write the teacher backbone (safetensors) and heads (official layout) from an official-layout teacher state."""
    run_dir = Path(run_dir)
    with torch.device("meta"):  # no allocation and no random initialisation: the training RNG stays untouched
        backbone = DinoVisionTransformer(backbone_config)
    backbone.load_state_dict(
        {k[len("backbone.") :]: v for k, v in official_state.items() if k.startswith("backbone.")},
        assign=True,
    )
    backbone_path = save_backbone(backbone, run_dir / BACKBONE_EXPORT, metadata={"iteration": str(iteration)})
    heads = {k: v for k, v in official_state.items() if k.startswith(("dino_head.", "ibot_head."))}
    heads_path = atomic_torch_save(
        {"teacher": heads, "iteration": iteration}, run_dir / HEADS_EXPORT, state_bytes(heads)
    )
    return backbone_path, heads_path
