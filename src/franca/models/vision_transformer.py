"""The DINOv2-style Vision Transformer backbone of Franca.

It reproduces the official model exactly (same parameter names, same position-embedding interpolation with the
0.1 offset, same SwiGLU split order) so that released Franca and DINOv2 checkpoints give the official features.
Inputs of any size whose sides are multiples of the patch size work, square or not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from franca.models.layers import Block, PatchEmbed, check_drop_path_mode, swiglu_hidden_dim


@dataclass(frozen=True)
class ViTConfig:
    """Everything that defines the backbone architecture; stored with every export."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 14
    img_size: int = 224
    in_chans: int = 3
    ffn_layer: str = "swiglu"
    ffn_hidden_dim: int = 0  # 0: derived (4d for mlp, DINOv2's SwiGLU rule for swiglu)
    num_register_tokens: int = 0
    layerscale_init: float | None = 1e-5
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = True
    # Training-time stochastic depth: "batch_subset" (the official student's: each residual branch runs on
    # floor(B(1-p)) random samples of every crop batch, scaled by B / kept, for any p > 0) or "per_sample" (DropPath).
    # No effect on the weights or in eval mode; exports written before this field load with the default.
    drop_path_mode: str = "batch_subset"
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    def __post_init__(self) -> None:
        check_drop_path_mode(self.drop_path_mode)

    def resolved_ffn_hidden_dim(self) -> int:
        if self.ffn_hidden_dim:
            return self.ffn_hidden_dim
        return swiglu_hidden_dim(self.embed_dim) if self.ffn_layer == "swiglu" else 4 * self.embed_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ARCHITECTURES: dict[str, dict[str, int]] = {
    "vit_tiny": {"embed_dim": 192, "depth": 6, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "vit_giant2": {"embed_dim": 1536, "depth": 40, "num_heads": 24},
}


class DinoVisionTransformer(nn.Module):
    """DINOv2/Franca ViT.

    ``forward_features(x)`` returns the dict the official code returns (``x_norm_clstoken`` [B, D],
    ``x_norm_regtokens`` [B, R, D], ``x_norm_patchtokens`` [B, N, D], ``x_prenorm`` [B, 1+R+N, D], ``masks``), plus
    ``x_norm_patchtokens_rasa`` when a RASA matrix is attached (:meth:`set_rasa`). ``forward(x)`` returns the CLS
    feature [B, D].
    """

    def __init__(self, config: ViTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = replace(config or ViTConfig(), **overrides)
        self.config = config
        dim = config.embed_dim
        self.embed_dim = self.num_features = dim
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.n_blocks = config.depth
        self.num_register_tokens = config.num_register_tokens
        self.interpolate_offset = config.interpolate_offset
        self.interpolate_antialias = config.interpolate_antialias

        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim)
        grid = config.img_size // config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, dim))
            if config.num_register_tokens
            else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        if config.drop_path_uniform:
            rates = [config.drop_path_rate] * config.depth
        else:
            rates = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(
                dim,
                config.num_heads,
                config.resolved_ffn_hidden_dim(),
                ffn_layer=config.ffn_layer,
                qkv_bias=config.qkv_bias,
                proj_bias=config.proj_bias,
                ffn_bias=config.ffn_bias,
                layerscale_init=config.layerscale_init,
                drop_path_rate=rate,
                drop_path_mode=config.drop_path_mode,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Identity()
        self.rasa: nn.Linear | None = None
        self.grad_checkpointing = False
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """DINOv2 initialisation: trunc-normal(0.02) position embedding and linears, tiny CLS and register tokens."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.rasa:
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ RASA
    def set_rasa(self, matrix: Tensor | None) -> None:
        """Attach (or with ``None`` remove) a folded RASA matrix [D, D] applied to final patch tokens: z @ M.T."""
        if matrix is None:
            self.rasa = None
            return
        if matrix.shape != (self.embed_dim, self.embed_dim):
            raise ValueError(
                f"RASA matrix must be {self.embed_dim}x{self.embed_dim}, got {tuple(matrix.shape)}"
            )
        param = next(self.parameters())
        self.rasa = nn.Linear(self.embed_dim, self.embed_dim, bias=False).to(param.device)
        with torch.no_grad():
            self.rasa.weight.copy_(matrix.to(self.rasa.weight))
        self.rasa.requires_grad_(False)

    # ------------------------------------------------------------------ tokens
    @property
    def grid_size(self) -> int:
        """Side of the position-embedding grid the model was built with (16 at 224 px, 37 at 518 px)."""
        return math.isqrt(self.pos_embed.shape[1] - 1)

    def interpolate_pos_encoding(self, height: int, width: int, dtype: torch.dtype | None = None) -> Tensor:
        """Position embedding [1, 1+h*w, D] for a ``height`` x ``width`` px input, as the official code computes it.

        Only the patch part is resized, bicubically in fp32 without antialias, with the scale factor
        ((rows + offset) / G, (cols + offset) / G) (DINOv2's offset kludge) unless ``interpolate_offset`` is 0, in
        which case the explicit output size is used.
        """
        rows, cols = height // self.patch_size, width // self.patch_size
        grid = self.grid_size
        dtype = dtype or self.pos_embed.dtype
        if rows == grid and cols == grid:
            return self.pos_embed.to(dtype)
        pos_embed = self.pos_embed.float()
        patch_pos = pos_embed[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((rows + self.interpolate_offset) / grid, (cols + self.interpolate_offset) / grid)
            patch_pos = F.interpolate(
                patch_pos, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias
            )
        else:
            patch_pos = F.interpolate(
                patch_pos, size=(rows, cols), mode="bicubic", antialias=self.interpolate_antialias
            )
        if patch_pos.shape[-2:] != (rows, cols):
            raise RuntimeError(
                f"position interpolation gave {tuple(patch_pos.shape[-2:])}, expected {(rows, cols)}"
            )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([pos_embed[:, :1], patch_pos], dim=1).to(dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Image [B, 3, H, W] -> tokens [B, 1+R+N, D]: patches (masked ones replaced), CLS, positions, registers."""
        height, width = x.shape[-2:]
        tokens = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(height, width, tokens.dtype)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        return tokens

    def _output_dict(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x)
        first_patch = 1 + self.num_register_tokens
        out: dict[str, Tensor | None] = {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:first_patch],
            "x_norm_patchtokens": x_norm[:, first_patch:],
            "x_prenorm": x,
            "masks": masks,
        }
        if self.rasa is not None:
            out["x_norm_patchtokens_rasa"] = self.rasa(out["x_norm_patchtokens"])
        return out

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor | None]:
        """Run the backbone on images [B, 3, H, W]; ``masks`` is a bool [B, N] of patches to replace by the mask token."""
        tokens = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            tokens = self._run_block(block, tokens)
        return self._output_dict(tokens, masks)

    def forward_features_list(
        self, xs: Sequence[Tensor], masks_list: Sequence[Tensor | None] | None = None
    ) -> list[dict[str, Tensor | None]]:
        """Forward several batches of different resolutions (multi-crop) together; one output dict per input.

        Every block runs its norms, projections and MLP over all crops' tokens concatenated and attention per crop
        (:meth:`Block.forward_list`), which equals separate forwards with fewer, larger kernels.
        """
        masks_list = masks_list if masks_list is not None else [None] * len(xs)
        tokens = [self.prepare_tokens_with_masks(x, m) for x, m in zip(xs, masks_list, strict=True)]
        for block in self.blocks:
            tokens = self._run_block(block, list(tokens))
        return [self._output_dict(t, m) for t, m in zip(tokens, masks_list, strict=True)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (less memory, ~30% more
        compute); only while training."""
        self.grad_checkpointing = enable

    def _run_block(self, function: Any, tokens: Any) -> Any:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(function, tokens, use_reentrant=False)
        return function(tokens)

    def _intermediate_outputs(self, x: Tensor, n: int | Sequence[int]) -> list[Tensor]:
        wanted = set(range(self.n_blocks - n, self.n_blocks)) if isinstance(n, int) else set(n)
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if index in wanted:
                outputs.append(tokens)
        if len(outputs) != len(wanted):
            raise ValueError(f"asked for blocks {sorted(wanted)} of a {self.n_blocks}-block model")
        return outputs

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (or of the listed block indices), as DINOv2's method.

        Each output is the patch tokens [B, N, D] (or [B, D, h, w] with ``reshape``), paired with the CLS token
        [B, D] when ``return_class_token``; ``norm`` applies the final LayerNorm.
        """
        outputs = self._intermediate_outputs(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            batch, _, height, width = x.shape
            outputs = [
                out.reshape(batch, height // self.patch_size, width // self.patch_size, -1)
                .permute(0, 3, 1, 2)
                .contiguous()
                for out in outputs
            ]
        if return_class_token:
            return tuple(zip(outputs, class_tokens, strict=True))
        return tuple(outputs)

    def forward(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        return self.head(self.forward_features(x, masks)["x_norm_clstoken"])


def build_model(arch: str = "vit_base", **overrides: Any) -> DinoVisionTransformer:
    """Build a backbone from a preset name (``vit_tiny``, ``vit_small``, ``vit_base``, ``vit_large``, ``vit_giant2``)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    fields = {**ARCHITECTURES[arch], **overrides}
    extra = {key: fields.pop(key) for key in list(fields) if key not in ViTConfig.__dataclass_fields__}
    if extra:
        raise TypeError(f"unknown backbone options: {', '.join(sorted(extra))}")
    return DinoVisionTransformer(ViTConfig(**fields))


def vit_tiny(**kwargs: Any) -> DinoVisionTransformer:
    """192 wide, 6 deep, 3 heads: for tests and CPU demos."""
    return build_model("vit_tiny", **kwargs)


def vit_small(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-S: 384 wide, 12 deep, 6 heads."""
    return build_model("vit_small", **kwargs)


def vit_base(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-B: 768 wide, 12 deep, 12 heads."""
    return build_model("vit_base", **kwargs)


def vit_large(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-L: 1024 wide, 24 deep, 16 heads."""
    return build_model("vit_large", **kwargs)


def vit_giant2(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-g ("giant2"): 1536 wide, 40 deep, 24 heads."""
    return build_model("vit_giant2", **kwargs)
