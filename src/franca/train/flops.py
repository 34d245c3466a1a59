"""Analytic FLOP counts of the Franca backbone, heads and training step, and model FLOPs utilisation (MFU).

Conventions (the usual ones for MFU, e.g. PaLM's appendix B):

- A multiply-add counts as **2 FLOPs**: a matrix product [m, k] x [k, n] is ``2 * m * k * n``. Only matrix products
  are counted (linear layers, the patch-embedding convolution, the two attention products QK^T and AV, the
  prototype layers). Biases, LayerNorm, softmax, GELU/SiLU, LayerScale, weight normalisation, the losses,
  Sinkhorn-Knopp, KoLeo, the optimizer and the EMA update are left out: they are O(elements), not O(elements x
  width), and negligible next to the products. The backbone's final LayerNorm is therefore not counted either.
  This is exactly what ``torch.utils.flop_counter.FlopCounterMode`` counts for a forward pass, which the tests use
  as the independent reference.
- **Backward = 2 x forward** for every product whose input needs a gradient (one product for the input gradient,
  one for the weight gradient). The patch-embedding convolution is the exception: images need no gradient, so its
  backward is only the weight gradient (1 x forward). So a trained backbone costs ``3 * forward - patch_embed``.
- Recomputation is not counted: the flash-attention backward recomputes QK^T (FlopCounterMode counts its backward as
  2.5 x forward; here 2 x), and activation checkpointing would recompute whole blocks. These are hardware FLOPs, not
  model FLOPs, so an MFU computed from these counts is the conventional "model FLOPs utilisation".
- Stochastic depth: in the default ``drop_path_mode="batch_subset"`` (the official student's) every block with a
  drop rate p_i > 0 runs each residual branch on ``max(int(n * (1 - p_i)), 1)`` of the n samples of each crop batch
  (each list element of a multi-crop forward draws its own subset), which really saves that compute;
  :func:`franca_step_flops` counts the student's blocks on those subsets. ``drop_path_mode="per_sample"``
  (DropPath) computes every sample and changes nothing.

``mfu = step FLOPs / step seconds / peak FLOP/s``, with the peak *measured* by :func:`measure_peak_flops` (the bf16
matrix-product rate on a GPU, the fp32 one on a CPU, see ``docs/machines.md`` §3).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from franca.core.errors import ConfigError
from franca.models.heads import DINOHead, MatryoshkaHead, matryoshka_prototype_counts
from franca.models.vision_transformer import ARCHITECTURES, DinoVisionTransformer, ViTConfig
from franca.train.config import HeadsConfig, MaskingConfig, TrainConfig

__all__ = [
    "HeadSpec",
    "expected_masked_patches",
    "franca_step_flops",
    "head_flops_per_token",
    "head_forward_flops",
    "measure_peak_flops",
    "mfu",
    "num_tokens",
    "vit_config_from_train",
    "vit_flops_breakdown",
    "vit_forward_flops",
]


# --------------------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------------------
def vit_config_from_train(config: TrainConfig) -> ViTConfig:
    """The backbone :class:`ViTConfig` a :class:`~franca.train.config.TrainConfig` builds, without building it."""
    model_cfg = config.model
    fields = {**ARCHITECTURES[model_cfg.arch], **model_cfg.vit_overrides()}
    return ViTConfig(**fields)


def _as_vit_config(source: ViTConfig | DinoVisionTransformer) -> ViTConfig:
    if isinstance(source, DinoVisionTransformer):
        return source.config
    if isinstance(source, ViTConfig):
        return source
    raise TypeError(f"expected a ViTConfig or a DinoVisionTransformer, got {type(source).__name__}")


def _block_subset_rates(source: ViTConfig | DinoVisionTransformer) -> list[float]:
    """Per-block rates of batch-subset stochastic depth (0 where a block computes every sample): the blocks' own rates
    and modes for a model, the config's rule otherwise."""
    if isinstance(source, DinoVisionTransformer):
        return [
            float(block.drop_path_rate) if block.drop_path_mode == "batch_subset" else 0.0
            for block in source.blocks
        ]
    config = _as_vit_config(source)
    if config.drop_path_mode != "batch_subset":
        return [0.0] * config.depth
    if config.drop_path_uniform:
        return [float(config.drop_path_rate)] * config.depth
    return [float(rate) for rate in torch.linspace(0, config.drop_path_rate, config.depth).tolist()]


