"""Reading and writing backbone checkpoints.

:func:`load_backbone` accepts every layout users meet and infers the architecture from the tensors:

1. official Franca release files ``{"teacher": {...}}`` with ``module.``/``backbone.`` prefixes, FSDP-chunked block keys
   ``blocks.<chunk>.<index>.`` and ``dino_head.*``/``ibot_head.*``/``rasa_head.*`` tensors (ignored by the backbone);
2. the later backbone-only release files (flat keys);
3. official DINOv2 files (flat keys, ``mlp`` or ``swiglu`` FFN, with or without registers);
4. this project's exports (safetensors with the architecture in the metadata, see :func:`save_backbone`) and its
   training checkpoints (whose ``teacher`` entry has the official layout): single files, and the sharded
   ``torch.distributed.checkpoint`` folders of FSDP runs (only the teacher's tensors are read from those).

Nothing is ever unpickled beyond tensors and plain containers (``weights_only=True``). Every problem is reported as
one :class:`~franca.errors.CheckpointError` line that names the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from franca.errors import CheckpointError
from franca.models.vision_transformer import DinoVisionTransformer, ViTConfig

FORMAT_KEY = "franca_format"
BACKBONE_FORMAT = "backbone"
HEAD_PREFIXES = ("dino_head.", "ibot_head.", "rasa_head.")
STRIPPED_PREFIXES = ("module.", "_orig_mod.", "backbone.")
WRAPPER_KEYS = ("teacher", "model", "state_dict", "module")
_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")

StateDict = dict[str, Tensor]
DCP_METADATA = ".metadata"  # the file that makes a folder a complete torch.distributed.checkpoint


def _describe(source: Any) -> str:
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
        raise CheckpointError(f"{path}: is a directory; give the checkpoint file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty; download or export it again")
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({error}); it may be truncated"
            ) from None
        return state, metadata
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "unsupported object"
        raise CheckpointError(
            f"{path}: holds Python objects other than tensors, which are not loaded for safety ({first_line}); "
            "re-save it with torch.save(state_dict) or export it with franca.save_backbone"
        ) from None
    except (
        Exception
    ) as error:  # torch raises many types for corrupt files (RuntimeError, EOFError, IndexError...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, probably truncated or corrupt ({reason})"
        ) from None
    return _unwrap(obj, path), metadata


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete ``torch.distributed.checkpoint`` folder (one shard file per rank + metadata)."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file()


def read_sharded_checkpoint(path: str | os.PathLike, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The nested state dict saved in a ``torch.distributed.checkpoint`` folder, consolidated in this process.

    ``keys`` limits the read to some top-level entries (``("teacher",)`` reads a tenth of a training checkpoint).
    Runs without collectives, so one process may call it inside a distributed job.
    """
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
    except Exception as error:  # noqa: BLE001 - DCP wraps reader failures in several types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable sharded checkpoint ({reason})") from None
    return state


