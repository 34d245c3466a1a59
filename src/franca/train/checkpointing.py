"""Training checkpoints and exports of a run directory.

Layout of ``<run>/``::

    config.yaml                       the resolved configuration
    metrics.jsonl                     one JSON line per logged step
    checkpoints/checkpoint_<iter>.pt  full training state (student, teacher, optimizer, scaler, RNG, position), or
    checkpoints/checkpoint_<iter>.dcp/  the same state as a torch.distributed.checkpoint folder (FSDP runs): every rank
                                      writes its own shards, and a run resumes from it on any world size
    teacher_backbone.safetensors      the EMA teacher backbone: franca.load_backbone(...) reads it
    teacher_heads.pth                 the teacher heads in the official layout: franca.load_heads(...) reads it

Every file and folder is written under a temporary name and renamed into place (a folder by rank 0 once every rank
has finished), so a killed process never leaves a partial checkpoint where a resume would read it. A training
checkpoint's ``teacher`` entry has the official release layout (``backbone.*``, ``dino_head.*``, ``ibot_head.*``),
so ``load_backbone``/``load_heads`` read it directly as well.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from franca import distributed as dist_utils
from franca.checkpoints import (
    dcp_single_process,
    ignore_dcp_single_process_warning,
    is_sharded_checkpoint,
    read_sharded_checkpoint,
)
from franca.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)\.(pt|dcp)$")


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


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


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def rotate_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints (``keep_last <= 0`` keeps all)."""
    if keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            _remove(old)


def save_checkpoint(
    run_dir: str | os.PathLike, iteration: int, state: dict[str, Any], keep_last: int = 3
) -> Path:
    """Write ``checkpoints/checkpoint_<iteration>.pt`` atomically, then delete all but the ``keep_last`` newest."""
    path = atomic_torch_save(state, Path(run_dir) / CHECKPOINT_DIR / f"checkpoint_{iteration:08d}.pt")
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
        self._pending: tuple[Any, Path, Path] | None = None
        self._async_group: Any = None
        if asynchronous and not dist_utils.is_enabled():
            ignore_dcp_single_process_warning()

    def save(self, iteration: int, state: dict[str, Any]) -> Path:
        """Save ``state`` (sharded tensors allowed) as checkpoint ``iteration``; returns the final folder's path."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        final = self.run_dir / CHECKPOINT_DIR / f"checkpoint_{iteration:08d}.dcp"
        tmp = final.with_name(f".{final.name}.tmp")
        if dist_utils.is_main_process():
            _remove(tmp)
            tmp.mkdir(parents=True)
        dist_utils.barrier()
        with dcp_single_process():
            if not self.asynchronous:
                dcp.save(state, checkpoint_id=tmp)
                self._publish(tmp, final)
                return final
            response = dcp.async_save(state, checkpoint_id=tmp, process_group=self._group())
        future = getattr(response, "upload_completion", response)  # torch >= 2.9 may return a response object
        self._pending = (future, tmp, final)
        return final

    def wait(self) -> None:
        """Finish and publish the checkpoint being written in the background, if any."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        future.result()
        self._publish(tmp, final)

    def _group(self) -> Any:
        """A process group of its own for the background writer's collectives (created on first use, by every rank).

        Sharing the training's group would interleave the writer's collectives with the step's all-reduces in a
        different order on each rank; gloo, because NCCL must not be driven from a second thread.
        """
        import torch.distributed as dist

        if not dist_utils.is_enabled():
            return None
        if self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def _publish(self, tmp: Path, final: Path) -> None:
        dist_utils.barrier()
        if dist_utils.is_main_process():
            _remove(final)  # an older copy of the same iteration (a run restarted further back)
            os.replace(tmp, final)
            _fsync_directory(final.parent)
            rotate_checkpoints(self.run_dir, self.keep_last)
        dist_utils.barrier()


def _fsync_directory(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def consolidate_checkpoint(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the sharded checkpoint folder ``source`` as one ``torch.save`` file ``out`` (atomically).

    The file holds the same nested state (student, teacher in the official layout, optimizer, ...), so ``franca
    train`` resumes from it, and ``franca.load_backbone`` / ``load_heads`` read its teacher.
    """
    if not is_sharded_checkpoint(source):
        raise CheckpointError(f"{source}: not a sharded checkpoint folder (it has no .metadata file)")
    return atomic_torch_save(read_sharded_checkpoint(source), Path(out))


def shard_checkpoint(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the single-file checkpoint ``source`` as a ``torch.distributed.checkpoint`` folder ``out``.

    The folder holds unsharded tensors; a run of any world size resumes from it, each rank reading its own slices.
    Written under a temporary name and renamed into place.
    """
    import torch.distributed.checkpoint as dcp

    state = load_checkpoint(source)
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out}: already exists; choose a new folder name")
    tmp = out.with_name(f".{out.name}.tmp")
    _remove(tmp)
    tmp.mkdir(parents=True)
    with dcp_single_process():
        dcp.save(state, checkpoint_id=tmp)
    os.replace(tmp, out)
    return out


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the hidden ``.*.tmp`` files and folders that killed saves left in the run's checkpoint folder."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for path in stale:
        _remove(path)
    return stale


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (tensors and plain containers only); a sharded folder is consolidated in memory."""
    if is_sharded_checkpoint(path):
        return read_sharded_checkpoint(path)
    try:
        # memory-mapped: each rank pages in only what it copies into its shards, not a private copy of the whole state
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any failure means the file cannot be resumed from
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: cannot resume from this training checkpoint ({reason})") from None


def export_teacher(
    run_dir: str | os.PathLike, official_state: dict[str, torch.Tensor], backbone_config: Any, iteration: int
) -> tuple[Path, Path]:
    """Write the teacher backbone (safetensors) and heads (official layout) from an official-layout teacher state."""
    from franca.checkpoints import save_backbone
    from franca.models.vision_transformer import DinoVisionTransformer

    run_dir = Path(run_dir)
    with torch.device("meta"):  # no allocation and no random initialisation: the training RNG stays untouched
        backbone = DinoVisionTransformer(backbone_config)
    backbone.load_state_dict(
        {k[len("backbone.") :]: v for k, v in official_state.items() if k.startswith("backbone.")},
        assign=True,
    )
    backbone_path = save_backbone(
        backbone, run_dir / "teacher_backbone.safetensors", metadata={"iteration": str(iteration)}
    )
    heads = {k: v for k, v in official_state.items() if k.startswith(("dino_head.", "ibot_head."))}
    heads_path = atomic_torch_save({"teacher": heads, "iteration": iteration}, run_dir / "teacher_heads.pth")
    return backbone_path, heads_path
