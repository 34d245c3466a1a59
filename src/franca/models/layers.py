"""Building blocks of the DINOv2-style Vision Transformer used by Franca.

Parameter names follow the official checkpoints exactly (``attn.qkv``, ``mlp.w12``/``mlp.w3`` or ``mlp.fc1``/``mlp.fc2``,
``ls1.gamma``...) so that released state dicts load without renaming.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Image [B, C, H, W] -> patch tokens [B, (H/p)*(W/p), D] by a strided convolution (row-major order)."""

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input of {height}x{width} px is not a multiple of the patch size {self.patch_size}; "
                "resize or crop it to a multiple first"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash / memory-efficient when available)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def attend(self, qkv: Tensor) -> Tensor:
        """Attention of projected tokens: qkv [B, N, 3D] -> [B, N, D] (before the output projection)."""
        batch, tokens, dim3 = qkv.shape
        dim = dim3 // 3
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return x.transpose(1, 2).reshape(batch, tokens, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.attend(self.qkv(x)))


class Mlp(nn.Module):
    """Two-layer GELU MLP (``fc1``/``fc2``), the FFN of DINOv2's S/B/L releases."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_dim(dim: int, mlp_ratio: float = 4.0) -> int:
    """Hidden width of DINOv2's fused SwiGLU: ((int(ratio*d*2/3)+7)//8)*8, e.g. 2048 for d=768, 2736 for d=1024."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU FFN: ``w12`` maps d -> 2h, the halves (x1, x2) give SiLU(x1) * x2, ``w3`` maps h -> d."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel residual scaling ``x * gamma`` (CaiT), initialised to a small value."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(dim))
        # an in-place fill rather than torch.full, so that a meta-device build records the value
        nn.init.constant_(self.gamma, float(init_values))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Per-sample stochastic depth: zero whole samples with probability ``drop_prob`` and rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)


DROP_PATH_MODES = ("batch_subset", "per_sample")