def dcp_load(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.distributed.checkpoint.load`` of folder ``path`` into ``state`` (in place).

    With a process group, every rank must call it (the ranks plan the reads together); without one it reads in this
    process alone.
    """
    from torch.distributed.checkpoint import FileSystemReader, load

    with dcp_single_process():
        load(state, storage_reader=FileSystemReader(str(path)))


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
            f"{_describe(source)}: holds a {type(obj).__name__}, not a state dict of tensors"
        )
    state = {str(key): value for key, value in obj.items() if isinstance(value, Tensor)}
    if not state:
        raise CheckpointError(f"{_describe(source)}: contains no tensors; is it a model checkpoint?")
    return state


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> StateDict:
    """A flat ``{name: tensor}`` dict from a checkpoint path or an (optionally wrapped) state dict."""
    if isinstance(source, Mapping):
        return _unwrap(source, source)
    return read_checkpoint(source)[0]


def split_backbone_state(state: Mapping[str, Tensor]) -> tuple[StateDict, StateDict]:
    """Normalise official key layouts; returns (backbone tensors with canonical names, head tensors).

    Strips ``module.``, ``_orig_mod.`` and ``backbone.`` prefixes, keeps only the ``teacher.`` copy when both
    ``student.`` and ``teacher.`` are present, and maps FSDP-chunked ``blocks.<chunk>.<index>.`` to ``blocks.<index>.``
    (the inner index is already global).
    """
    if any(key.startswith("teacher.") for key in state):
        state = {key[len("teacher.") :]: value for key, value in state.items() if key.startswith("teacher.")}
    backbone: StateDict = {}
    heads: StateDict = {}
    for key, value in state.items():
        name = key
        changed = True
        while changed:
            changed = False
            for prefix in STRIPPED_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix) :], True
        name = name.replace(".module.", ".").replace("._orig_mod.", ".")
        if name.startswith(HEAD_PREFIXES):
            heads[name] = value
            continue
        name = _CHUNKED_BLOCK.sub(r"blocks.\2.", name)
        backbone[name] = value
    return backbone, heads


def infer_config(
    backbone: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, source: Any = None
) -> ViTConfig:
    """The :class:`ViTConfig` implied by canonical backbone tensors (and by an export's metadata when present)."""
    where = _describe(source)
    if metadata and metadata.get("config"):
        try:
            stored = json.loads(metadata["config"])
            known = {f.name for f in fields(ViTConfig)}
            return ViTConfig(**{key: value for key, value in stored.items() if key in known})
        except (json.JSONDecodeError, TypeError) as error:
            raise CheckpointError(
                f"{where}: the architecture stored in the metadata is unreadable ({error})"
            ) from None
    required = ("patch_embed.proj.weight", "cls_token", "pos_embed", "norm.weight")
    missing = [key for key in required if key not in backbone]
    if missing:
        sample = ", ".join(sorted(backbone)[:5]) or "none"
        raise CheckpointError(
            f"{where}: unknown layout, no backbone tensor {missing[0]!r} (first keys: {sample}); "
            "expected an official Franca/DINOv2 checkpoint or a franca export"
        )
    patch_weight = backbone["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_size = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[-1]
    block_ids = sorted({int(m.group(1)) for key in backbone if (m := _BLOCK.match(key))})
    if not block_ids:
        raise CheckpointError(f"{where}: has no transformer blocks (no 'blocks.<i>.' tensors)")
    if block_ids != list(range(len(block_ids))):
        gaps = sorted(set(range(block_ids[-1] + 1)) - set(block_ids))
        raise CheckpointError(f"{where}: blocks {gaps[:5]} are missing; the checkpoint is incomplete")
    n_pos = backbone["pos_embed"].shape[1] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise CheckpointError(f"{where}: pos_embed has {n_pos} patch positions, not a square grid")
    if "blocks.0.mlp.w12.weight" in backbone:
        ffn_layer, hidden = "swiglu", backbone["blocks.0.mlp.w12.weight"].shape[0] // 2
        ffn_bias = "blocks.0.mlp.w12.bias" in backbone
    elif "blocks.0.mlp.fc1.weight" in backbone:
        ffn_layer, hidden = "mlp", backbone["blocks.0.mlp.fc1.weight"].shape[0]
        ffn_bias = "blocks.0.mlp.fc1.bias" in backbone
    else:
        raise CheckpointError(f"{where}: block 0 has neither mlp.w12 (SwiGLU) nor mlp.fc1 (MLP) weights")
    registers = backbone["register_tokens"].shape[1] if "register_tokens" in backbone else 0
    return ViTConfig(
        embed_dim=embed_dim,
        depth=len(block_ids),
        num_heads=max(1, embed_dim // 64),
        patch_size=patch_size,
        img_size=grid * patch_size,
        in_chans=in_chans,
        ffn_layer=ffn_layer,
        ffn_hidden_dim=hidden,
        num_register_tokens=registers,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in backbone else None,
        qkv_bias="blocks.0.attn.qkv.bias" in backbone,
        proj_bias="blocks.0.attn.proj.bias" in backbone,
        ffn_bias=ffn_bias,
    )


# Fields fixed by the tensors: an override must agree with the checkpoint.
_SHAPE_FIELDS = (
    "embed_dim",
    "depth",
    "patch_size",
    "in_chans",
    "ffn_layer",
    "ffn_hidden_dim",
    "num_register_tokens",
)


def _apply_overrides(config: ViTConfig, overrides: Mapping[str, Any], where: str) -> ViTConfig:
    known = {f.name for f in fields(ViTConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise CheckpointError(
                f"unknown backbone option {key!r} for {where}; valid options: {', '.join(sorted(known))}"
            )
        if key in _SHAPE_FIELDS and getattr(config, key) != value:
            raise CheckpointError(
                f"{where}: the checkpoint has {key}={getattr(config, key)!r} but {key}={value!r} was requested"
            )
    if "num_heads" in overrides and config.embed_dim % overrides["num_heads"]:
        raise CheckpointError(
            f"{where}: embed_dim {config.embed_dim} is not divisible by num_heads={overrides['num_heads']}"
        )
    return replace(config, **overrides)


def resample_pos_embed(pos_embed: Tensor, new_grid: int, num_prefix_tokens: int = 1) -> Tensor:
    """Resize a [1, prefix+G*G, D] position embedding to a new square grid (bicubic, antialiased, explicit size).

    This is how the official high-resolution fine-tuning prepares its checkpoints (not the run-time kludge).
    """
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(patch.shape[1])
    if old_grid == new_grid:
        return pos_embed
    grid = patch.float().reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", antialias=True, align_corners=False)
    patch = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(pos_embed.dtype)
    return torch.cat([prefix, patch], dim=1)


def load_backbone(
    source: str | os.PathLike | Mapping[str, Any],
    rasa: str | os.PathLike | Mapping[str, Any] | Tensor | bool | None = None,
    **overrides: Any,
) -> DinoVisionTransformer:
    """Build a backbone from a checkpoint and load its weights exactly; returns the model in eval mode.

    ``source`` is a ``.pth``/``.pt``/``.safetensors`` path or a state dict in any of the layouts of the module doc.
    The architecture is inferred from the tensors; ``overrides`` may set what tensors cannot tell (``num_heads``,
    ``drop_path_rate``, ``interpolate_offset``...) and ``img_size``, which resamples the position embedding to the new
    grid. ``rasa`` attaches a RASA head: a head file or state dict (``pre_pos_layers.*``/``pos_pred.weight``), a
    folded [D, D] matrix, or ``True`` to use the ``rasa_head.*`` tensors stored in ``source``.
    """
    where = _describe(source)
    if isinstance(source, Mapping):
        state, metadata = _unwrap(source, source), {}
    else:
        state, metadata = read_checkpoint(source)
    backbone, heads = split_backbone_state(state)
    config = infer_config(backbone, metadata, source)
    requested_img_size = overrides.pop("img_size", None)
    config = _apply_overrides(config, overrides, where)
    if requested_img_size is not None and requested_img_size != config.img_size:
        if requested_img_size % config.patch_size:
            raise CheckpointError(
                f"img_size={requested_img_size} is not a multiple of the patch size {config.patch_size}"
            )
        prefix = 1
        backbone["pos_embed"] = resample_pos_embed(
            backbone["pos_embed"], requested_img_size // config.patch_size, prefix
        )
        config = replace(config, img_size=requested_img_size)
    rasa_matrix = backbone.pop("rasa.weight", None)
    model = DinoVisionTransformer(config)
    if "mask_token" not in backbone:  # some exports omit it; it only matters for masked training inputs
        backbone["mask_token"] = torch.zeros_like(model.mask_token)
    result = model.load_state_dict(backbone, strict=False)
    if result.missing_keys:
        raise CheckpointError(
            f"{where}: {len(result.missing_keys)} backbone tensors are missing (e.g. {result.missing_keys[0]!r}); "
            "the checkpoint is incomplete or of another architecture"
        )
    if result.unexpected_keys:
        raise CheckpointError(
            f"{where}: {len(result.unexpected_keys)} tensors are not part of the inferred "
            f"{config.depth}-block backbone (e.g. {result.unexpected_keys[0]!r})"
        )
    if rasa is True:
        rasa = {
            key[len("rasa_head.") :]: value for key, value in heads.items() if key.startswith("rasa_head.")
        }
        if not rasa:
            raise CheckpointError(f"{where}: rasa=True but the checkpoint has no rasa_head.* tensors")
    if rasa is not None and rasa is not False:
        from franca.rasa import rasa_matrix_from

        rasa_matrix = rasa_matrix_from(rasa, embed_dim=config.embed_dim)
    if rasa_matrix is not None:
        model.set_rasa(rasa_matrix)
    return model.eval()


def save_backbone(
    model: DinoVisionTransformer, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write the backbone (and its folded RASA matrix, if any) as safetensors with the architecture in the metadata.

    The file is written to a temporary name and renamed, so an interrupted save never leaves a partial file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: backbone exports are safetensors files; use a .safetensors name")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)
    tensors = {
        key: value.detach().to("cpu").contiguous().clone() for key, value in model.state_dict().items()
    }
    info = {FORMAT_KEY: BACKBONE_FORMAT, "config": json.dumps(model.config.to_dict())}
    info.update(dict(metadata or {}))
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=info)
    os.replace(tmp, path)
    return path
