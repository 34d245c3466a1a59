"""Reading and writing backbone checkpoints.

:func:`load_backbone` accepts every layout users meet and infers the architecture from the tensors:

1. official Franca release files ``{"teacher": {...}}`` with ``module.``/``backbone.`` prefixes, FSDP-chunked block keys
   ``blocks.<chunk>.<index>.`` and ``dino_head.*``/``ibot_head.*``/``rasa_head.*`` tensors (ignored by the backbone);
2. the later backbone-only release files (flat keys);
3. official DINOv2 files (flat keys, ``mlp`` or ``swiglu`` FFN, with or without registers);
4. this project's exports (safetensors with the architecture in the metadata, see :func:`save_backbone`) and its
   training checkpoints (whose ``teacher`` entry has the official layout): single files, and the sharded
   ``torch.distributed.checkpoint`` folders of FSDP runs (only the teacher's tensors are read from those);
5. timm DINOv2 state dicts (``vit_*_patch14[_reg4]_dinov2``: packed SwiGLU, ``reg_token``, no CLS position);
6. Hugging Face transformers ``Dinov2Model``/``Dinov2WithRegistersModel`` folders (``config.json`` + weights) and
   state dicts, under the Hub's or transformers 5's names.

Layouts 5 and 6 are turned into the official one by :func:`franca.models.formats.to_official_layout`, which also
sets the source's own position resize (and, from a ``config.json``, its head count) unless the file carries franca's
config; franca then gives the library's features at every input size.

Nothing in a file is ever unpickled beyond tensors and plain containers (``weights_only=True``), and torch's advice to
load with ``weights_only=False`` is never passed on. Sharded folders are the exception: torch.distributed.checkpoint
pickles their ``.metadata`` and non-tensor entries, so read only folders that you (or your own runs) wrote. Every problem is reported as one :class:`~franca.core.errors.CheckpointError`
line that names the file: an architecture (metadata or overrides) is validated in :func:`build_config`, and every tensor
is compared with the built model (:func:`check_tensors`) before it is loaded. Weights holding NaN or inf values are
loaded with one logged warning naming them (:func:`warn_non_finite`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from franca.core.errors import CheckpointError
from franca.core.io import atomic_target
from franca.models.files import StateDict, describe_source, read_checkpoint, read_state_dict
from franca.models.formats import FORMAT_KEY, to_official_layout
from franca.models.layers import FFN_LAYERS
from franca.models.rasa import rasa_matrix_from
from franca.models.state import check_tensors, warn_non_finite
from franca.models.vision_transformer import DinoVisionTransformer, ViTConfig

BACKBONE_FORMAT = "backbone"
HEAD_PREFIXES = ("dino_head.", "ibot_head.", "rasa_head.")
STRIPPED_PREFIXES = ("module.", "_orig_mod.", "backbone.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


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


# Options that must be whole numbers, at least 1 or at least 0; flags; the numbers of the config.
_POSITIVE_INTS = ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "in_chans")
_NON_NEGATIVE_INTS = ("ffn_hidden_dim", "num_register_tokens")
_FLAGS = ("qkv_bias", "proj_bias", "ffn_bias", "drop_path_uniform", "interpolate_antialias")
# Tensors infer_config reads, and the number of dimensions each must have.
_RANKS = {
    "patch_embed.proj.weight": 4,
    "cls_token": 3,
    "pos_embed": 3,
    "norm.weight": 1,
    "register_tokens": 3,
    "blocks.0.mlp.w12.weight": 2,
    "blocks.0.mlp.fc1.weight": 2,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def config_problem(config: ViTConfig) -> str | None:
    """What makes ``config`` an architecture that cannot be built (the first problem), or ``None``."""
    for name in _POSITIVE_INTS + _NON_NEGATIVE_INTS:
        value, least = getattr(config, name), 1 if name in _POSITIVE_INTS else 0
        if not _is_int(value) or value < least:
            return f"{name}={value!r} must be {'a positive' if least else 'a non-negative'} integer"
    if config.embed_dim % config.num_heads:
        return f"embed_dim={config.embed_dim} is not divisible by num_heads={config.num_heads}"
    if config.img_size < config.patch_size:
        return f"img_size={config.img_size} is smaller than patch_size={config.patch_size}"
    if config.ffn_layer not in FFN_LAYERS:
        return f"ffn_layer={config.ffn_layer!r} is unknown; use one of {', '.join(map(repr, FFN_LAYERS))}"
    flag = next((name for name in _FLAGS if not isinstance(getattr(config, name), bool)), None)
    if flag is not None:
        return f"{flag}={getattr(config, flag)!r} must be true or false"
    if not _is_number(config.drop_path_rate) or not 0 <= config.drop_path_rate < 1:
        return f"drop_path_rate={config.drop_path_rate!r} must be a number in [0, 1)"
    if not _is_number(config.interpolate_offset):
        return f"interpolate_offset={config.interpolate_offset!r} must be a number"
    if config.layerscale_init is not None and not _is_number(config.layerscale_init):
        return f"layerscale_init={config.layerscale_init!r} must be a number or null"
    return None


def build_config(values: Mapping[str, Any], where: str, origin: str, fix: str) -> ViTConfig:
    """The :class:`ViTConfig` of ``values``, or one :class:`CheckpointError` naming ``where``, ``origin`` (where the
    values come from, e.g. "the backbone in its 'config' metadata"), the first impossible option and ``fix``."""
    unknown = sorted(set(values) - {f.name for f in fields(ViTConfig)})
    if unknown:
        raise CheckpointError(
            f"{where}: {origin} has unknown option(s) {', '.join(map(repr, unknown))}; {fix}"
        )
    try:
        config = ViTConfig(**values)
    except (TypeError, ValueError) as error:  # the checks of ViTConfig.__post_init__
        problem: str | None = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
    else:
        problem = config_problem(config)
    if problem:
        raise CheckpointError(f"{where}: {origin} cannot be built: {problem}; {fix}")
    return config


_METADATA_FIX = (
    "the file was edited or written by another franca version: export it again with franca.save_backbone"
)


def _config_from_metadata(text: str, where: str) -> ViTConfig:
    """The architecture a franca export stores as JSON in its ``config`` metadata entry, validated."""
    try:
        stored = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{where}: its 'config' metadata is not valid JSON ({error}); {_METADATA_FIX}"
        ) from None
    if not isinstance(stored, dict):
        raise CheckpointError(
            f"{where}: its 'config' metadata is a JSON {type(stored).__name__}, not an object of backbone options; "
            f"{_METADATA_FIX}"
        )
    return build_config(stored, where, "the backbone in its 'config' metadata", _METADATA_FIX)


def _require_ranks(backbone: Mapping[str, Tensor], where: str) -> None:
    """Stop with one line when a tensor the inference reads has the wrong number of dimensions."""
    for key, rank in _RANKS.items():
        if key in backbone and backbone[key].ndim != rank:
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {list(backbone[key].shape)}, expected {rank} dimensions; "
                "the file is corrupt or edited: download or export it again"
            )


def infer_config(
    backbone: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, source: Any = None
) -> ViTConfig:
    """The :class:`ViTConfig` implied by canonical backbone tensors (and by an export's metadata when present).

    A config read from metadata is validated (:func:`build_config`); :func:`load_backbone` then checks every tensor's
    shape against it.
    """
    where = describe_source(source)
    if metadata and metadata.get("config"):
        return _config_from_metadata(metadata["config"], where)
    required = ("patch_embed.proj.weight", "cls_token", "pos_embed", "norm.weight")
    missing = [key for key in required if key not in backbone]
    if missing:
        sample = ", ".join(sorted(backbone)[:5]) or "none"
        raise CheckpointError(
            f"{where}: unknown layout, no backbone tensor {missing[0]!r} (first keys: {sample}); "
            "expected an official Franca/DINOv2 checkpoint, a franca export, or a timm or transformers DINOv2 model"
        )
    _require_ranks(backbone, where)
    patch_weight = backbone["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_size = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[-1]
    block_ids = sorted({int(m.group(1)) for key in backbone if (m := _BLOCK.match(key))})
    if not block_ids:
        raise CheckpointError(f"{where}: has no transformer blocks (no 'blocks.<i>.' tensors)")
    if block_ids != list(range(len(block_ids))):
        gaps = sorted(set(range(block_ids[-1] + 1)) - set(block_ids))
        raise CheckpointError(f"{where}: blocks {gaps[:5]} are missing; the checkpoint is incomplete")
    n_pos = backbone["pos_embed"].shape[1] - 1
    grid = math.isqrt(max(n_pos, 0))
    if n_pos < 1 or grid * grid != n_pos:
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
    """``config`` with the keyword overrides of :func:`load_backbone`, validated (one line naming the option)."""
    known = {f.name for f in fields(ViTConfig)}
    for key in overrides:
        if key not in known:
            raise CheckpointError(
                f"unknown backbone option {key!r} for {where}; valid options: {', '.join(sorted(known))}"
            )
    if overrides:
        requested = ", ".join(f"{key}={value!r}" for key, value in overrides.items())
        origin, fix = f"the backbone with {requested}", "choose options that fit the checkpoint"
    else:
        origin, fix = (
            "the backbone inferred from its tensors",
            "pass num_heads (and other options) that fit it",
        )
    result = build_config({**asdict(config), **overrides}, where, origin, fix)
    for key in _SHAPE_FIELDS:
        if key in overrides and getattr(config, key) != overrides[key]:
            raise CheckpointError(
                f"{where}: the checkpoint has {key}={getattr(config, key)!r} but {key}={overrides[key]!r} "
                "was requested"
            )
    return result


def _summary(config: ViTConfig) -> str:
    """The architecture in a few words, for error messages."""
    return (
        f"embed_dim={config.embed_dim}, depth={config.depth}, patch_size={config.patch_size}, "
        f"img_size={config.img_size}, ffn_layer={config.ffn_layer!r}"
    )


def _expected_shapes(
    model: DinoVisionTransformer, stored: ViTConfig, with_rasa: bool
) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a checkpoint of architecture ``stored`` holds for ``model`` (built with the overrides):
    ``pos_embed`` at the stored grid (it is resampled afterwards), ``rasa.weight`` [D, D] when the file has one."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    grid = stored.img_size // stored.patch_size
    expected["pos_embed"] = (1, 1 + grid * grid, stored.embed_dim)
    if with_rasa:
        expected["rasa.weight"] = (stored.embed_dim, stored.embed_dim)
    return expected


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

    ``source`` is a ``.pth``/``.pt``/``.safetensors`` path, a transformers model folder or a state dict in any of the
    layouts of the module doc.
    The architecture is inferred from the tensors; ``overrides`` may set what tensors cannot tell (``num_heads``,
    ``drop_path_rate``, ``interpolate_offset``...) and ``img_size``, which resamples the position embedding to the new
    grid. ``rasa`` attaches a RASA head: a head file or state dict (``pre_pos_layers.*``/``pos_pred.weight``), a
    folded [D, D] matrix, or ``True`` to use the ``rasa_head.*`` tensors stored in ``source``.

    An impossible architecture (stored or requested) and a missing, extra or misshapen tensor raise one
    :class:`CheckpointError` line naming the file and the option or tensor; NaN/inf weights load with one warning.
    """
    where = describe_source(source)
    if isinstance(source, Mapping):
        state, metadata = read_state_dict(source), {}
    else:
        state, metadata = read_checkpoint(source)
    backbone, heads = split_backbone_state(state)
    backbone, implied = to_official_layout(backbone, metadata, where)  # timm and transformers layouts
    stored = infer_config(backbone, metadata, source)
    if implied and not metadata.get("config"):
        stored = replace(stored, **implied)
    config = _apply_overrides(stored, overrides, where)
    if config.img_size != stored.img_size and config.img_size % config.patch_size:
        raise CheckpointError(
            f"{where}: img_size={config.img_size} is not a multiple of the patch size {config.patch_size}"
        )
    model = DinoVisionTransformer(config)
    if "mask_token" not in backbone:  # some exports omit it; it only matters for masked training inputs
        backbone["mask_token"] = torch.zeros_like(model.mask_token)
    origin = "described by its 'config' metadata" if metadata.get("config") else "inferred from its tensors"
    described = f"the backbone {origin} ({_summary(stored)})"
    check_tensors(backbone, _expected_shapes(model, stored, "rasa.weight" in backbone), where, described)
    warn_non_finite(backbone, where)
    if config.img_size != stored.img_size:
        grid = config.img_size // config.patch_size
        backbone["pos_embed"] = resample_pos_embed(backbone["pos_embed"], grid, num_prefix_tokens=1)
    rasa_matrix = backbone.pop("rasa.weight", None)
    model.load_state_dict(backbone, strict=True)  # keys and shapes were checked above
    if rasa is True:
        rasa = {
            key[len("rasa_head.") :]: value for key, value in heads.items() if key.startswith("rasa_head.")
        }
        if not rasa:
            raise CheckpointError(f"{where}: rasa=True but the checkpoint has no rasa_head.* tensors")
    if rasa is not None and rasa is not False:
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
    with atomic_target(path, sum(t.numel() * t.element_size() for t in tensors.values())) as tmp:
        save_file(tensors, str(tmp), metadata=info)
    return path
