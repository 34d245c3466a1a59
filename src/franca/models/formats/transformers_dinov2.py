"""Hugging Face transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel`` layout, both ways.

A model folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), or, when saved with a
``max_shard_size``, an index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) and the shards it
names; :func:`weights_files` lists them. Exports use the names of the DINOv2 checkpoints on
the Hugging Face Hub (``attention.attention.query``, ``mlp.weights_in`` ...), which transformers 4 loads as they are
and transformers 5 renames when it loads them; both sets of names are read. transformers always has LayerScale
(``lambda1``) and biases on the attention output and FFN: a backbone without them exports ones and zeros.

``Dinov2Model`` resizes positions with a plain bicubic to an explicit size (franca's ``interpolate_offset=0``,
``interpolate_antialias=False``), ``Dinov2WithRegistersModel`` with an antialiased one (``interpolate_antialias=True``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from franca.core.errors import CheckpointError, ConfigError
from franca.models.vision_transformer import DinoVisionTransformer, ViTConfig

StateDict = dict[str, Tensor]
CONFIG_FILE = "config.json"
#: What save_pretrained writes, in the order transformers prefers them: single files before sharded ones.
WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
INDEX_SUFFIX = ".index.json"
#: The metadata entry under which :func:`franca.models.files.read_checkpoint` passes a folder's config.json.
CONFIG_METADATA = "transformers_config"
#: franca's ``interpolate_offset`` and ``interpolate_antialias`` of each transformers model class.
RESIZE = {
    "Dinov2Model": {"interpolate_offset": 0.0, "interpolate_antialias": False},
    "Dinov2WithRegistersModel": {"interpolate_offset": 0.0, "interpolate_antialias": True},
}
MODEL_TYPES = {"Dinov2Model": "dinov2", "Dinov2WithRegistersModel": "dinov2_with_registers"}
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# transformers name (after "encoder.layer.<i>.") -> official name (after "blocks.<i>.")
_BLOCK_NAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
    "mlp.down_proj": "mlp.w3",
}
_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# the query, key and value projections (official: one qkv), and SwiGLU's two input halves (official: one w12)
_QKV = (
    ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
)
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def model_class(config: ViTConfig) -> str:
    """The transformers class a backbone exports to: with registers, or resizing with antialias, the registers
    model; otherwise ``Dinov2Model``."""
    if config.num_register_tokens or config.interpolate_antialias:
        return "Dinov2WithRegistersModel"
    return "Dinov2Model"


def hf_mlp_ratio(config: ViTConfig) -> int:
    """transformers' ``mlp_ratio`` (an integer in its config) that gives the backbone's FFN width: d * r for the MLP,
    ((int(d*r*2/3)+7)//8)*8 for SwiGLU. ConfigError when no integer does."""
    dim, hidden = config.embed_dim, config.resolved_ffn_hidden_dim()
    if config.ffn_layer == "swiglu":
        ratio = next((r for r in range(1, 65) if (int(dim * r * 2 / 3) + 7) // 8 * 8 == hidden), None)
    else:
        ratio = hidden // dim if hidden % dim == 0 else None
    if ratio is None:
        raise ConfigError(
            f"an FFN {hidden} wide for embed_dim={dim} ({config.ffn_layer}) cannot be expressed in transformers' "
            "Dinov2Config, whose mlp_ratio is an integer; export it as onnx, timm or safetensors"
        )
    return ratio


def hf_config(config: ViTConfig, side: int, architecture: str) -> dict[str, Any]:
    """The ``config.json`` of a backbone of ``config`` whose positions are stored for ``side`` x ``side`` px."""
    values: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": MODEL_TYPES[architecture],
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "mlp_ratio": hf_mlp_ratio(config),
        "use_swiglu_ffn": config.ffn_layer == "swiglu",
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "layerscale_value": float(config.layerscale_init or 1.0),
        "image_size": side,
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": config.qkv_bias,
        "torch_dtype": "float32",
    }
    if architecture == "Dinov2WithRegistersModel":
        values["num_register_tokens"] = config.num_register_tokens
    return values


def to_transformers(model: DinoVisionTransformer, positions: Tensor) -> StateDict:
    """The backbone's tensors in the Hub's DINOv2 layout with ``positions`` [1, 1 + N, D] as position embedding."""
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    state.pop("rasa.weight", None)
    names = {value: key for key, value in _EMBEDDINGS.items()}
    out = {names[key]: state.pop(key) for key in list(state) if key in names}
    out["embeddings.position_embeddings"] = positions.to(out["embeddings.cls_token"].dtype).clone()
    dim, dtype = model.embed_dim, out["embeddings.cls_token"].dtype
    to_hf = {
        official: hf
        for hf, official in _BLOCK_NAMES.items()
        if hf not in ("attention.o_proj", "mlp.down_proj")
    }
    for index in range(model.n_blocks):
        block = {
            key.split(".", 2)[2]: state.pop(key) for key in list(state) if key.startswith(f"blocks.{index}.")
        }
        prefix = f"encoder.layer.{index}."
        for kind in ("weight", "bias"):
            if f"attn.qkv.{kind}" in block:
                for name, part in zip(_QKV[0], block.pop(f"attn.qkv.{kind}").chunk(3), strict=True):
                    out[f"{prefix}{name}.{kind}"] = part.clone()
        for number in ("1", "2"):
            gamma = block.pop(f"ls{number}.gamma", None)
            out[f"{prefix}layer_scale{number}.lambda1"] = (
                gamma if gamma is not None else torch.ones(dim, dtype=dtype)
            )
        for key, value in block.items():
            module, kind = key.rsplit(".", 1)
            out[f"{prefix}{to_hf[module]}.{kind}"] = value
        for module in (
            "attention.output.dense",
            "mlp.fc2",
            "mlp.weights_out",
        ):  # biases transformers always has
            if f"{prefix}{module}.weight" in out and f"{prefix}{module}.bias" not in out:
                out[f"{prefix}{module}.bias"] = torch.zeros(dim, dtype=dtype)
        for module in ("mlp.fc1", "mlp.weights_in"):
            if f"{prefix}{module}.weight" in out and f"{prefix}{module}.bias" not in out:
                out[f"{prefix}{module}.bias"] = torch.zeros(
                    out[f"{prefix}{module}.weight"].shape[0], dtype=dtype
                )
    return out


def is_transformers_layout(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` uses transformers' names (``embeddings.*``, ``encoder.layer.*``, optionally under
    ``dinov2.``)."""
    return any(key.startswith(("embeddings.", "encoder.layer.", "dinov2.embeddings.")) for key in state)


def _merge(block: dict[str, Tensor], names: tuple[str, ...], target: str) -> None:
    """Concatenate the tensors of ``names`` (weight, then bias) along rows into ``target`` (in ``block``)."""
    for kind in ("weight", "bias"):
        parts = [block.pop(f"{name}.{kind}") for name in names if f"{name}.{kind}" in block]
        if parts:
            block[f"{target}.{kind}"] = torch.cat(parts, dim=0)


def from_transformers(state: Mapping[str, Tensor]) -> StateDict:
    """transformers' tensors (Hub or transformers-5 names) in the official layout; ``classifier.*`` is dropped."""
    prefix = "dinov2."
    if any(key.startswith(prefix) for key in state):
        state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    out: StateDict = {}
    blocks: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        layer = _LAYER.match(key)
        if layer:
            blocks.setdefault(int(layer.group(1)), {})[layer.group(2)] = value
        else:
            out[_EMBEDDINGS.get(key, key)] = value
    for index, block in blocks.items():
        for names in _QKV:
            _merge(block, names, "attn.qkv")
        _merge(block, _GATE_UP, "mlp.w12")
        for key, value in block.items():
            module, _, kind = key.rpartition(".")
            if module.startswith("layer_scale") and kind == "lambda1":
                out[f"blocks.{index}.ls{module[-1]}.gamma"] = value
            elif module in _BLOCK_NAMES:
                out[f"blocks.{index}.{_BLOCK_NAMES[module]}.{kind}"] = value
            else:
                out[f"blocks.{index}.{key}"] = value
    return out


def implied_options(state: Mapping[str, Tensor], config_text: str | None, where: str) -> dict[str, Any]:
    """The franca options a transformers model implies: its resize, and its head count when its config is known.

    Refuses one line when the config asks for what franca's backbone does not compute (another activation or
    layer-norm epsilon).
    """
    registers = any(key.endswith("embeddings.register_tokens") for key in state)
    values: dict[str, Any] = {}
    if config_text:
        try:
            values = json.loads(config_text)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{where}: config.json is not valid JSON ({error})") from None
    registers = registers or values.get("model_type") == "dinov2_with_registers"
    options = dict(RESIZE["Dinov2WithRegistersModel" if registers else "Dinov2Model"])
    if not values:
        return options
    if values.get("hidden_act", "gelu") != "gelu" and not values.get("use_swiglu_ffn"):
        raise CheckpointError(
            f"{where}: config.json has hidden_act={values['hidden_act']!r}; franca's MLP computes exact GELU only"
        )
    eps = float(values.get("layer_norm_eps", 1e-6))
    if abs(eps - 1e-6) > 1e-12:
        raise CheckpointError(f"{where}: config.json has layer_norm_eps={eps}; franca's layer norms use 1e-6")
    if isinstance(values.get("num_attention_heads"), int):
        options["num_heads"] = values["num_attention_heads"]
    return options


def is_transformers_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with a ``config.json`` and model weights (what ``save_pretrained`` writes)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and weights_file(path) is not None


def weights_file(folder: Path) -> Path | None:
    """The weights file (or shard index) of a transformers model folder, or None."""
    return next((folder / name for name in WEIGHTS_FILES if (folder / name).is_file()), None)


def weights_files(folder: Path) -> list[Path]:
    """The files holding a transformers model folder's tensors: its weights file, or the shards its index names.

    The index is transformers' ``{"weight_map": {tensor name: shard file name}}``. CheckpointError (one line naming
    the file) for an unreadable index, a shard named outside the folder, or a shard that is missing.
    """
    found = weights_file(folder)
    if found is None:
        raise CheckpointError(f"{folder}: no {' or '.join(WEIGHTS_FILES)} in the folder")
    if not found.name.endswith(INDEX_SUFFIX):
        return [found]
    try:
        weight_map = json.loads(found.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"{found}: not a readable shard index ({type(error).__name__}: {error}); save the model again"
        ) from None
    shards = []
    for name in names:
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{found}: names the shard {name!r}, which is not a file in its folder")
        shard = folder / name
        if not shard.is_file():
            raise CheckpointError(
                f"{shard}: a shard that {found.name} names is missing; copy every file of the model folder"
            )
        shards.append(shard)
    if not shards:
        raise CheckpointError(f"{found}: the index names no shard files; save the model again")
    return shards
