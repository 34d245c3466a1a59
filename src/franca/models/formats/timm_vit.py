"""timm's DINOv2 ``VisionTransformer`` layout, both ways.

timm's ``vit_*_patch14_dinov2`` models hold the official tensors under the official names but for three things:

- SwiGLU FFNs are ``SwiGLUPacked`` (``mlp.fc1`` is the official ``mlp.w12``, ``mlp.fc2`` is ``mlp.w3``);
- registers are ``reg_token`` and the register models (``*_reg4_dinov2``, ``no_embed_class=True``) keep no CLS
  position: the CLS position is folded into ``cls_token`` (exact: the CLS position is never resized);
- there is no ``mask_token``, and the attention output projection and the FFN share one bias flag (``proj_bias``).

timm resizes positions with an antialiased bicubic to an explicit size (franca's ``interpolate_offset=0``,
``interpolate_antialias=True``, the DINOv2 register models' setting).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from franca.models.formats.positions import Size
from franca.models.vision_transformer import DinoVisionTransformer, ViTConfig

StateDict = dict[str, Tensor]
#: franca's ``interpolate_offset`` and ``interpolate_antialias`` that reproduce timm's run-time resize.
TIMM_RESIZE = {"interpolate_offset": 0.0, "interpolate_antialias": True}
_MLP_NAMES = {384: "vit_small", 768: "vit_base", 1024: "vit_large"}
_FC = re.compile(r"^(blocks\.\d+\.mlp\.)fc([12])\.")


def mlp_ratio(dim: int, hidden: int) -> float:
    """A ratio r with ``int(dim * r) == hidden``, how timm and transformers derive an FFN's width from it."""
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        ratio = (hidden + 0.5) / dim
    return ratio


def timm_model_args(config: ViTConfig, size: Size) -> tuple[str, dict[str, Any]]:
    """The ``timm.create_model`` name and keyword arguments (JSON values) of a backbone of ``config``.

    SwiGLU backbones build on ``vit_giant_patch14[_reg4]_dinov2`` (timm's only SwiGLU DINOv2), MLP ones on the
    name of their width; the keywords set every architecture field, so any width, depth or FFN size works.
    ``size`` is the input size the position grid is stored for; ``dynamic_img_size=True`` lets timm resize it.
    """
    registers = config.num_register_tokens
    swiglu = config.ffn_layer == "swiglu"
    base = "vit_giant" if swiglu else _MLP_NAMES.get(config.embed_dim, "vit_small")
    name = f"{base}_patch14{'_reg4' if registers else ''}_dinov2"
    hidden = config.resolved_ffn_hidden_dim()
    kwargs: dict[str, Any] = {
        "img_size": size[0] if size[0] == size[1] else list(size),
        "patch_size": config.patch_size,
        "in_chans": config.in_chans,
        "embed_dim": config.embed_dim,
        "depth": config.depth,
        "num_heads": config.num_heads,
        "mlp_ratio": mlp_ratio(config.embed_dim, 2 * hidden if swiglu else hidden),
        # 0.0, not None: timm.create_model drops None keywords, and a falsy init_values builds no LayerScale
        "init_values": config.layerscale_init or 0.0,
        "qkv_bias": config.qkv_bias,
        "proj_bias": config.proj_bias or config.ffn_bias,
        "reg_tokens": registers,
        "no_embed_class": bool(registers),
        "dynamic_img_size": True,
        "num_classes": 0,
    }
    return name, kwargs


def to_timm(model: DinoVisionTransformer, positions: Tensor, kwargs: Mapping[str, Any]) -> StateDict:
    """The backbone's tensors in timm's layout, with ``positions`` [1, 1 + N, D] as its position embedding.

    Missing biases that timm's one ``proj_bias`` flag adds are zeros (the same function).
    """
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    state.pop("mask_token")
    state.pop("rasa.weight", None)
    registers = state.pop("register_tokens", None)
    out: StateDict = {}
    for key, value in state.items():
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = value
    positions = positions.to(out["pos_embed"].dtype)
    if registers is not None:
        out["reg_token"] = registers
        out["cls_token"] = out["cls_token"] + positions[:, :1]
        out["pos_embed"] = positions[:, 1:].clone()
    else:
        out["pos_embed"] = positions.clone()
    if kwargs["proj_bias"]:
        for index in range(model.n_blocks):
            for name, dim in (
                ("attn.proj", model.embed_dim),
                ("mlp.fc1", None),
                ("mlp.fc2", model.embed_dim),
            ):
                key = f"blocks.{index}.{name}.bias"
                if key not in out:
                    rows = dim or out[f"blocks.{index}.{name}.weight"].shape[0]
                    out[key] = torch.zeros(rows, dtype=out["pos_embed"].dtype)
    return out


def _is_square(count: int) -> bool:
    return count > 0 and math.isqrt(count) ** 2 == count


def _packed_swiglu(state: Mapping[str, Tensor]) -> bool:
    """Whether block 0's ``mlp.fc1`` is twice as wide as ``mlp.fc2``'s input (timm's ``SwiGLUPacked``)."""
    fc1, fc2 = state.get("blocks.0.mlp.fc1.weight"), state.get("blocks.0.mlp.fc2.weight")
    if fc1 is None or fc2 is None or fc1.ndim != 2 or fc2.ndim != 2:
        return False
    return fc1.shape[0] == 2 * fc2.shape[1]


def is_timm_layout(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` holds tensors only timm writes: ``reg_token``, a packed SwiGLU ``mlp.fc1`` twice as wide as
    ``mlp.fc2``'s input, or a position embedding without a CLS position. (timm's MLP models without registers
    have the official layout exactly.)"""
    if "reg_token" in state:
        return True
    if _packed_swiglu(state):
        return True
    pos = state.get("pos_embed")
    return pos is not None and pos.ndim == 3 and "cls_token" in state and _is_square(pos.shape[1])


def _official_ffn_name(match: re.Match) -> str:
    return match.group(1) + ("w12." if match.group(2) == "1" else "w3.")


def from_timm(state: Mapping[str, Tensor]) -> StateDict:
    """timm's tensors in the official layout: packed SwiGLU renamed, ``reg_token`` -> ``register_tokens``, a CLS
    position of zeros where timm keeps none, register positions (``no_embed_class=False``) folded into the
    registers; the classifier (``head.*``) is dropped."""
    out = {key: value for key, value in state.items() if not key.startswith("head.")}
    if _packed_swiglu(out):
        out = {_FC.sub(_official_ffn_name, key): value for key, value in out.items()}
    registers = out.pop("reg_token", None)
    pos = out.get("pos_embed")
    count = registers.shape[1] if registers is not None else 0
    if pos is not None and pos.ndim == 3:
        if _is_square(pos.shape[1]):  # no_embed_class: the CLS token carries no position
            out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        elif count and not _is_square(pos.shape[1] - 1) and _is_square(pos.shape[1] - 1 - count):
            registers = registers + pos[:, 1 : 1 + count]
            out["pos_embed"] = torch.cat([pos[:, :1], pos[:, 1 + count :]], dim=1)
    if registers is not None:
        out["register_tokens"] = registers
    return out