def check_drop_path_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`DROP_PATH_MODES`, else a ValueError naming the allowed values."""
    if mode not in DROP_PATH_MODES:
        allowed = " or ".join(repr(value) for value in DROP_PATH_MODES)
        raise ValueError(f"unknown drop_path_mode {mode!r}: use {allowed}")
    return mode


def _batch_subset(batch: int, drop_rate: float, device: torch.device) -> tuple[Tensor, float]:
    """The kept samples of one batch, floor(B(1-p)) of them (at least one) in random order, and the scale B / kept."""
    subset_size = max(int(batch * (1 - drop_rate)), 1)
    keep = torch.randperm(batch, device=device)[:subset_size]
    return keep, batch / subset_size


def _add_subset_residual(x: Tensor, keep: Tensor, branch: Tensor, scale: float) -> Tensor:
    out = torch.index_add(x.flatten(1), 0, keep, branch.flatten(1).to(x.dtype), alpha=scale)
    return out.view_as(x)


def drop_add_residual_batch_subset(
    x: Tensor, residual: Callable[[Tensor], Tensor], drop_rate: float
) -> Tensor:
    """DINOv2's batch-subset stochastic depth: the branch runs on floor(B(1-p)) random samples only.

    Their residual is added with the scale B / subset, the others pass unchanged. Unlike per-sample DropPath the
    number of kept samples is fixed, and the dropped samples' compute is saved.
    """
    keep, scale = _batch_subset(x.shape[0], drop_rate, x.device)
    return _add_subset_residual(x, keep, residual(x[keep]), scale)


def drop_add_residual_batch_subset_list(
    xs: list[Tensor], residual: Callable[[list[Tensor]], list[Tensor]], drop_rate: float
) -> list[Tensor]:
    """Batch-subset stochastic depth of several crop batches at once, as the official nested (list) forward does.

    Each list element draws its own subset of floor(B_i(1-p)) samples and its own scale B_i / subset; ``residual``
    maps the list of subsets to the list of their branch outputs (in one fused call).
    """
    subsets = [_batch_subset(x.shape[0], drop_rate, x.device) for x in xs]
    branches = residual([x[keep] for x, (keep, _) in zip(xs, subsets)])
    return [
        _add_subset_residual(x, keep, branch, scale)
        for x, (keep, scale), branch in zip(xs, subsets, branches, strict=True)
    ]


def _concat_tokens(xs: list[Tensor]) -> Tensor:
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])


def _split_tokens(flat: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    sizes = [shape[0] * shape[1] for shape in shapes]
    return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes)]


# The feed-forward networks a block can use, by their ``ffn_layer`` name.
FFN_LAYERS: dict[str, type[nn.Module]] = {"mlp": Mlp, "swiglu": SwiGLUFFN}


class Block(nn.Module):
    """Pre-norm transformer block: x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x)).

    Stochastic depth in training (``drop_path_rate`` p > 0), by ``drop_path_mode``:

    - ``"batch_subset"`` (default, the official student's): each residual branch runs on floor(B(1-p)) random
      samples of the batch (at least one) and is added to them scaled by B / kept; the other samples pass
      unchanged. In a list forward (:meth:`forward_list`, the multi-crop path the student takes in training) every
      list element, i.e. every crop batch, draws its own subset, as the official nested forward does. The
      official single-tensor ``Block.forward`` uses per-sample DropPath for 0 < p <= 0.1 and the batch subset only
      above 0.1, but the official student never takes that path: it always runs the nested list forward, which
      takes the batch subset for any p > 0. Here both paths take the batch subset for any p > 0, so that a student
      without local crops (franca sends a single tensor then) draws the same stochastic depth.
    - ``"per_sample"``: timm's DropPath on both paths at every rate; each sample's branch is zeroed independently
      with probability p and the others are scaled by 1 / (1 - p). Every sample is computed.

    In eval mode, or with p = 0 (how the teacher switches it off), there is no stochastic depth.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_hidden_dim: int,
        ffn_layer: str = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        layerscale_init: float | None = 1e-5,
        drop_path_rate: float = 0.0,
        drop_path_mode: str = "batch_subset",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(
                f"unknown ffn_layer {ffn_layer!r}: use one of {', '.join(map(repr, FFN_LAYERS))}"
            )
        self.mlp: nn.Module = FFN_LAYERS[ffn_layer](dim, ffn_hidden_dim, bias=ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path_rate = drop_path_rate
        self.drop_path_mode = check_drop_path_mode(drop_path_mode)
        # used by the per_sample mode only (no parameters either way)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def _drops_batch_subset(self) -> bool:
        return self.training and self.drop_path_rate > 0 and self.drop_path_mode == "batch_subset"

    def attn_residual(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def ffn_residual(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        """Tokens [B, N, D], or a list of several crops' tokens (see :meth:`forward_list`). Lists go through
        ``__call__`` too, so that module hooks (FSDP2's parameter gathering) run for them."""
        if isinstance(x, list):
            return self.forward_list(x)
        if self._drops_batch_subset():
            x = drop_add_residual_batch_subset(x, self.attn_residual, self.drop_path_rate)
            return drop_add_residual_batch_subset(x, self.ffn_residual, self.drop_path_rate)
        x = x + self.drop_path(self.attn_residual(x))
        return x + self.drop_path(self.ffn_residual(x))

    def forward_list(self, xs: list[Tensor]) -> list[Tensor]:
        """Several crops' tokens [B_i, N_i, D] at once: norms, projections and MLP run on all tokens concatenated,
        attention runs per crop. Mathematically the same as ``[self(x) for x in xs]``, with fewer, larger kernels
        (with batch-subset stochastic depth, on the concatenated subsets).
        """
        if len(xs) == 1:
            return [self.forward(xs[0])]
        if self._drops_batch_subset():
            xs = drop_add_residual_batch_subset_list(xs, self._attn_residual_list, self.drop_path_rate)
            return drop_add_residual_batch_subset_list(xs, self._ffn_residual_list, self.drop_path_rate)
        shapes = [x.shape for x in xs]
        flat = _concat_tokens(xs)
        flat = self._add_residual(flat, self._attn_residual_flat(flat, shapes), shapes)
        flat = self._add_residual(flat, self.ffn_residual(flat), shapes)
        return _split_tokens(flat, shapes)

    def _attn_residual_flat(self, flat: Tensor, shapes: list[torch.Size]) -> Tensor:
        """ls1(attn(norm1 x)) of concatenated crops' tokens [sum B_i N_i, D], attention within each crop."""
        sizes = [shape[0] * shape[1] for shape in shapes]
        qkv = self.attn.qkv(self.norm1(flat)).split(sizes)
        attended = torch.cat(
            [
                self.attn.attend(part.view(shape[0], shape[1], -1)).reshape(-1, shape[2])
                for part, shape in zip(qkv, shapes)
            ]
        )
        return self.ls1(self.attn.proj(attended))

    def _attn_residual_list(self, xs: list[Tensor]) -> list[Tensor]:
        shapes = [x.shape for x in xs]
        return _split_tokens(self._attn_residual_flat(_concat_tokens(xs), shapes), shapes)

    def _ffn_residual_list(self, xs: list[Tensor]) -> list[Tensor]:
        shapes = [x.shape for x in xs]
        return _split_tokens(self.ffn_residual(_concat_tokens(xs)), shapes)

    def _add_residual(self, flat: Tensor, branch: Tensor, shapes: list[torch.Size]) -> Tensor:
        """flat + branch, with per-sample DropPath per crop batch in training (the per_sample mode)."""
        if not (self.training and self.drop_path_rate > 0):
            return flat + branch
        dropped = [self.drop_path(part).reshape(-1, part.shape[-1]) for part in _split_tokens(branch, shapes)]
        return flat + torch.cat(dropped)
