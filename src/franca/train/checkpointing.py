"""Training checkpoints and exports of a run directory.

Layout of ``<run>/``::

    config.yaml                       the resolved configuration
    metrics.jsonl                     one JSON line per logged step
    checkpoints/checkpoint_<iter>.pt  full training state (student, teacher, optimizer, scaler, RNG, position)
    teacher_backbone.safetensors      the EMA teacher backbone: franca.load_backbone(...) reads it
    teacher_heads.pth                 the teacher heads in the official layout: franca.load_heads(...) reads it

Every file is written under a temporary name and renamed into place, so a killed process never leaves a partial
checkpoint where a resume would read it. A training checkpoint's ``teacher`` entry has the official release layout
(``backbone.*``, ``dino_head.*``, ``ibot_head.*``), so ``load_backbone``/``load_heads`` read it directly as well.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from franca.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")


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


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of the complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def save_checkpoint(
    run_dir: str | os.PathLike, iteration: int, state: dict[str, Any], keep_last: int = 3
) -> Path:
    """Write ``checkpoints/checkpoint_<iteration>.pt`` atomically, then delete all but the ``keep_last`` newest."""
    path = atomic_torch_save(state, Path(run_dir) / CHECKPOINT_DIR / f"checkpoint_{iteration:08d}.pt")
    if keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
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
    backbone = DinoVisionTransformer(backbone_config)
    backbone.load_state_dict(
        {k[len("backbone.") :]: v for k, v in official_state.items() if k.startswith("backbone.")}
    )
    backbone_path = save_backbone(
        backbone, run_dir / "teacher_backbone.safetensors", metadata={"iteration": str(iteration)}
    )
    heads = {k: v for k, v in official_state.items() if k.startswith(("dino_head.", "ibot_head."))}
    heads_path = atomic_torch_save({"teacher": heads, "iteration": iteration}, run_dir / "teacher_heads.pth")
    return backbone_path, heads_path