def num_tokens(config: ViTConfig | DinoVisionTransformer, height: int, width: int | None = None) -> int:
    """Tokens per image: 1 (CLS) + registers + (H/p)(W/p) patches."""
    config_ = _as_vit_config(config)
    width = height if width is None else width
    patch = config_.patch_size
    if height % patch or width % patch:
        raise ConfigError(f"a {height}x{width} input is not a multiple of the patch size {patch}")
    return 1 + config_.num_register_tokens + (height // patch) * (width // patch)


def _block_flops_per_sample(config: ViTConfig, tokens: int) -> dict[str, int]:
    """FLOPs of one transformer block for one sample of ``tokens`` tokens, by product."""
    dim, hidden = config.embed_dim, config.resolved_ffn_hidden_dim()
    if config.ffn_layer == "swiglu":
        ffn = 2 * tokens * dim * (2 * hidden) + 2 * tokens * hidden * dim  # w12: d -> 2h, w3: h -> d
    elif config.ffn_layer == "mlp":
        ffn = 2 * tokens * dim * hidden * 2  # fc1: d -> h, fc2: h -> d
    else:
        raise ConfigError(f"unknown ffn_layer {config.ffn_layer!r}: use 'mlp' or 'swiglu'")
    return {
        "qkv": 2 * tokens * dim * 3 * dim,
        # QK^T and AV over all heads: 2 * (2 * T * T * head_dim) * heads each
        "attention": 2 * (2 * tokens * tokens * dim),
        "proj": 2 * tokens * dim * dim,
        "ffn": ffn,
    }


def vit_flops_breakdown(
    model_or_config: ViTConfig | DinoVisionTransformer,
    height: int,
    width: int | None = None,
    batch: int = 1,
    stochastic_depth: bool = False,
) -> dict[str, int]:
    """Forward FLOPs of the backbone on ``batch`` images of ``height`` x ``width`` px, split by part.

    Returns ``{"patch_embed", "qkv", "attention", "proj", "ffn", "blocks", "rasa", "total"}`` (ints; ``blocks`` is
    the sum of the four block parts over all blocks). ``rasa`` is the folded RASA projection of the patch tokens,
    non-zero only for a model with one attached. With ``stochastic_depth`` the blocks with a drop rate p > 0 run on
    ``max(int(batch * (1 - p)), 1)`` samples, as the training-mode batch-subset stochastic depth does (the default
    ``drop_path_mode``; with ``per_sample`` every block runs on every sample). ``batch`` is one crop batch: count a
    multi-crop forward one crop batch (list element) at a time.
    """
    config = _as_vit_config(model_or_config)
    width = height if width is None else width
    tokens = num_tokens(config, height, width)
    patches = (height // config.patch_size) * (width // config.patch_size)
    per_sample = _block_flops_per_sample(config, tokens)
    parts = dict.fromkeys(per_sample, 0)
    for rate in _block_subset_rates(model_or_config):
        samples = batch
        if stochastic_depth and rate > 0:
            samples = max(int(batch * (1 - rate)), 1)
        for name, flops in per_sample.items():
            parts[name] += samples * flops
    patch_embed = 2 * batch * patches * config.embed_dim * config.in_chans * config.patch_size**2
    has_rasa = isinstance(model_or_config, DinoVisionTransformer) and model_or_config.rasa is not None
    rasa = 2 * batch * patches * config.embed_dim**2 if has_rasa else 0
    blocks = sum(parts.values())
    return {
        "patch_embed": patch_embed,
        **parts,
        "blocks": blocks,
        "rasa": rasa,
        "total": patch_embed + blocks + rasa,
    }


def vit_forward_flops(
    model_or_config: ViTConfig | DinoVisionTransformer, height: int, width: int | None = None, batch: int = 1
) -> int:
    """Forward FLOPs of the backbone on ``batch`` images of ``height`` x ``width`` px (see the module conventions).

    Patch embedding (a stride-p convolution: 2 * N * d * 3 * p^2 per image) plus, per block on T = 1 + R + N
    tokens: qkv 2*T*d*3d, attention 4*T^2*d (QK^T and AV), proj 2*T*d^2 and the FFN (mlp: 4*T*d*h; swiglu:
    w12 2*T*d*2h + w3 2*T*h*d). Inference-mode count: every block on every sample.
    """
    return vit_flops_breakdown(model_or_config, height, width, batch)["total"]


# --------------------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadSpec:
    """The dimensions that set a head's FLOPs, without building it.

    ``mode``: ``slice``, ``project``, ``tied`` (:class:`MatryoshkaHead`) or ``dinov2`` (:class:`DINOHead`);
    ``levels``: the absolute nesting widths (``(in_dim,)`` for ``dinov2``); ``prototype_counts``: K_j per level.
    """

    in_dim: int
    mode: str
    levels: tuple[int, ...]
    prototype_counts: tuple[int, ...]
    hidden_dim: int
    bottleneck_dim: int
    nlayers: int

    @classmethod
    def from_module(cls, head: nn.Module) -> HeadSpec:
        """The spec of a built :class:`MatryoshkaHead` or :class:`DINOHead`."""
        if isinstance(head, MatryoshkaHead):
            return cls(
                head.in_dim,
                head.mode,
                tuple(head.levels),
                tuple(head.prototype_counts),
                head.hidden_dim,
                head.bottleneck_dim,
                head.nlayers,
            )
        if isinstance(head, DINOHead):
            return cls(
                head.in_dim,
                "dinov2",
                (head.in_dim,),
                (head.n_prototypes,),
                head.hidden_dim,
                head.bottleneck_dim,
                head.nlayers,
            )
        raise TypeError(f"expected a MatryoshkaHead or a DINOHead, got {type(head).__name__}")

    @classmethod
    def from_config(cls, heads_config: HeadsConfig, embed_dim: int) -> HeadSpec:
        """The spec :func:`franca.train.ssl_model.build_head` builds from a ``heads`` config section."""
        cfg = heads_config
        mode = cfg.mode
        if mode == "dinov2":
            levels = [embed_dim]
            counts = [int(cfg.n_prototypes)]
        else:
            levels = cfg.level_widths(embed_dim)
            counts = matryoshka_prototype_counts(levels, cfg.n_prototypes)
        return cls(
            int(embed_dim),
            mode,
            tuple(levels),
            tuple(counts),
            int(cfg.hidden_dim),
            int(cfg.bottleneck_dim),
            int(cfg.nlayers),
        )


def _mlp_flops_per_token(in_dim: int, hidden: int, bottleneck: int, nlayers: int) -> int:
    """Linear(in->hidden), (nlayers-2) x Linear(hidden->hidden), Linear(hidden->bottleneck); nlayers 1: in->bottleneck."""
    if nlayers == 1:
        return 2 * in_dim * bottleneck
    return 2 * (in_dim * hidden + (nlayers - 2) * hidden * hidden + hidden * bottleneck)


def head_flops_per_token(head: nn.Module | HeadSpec) -> int:
    """Forward FLOPs of a head for one token, summed over its levels.

    Per level j of a Matryoshka head: projection (``slice`` and ``tied``: m_j -> m_j on the first m_j dims;
    ``project``: d -> m_j), the MLP (m_j -> hidden -> ... -> bottleneck) and the prototypes (bottleneck -> K_j).
    ``tied`` slices one set of weights but runs products of the same shapes as ``slice``. DINOHead: MLP
    (d -> ... -> bottleneck) and prototypes (bottleneck -> K); its L2 normalisation is not counted.
    """
    spec = head if isinstance(head, HeadSpec) else HeadSpec.from_module(head)
    total = 0
    for width, prototypes in zip(spec.levels, spec.prototype_counts, strict=True):
        if spec.mode in ("slice", "tied"):
            projection, mlp_in = 2 * width * width, width
        elif spec.mode == "project":
            projection, mlp_in = 2 * spec.in_dim * width, width
        elif spec.mode == "dinov2":
            projection, mlp_in = 0, spec.in_dim
        else:
            raise ConfigError(f"unknown head mode {spec.mode!r}: use slice, project, tied or dinov2")
        total += projection
        total += _mlp_flops_per_token(mlp_in, spec.hidden_dim, spec.bottleneck_dim, spec.nlayers)
        total += 2 * spec.bottleneck_dim * prototypes
    return total


def head_forward_flops(head: nn.Module | HeadSpec, n_tokens: float) -> int:
    """Forward FLOPs of a head on ``n_tokens`` tokens (a float, e.g. an expected count, is rounded at the end)."""
    return int(round(head_flops_per_token(head) * n_tokens))


# --------------------------------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------------------------------
def _integral_of_floor(x: float) -> float:
    """F(x) = integral of floor(t) dt from 0 to x, for x >= 0."""
    k = math.floor(x)
    return k * (k - 1) / 2 + k * (x - k)


def expected_masked_patches(masking: MaskingConfig, n_crops: int, num_patches: int) -> float:
    """Expected number of masked patches that :func:`franca.ssl.build_mask_batch` draws for ``n_crops`` crops.

    ``int(n_crops * probability)`` crops are masked; with p = linspace(r_min, r_max, n + 1) crop i masks
    ``int(N * r_i)`` patches, r_i ~ U[p_i, p_{i+1}]. The expectation is computed exactly, floor included; it is
    ``int(n_crops * probability) * N * (r_min + r_max) / 2`` minus about half a patch per masked crop.
    ``masking`` is the ``masking`` config section (``probability``, ``ratio_min_max``).
    """
    probability = float(masking.probability)
    ratio_min, ratio_max = (float(value) for value in masking.ratio_min_max)
    n_masked = int(n_crops * probability)
    if n_masked == 0:
        return 0.0
    bounds = torch.linspace(ratio_min, ratio_max, n_masked + 1, dtype=torch.float64).tolist()
    expected = 0.0
    for low, high in zip(bounds[:-1], bounds[1:]):
        a, b = num_patches * low, num_patches * high
        expected += math.floor(a) if b <= a else (_integral_of_floor(b) - _integral_of_floor(a)) / (b - a)
    return expected


def franca_step_flops(
    config: object, batch_size: int, masked_patches: float | None = None
) -> dict[str, float]:
    """Model FLOPs of one Franca training step of one process holding ``batch_size`` images.

    ``config`` is a :class:`~franca.train.config.TrainConfig`. Counted (module conventions: matrix products only,
    backward = 2 x forward except the patch embedding's input gradient, no recomputation):

    - teacher (forward only, eval mode): the backbone on the 2B global crops, the DINO head on their 2B CLS tokens
      and the iBOT head on the M masked patch tokens;
    - student forward + backward: the backbone on the 2B masked global crops and the n_local * B local crops
      (with batch-subset stochastic depth, each block on its subset of either crop batch) =
      ``3 * forward - patch_embed``; the DINO head on the
      (2 + n_local) B CLS tokens and the iBOT head on the M masked patches, 3 x forward.

    M is ``masked_patches`` when given (the real count of a batch), else :func:`expected_masked_patches` for 2B
    crops. Returns a dict of FLOPs (floats holding whole numbers except where M is fractional): ``teacher``
    (= ``teacher_backbone`` + ``teacher_heads``), ``student_backbone``, ``student_heads``, ``total``, the forward
    parts ``student_backbone_forward`` / ``student_heads_forward``, and the counts ``masked_patches`` (M) and
    ``student_tokens`` (all tokens of all crops through the student backbone).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    vit = vit_config_from_train(config)
    crops = config.crops
    heads = config.heads
    n_global = 2 * batch_size
    n_local = int(crops.n_local) * batch_size
    global_size, local_size = int(crops.global_size), int(crops.local_size)
    num_patches = (global_size // vit.patch_size) ** 2
    if masked_patches is None:
        masked_patches = expected_masked_patches(config.masking, n_global, num_patches)
    head_spec = HeadSpec.from_config(heads, vit.embed_dim)
    per_token = head_flops_per_token(head_spec)  # the DINO and iBOT heads share their shape

    teacher_backbone = vit_flops_breakdown(vit, global_size, global_size, n_global)["total"]
    teacher_heads = per_token * (n_global + masked_patches)

    student_global = vit_flops_breakdown(vit, global_size, global_size, n_global, stochastic_depth=True)
    student_forward = student_global["total"]
    patch_embed = student_global["patch_embed"]
    student_tokens = n_global * num_tokens(vit, global_size)
    if n_local:
        student_local = vit_flops_breakdown(vit, local_size, local_size, n_local, stochastic_depth=True)
        student_forward += student_local["total"]
        patch_embed += student_local["patch_embed"]
        student_tokens += n_local * num_tokens(vit, local_size)
    student_backbone = 3 * student_forward - patch_embed
    student_heads_forward = per_token * (n_global + n_local + masked_patches)
    student_heads = 3 * student_heads_forward
    teacher = teacher_backbone + teacher_heads
    return {
        "teacher": float(teacher),
        "teacher_backbone": float(teacher_backbone),
        "teacher_heads": float(teacher_heads),
        "student_backbone": float(student_backbone),
        "student_heads": float(student_heads),
        "total": float(teacher + student_backbone + student_heads),
        "student_backbone_forward": float(student_forward),
        "student_heads_forward": float(student_heads_forward),
        "masked_patches": float(masked_patches),
        "student_tokens": float(student_tokens),
    }


# --------------------------------------------------------------------------------------------------------------
# Peak rate and MFU
# --------------------------------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    size: int | None = None,
    repeats: int = 5,
    products_per_repeat: int | None = None,
) -> float:
    """Measured dense matrix-product rate in FLOP/s: the median over ``repeats`` of timed square matmuls.

    Defaults: bf16 and size 8192 (10 products per repeat: a 4096 product stays below the chip's dense rate, which
    would flatter the MFU) on CUDA, fp32 and size 1536 (2 per repeat) on CPU; that is the MFU denominator
    (docs/machines.md §3: the bf16 rate on a GPU, the fp32 rate on a CPU). Each product counts ``2 * size**3`` FLOPs.
    A warm-up product runs first. The CPU rate uses torch's current thread count.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
    size = size or (8192 if on_cuda else 1536)
    products = products_per_repeat or (10 if on_cuda else 2)
    if repeats < 1 or products < 1 or size < 1:
        raise ValueError("repeats, products_per_repeat and size must be positive")
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3 if on_cuda else 1):
        torch.mm(left, right, out=out)
    _synchronize(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(products):
            torch.mm(left, right, out=out)
        _synchronize(device)
        rates.append(2.0 * size**3 * products / (time.perf_counter() - start))
    return statistics.median(rates)


def mfu(step_flops: float, step_seconds: float, peak: float) -> float:
    """Model FLOPs utilisation in [0, 1]: ``step_flops / step_seconds / peak`` (peak in FLOP/s)."""
    if step_seconds <= 0 or peak <= 0:
        raise ValueError(f"step_seconds ({step_seconds}) and peak ({peak}) must be positive")
    return step_flops / step_seconds / peak
