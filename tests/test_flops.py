"""Analytic FLOP counts against torch's FlopCounterMode (an independent counter of matmul / conv / SDPA FLOPs)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from franca.data.batch import TrainBatch
from franca.models.heads import DINOHead, MatryoshkaHead
from franca.models.vision_transformer import DinoVisionTransformer, ViTConfig
from franca.ssl import CyclicMask, build_mask_batch
from franca.train.config import MaskingConfig, load_config
from franca.train.flops import (
    HeadSpec,
    expected_masked_patches,
    franca_step_flops,
    head_forward_flops,
    measure_peak_flops,
    mfu,
    num_tokens,
    vit_flops_breakdown,
    vit_forward_flops,
)
from franca.train.ssl_model import build_head, build_student_teacher


def _counted(fn) -> tuple[int, dict[str, int]]:
    """Run ``fn`` under FlopCounterMode; return the total and the per-operator counts (by name)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    per_op = {str(op): int(flops) for op, flops in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), per_op


def _attention_forward(per_op: dict[str, int]) -> int:
    return sum(v for k, v in per_op.items() if "scaled_dot_product" in k and "backward" not in k)


def _tiny_vit(ffn_layer: str, registers: int = 0, **overrides) -> DinoVisionTransformer:
    config = ViTConfig(
        embed_dim=64, depth=2, num_heads=4, patch_size=8, img_size=32, ffn_layer=ffn_layer,
        num_register_tokens=registers, **overrides,
    )  # fmt: skip
    return DinoVisionTransformer(config)


@pytest.mark.parametrize("ffn_layer", ["mlp", "swiglu"])
@pytest.mark.parametrize("registers", [0, 3])
def test_backbone_forward_matches_flop_counter(ffn_layer: str, registers: int) -> None:
    model = _tiny_vit(ffn_layer, registers).eval()
    x = torch.randn(3, 3, 24, 40)  # non-square, a grid other than the position embedding's
    with torch.no_grad():
        reference, _ = _counted(lambda: model.forward_features(x))
    assert vit_forward_flops(model, 24, 40, batch=3) == reference
    assert vit_forward_flops(model.config, 24, 40, batch=3) == reference
    assert num_tokens(model, 24, 40) == 1 + registers + 3 * 5


def test_backbone_hand_count_and_rasa() -> None:
    """A hand-written count for one config, and the RASA projection counted only when attached."""
    model = _tiny_vit("mlp")
    d, h, t, n = 64, 256, 1 + 16, 16  # 32x32 px, patch 8: 16 patches
    per_block = 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * h
    assert vit_forward_flops(model, 32) == 2 * n * d * 3 * 64 + 2 * per_block
    model.set_rasa(torch.eye(64))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference, _ = _counted(lambda: model.forward_features(x))
    breakdown = vit_flops_breakdown(model, 32, batch=2)
    assert breakdown["rasa"] == 2 * 2 * n * d * d
    assert breakdown["total"] == reference


def test_batch_subset_stochastic_depth_counts_the_subsets() -> None:
    model = _tiny_vit("swiglu", drop_path_rate=0.4).train()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        reference, _ = _counted(lambda: model.forward_features(x))
    assert vit_flops_breakdown(model, 32, batch=5, stochastic_depth=True)["total"] == reference
    # int(5 * 0.6) = 3 of 5 samples run the blocks
    full = vit_flops_breakdown(model, 32, batch=5)
    assert reference == full["patch_embed"] + full["blocks"] * 3 // 5


@pytest.mark.parametrize(
    "head",
    [
        lambda: MatryoshkaHead(64, n_prototypes=96, hidden_dim=40, bottleneck_dim=24, mode="slice"),
        lambda: MatryoshkaHead(64, n_prototypes=96, hidden_dim=40, bottleneck_dim=24, mode="project"),
        lambda: MatryoshkaHead(64, n_prototypes=96, hidden_dim=40, bottleneck_dim=24, mode="tied"),
        lambda: MatryoshkaHead(64, [16, 64], n_prototypes=50, hidden_dim=40, bottleneck_dim=24, nlayers=1),
        lambda: MatryoshkaHead(64, [8, 32], n_prototypes=50, hidden_dim=40, bottleneck_dim=24, nlayers=4),
        lambda: DINOHead(64, n_prototypes=70, hidden_dim=40, bottleneck_dim=24),
        lambda: DINOHead(64, n_prototypes=70, hidden_dim=40, bottleneck_dim=24, nlayers=1),
    ],
    ids=["slice", "project", "tied", "slice-1layer", "slice-4layers", "dinov2", "dinov2-1layer"],
)
def test_head_forward_matches_flop_counter(head) -> None:
    module = head()
    tokens = torch.randn(7, 64)
    with torch.no_grad():
        reference, _ = _counted(lambda: module(tokens))
    assert head_forward_flops(module, 7) == reference


def test_head_spec_from_config_matches_built_head() -> None:
    config = load_config("tiny_cpu", ["heads.n_prototypes=256", "heads.hidden_dim=64"])
    for mode in ("slice", "project", "tied", "dinov2"):
        config.heads.mode = mode
        assert HeadSpec.from_config(config.heads, 192) == HeadSpec.from_module(build_head(config, 192))


def test_backward_is_twice_forward_without_recompute() -> None:
    """FlopCounterMode on forward + backward: every product 3x forward, the patch embedding 2x (no image gradient),
    plus the half-forward QK^T recompute of the SDPA backward, which model FLOPs leave out."""
    model = _tiny_vit("swiglu", registers=1).train()
    x = torch.randn(2, 3, 32, 24)
    total, per_op = _counted(lambda: model.forward_features(x)["x_prenorm"].sum().backward())
    forward = vit_flops_breakdown(model, 32, 24, batch=2)
    recompute = _attention_forward(per_op) // 2
    assert _attention_forward(per_op) == forward["attention"]
    assert total - recompute == 3 * forward["total"] - forward["patch_embed"]


def _tiny_train_config(**extra: str):
    overrides = [
        "model.embed_dim=64", "model.depth=2", "model.num_heads=4", "model.drop_path_rate=0.4",
        "model.num_register_tokens=1", "crops.global_size=32", "crops.local_size=16", "crops.n_local=3",
        "heads.n_prototypes=64", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
    ]  # fmt: skip
    return load_config("tiny_cpu", overrides + [f"{k}={v}" for k, v in extra.items()])


@pytest.mark.parametrize("separate", ["true", "false"])
def test_step_flops_match_counted_step(separate: str) -> None:
    """The whole step (teacher forward, student forward + backward) counted by FlopCounterMode."""
    config = _tiny_train_config(**{"heads.separate_ibot_head": separate})
    student, teacher = build_student_teacher(config)
    student.train()
    teacher.eval()
    batch_size, grid = 3, 4
    mask_batch = build_mask_batch(2 * batch_size, CyclicMask(grid, grid), 0.5, (0.1, 0.65), torch.Generator())
    batch = TrainBatch(
        global_crops=torch.randn(2 * batch_size, 3, 32, 32),
        local_crops=torch.randn(3 * batch_size, 3, 16, 16),
        masks=mask_batch.masks,
        masked_indices=mask_batch.masked_indices,
        masked_weights=mask_batch.masked_weights,
        batch_size=batch_size,
    )

    def step() -> None:
        with torch.no_grad():
            teacher(batch, teacher=True)
        out = student(batch)
        loss = sum(t.sum() for t in out["cls"]) + sum(t.sum() for t in out["patch"]) + out["global_cls"].sum()
        loss.backward()

    total, per_op = _counted(step)
    recompute = sum(v for k, v in per_op.items() if "scaled_dot_product" in k and "backward" in k) // 5
    expected = franca_step_flops(config, batch_size, masked_patches=mask_batch.n_masked_patches)
    assert expected["total"] == total - recompute
    assert expected["teacher"] + expected["student_backbone"] + expected["student_heads"] == expected["total"]
    assert expected["student_tokens"] == 6 * (1 + 1 + 16) + 9 * (1 + 1 + 4)  # CLS, 1 register, patches


def test_expected_masked_patches_matches_sampling() -> None:
    masking = MaskingConfig(probability=0.5, ratio_min_max=[0.1, 0.65])
    expected = expected_masked_patches(masking, 8, 64)
    generator = torch.Generator().manual_seed(0)
    counts = [
        build_mask_batch(8, CyclicMask(8, 8), 0.5, (0.1, 0.65), generator).n_masked_patches
        for _ in range(400)
    ]
    standard_error = statistics.stdev(counts) / math.sqrt(len(counts))
    assert abs(statistics.mean(counts) - expected) < 4 * standard_error
    # 4 masked crops, mean ratio 0.375 of 64 patches = 96, minus about half a patch per crop for int()
    assert 93.5 < expected < 96
    fixed = MaskingConfig(probability=0.5, ratio_min_max=[0.5, 0.5])
    assert expected_masked_patches(fixed, 6, 50) == 3 * 25
    assert expected_masked_patches(MaskingConfig(probability=0.0), 6, 50) == 0


def test_default_step_uses_expected_masks_and_scales_with_batch() -> None:
    config = _tiny_train_config(**{"model.drop_path_rate": "0.0"})
    one, four = franca_step_flops(config, 1), franca_step_flops(config, 4)
    assert one["masked_patches"] == expected_masked_patches(config.masking, 2, 16)
    assert four["masked_patches"] == expected_masked_patches(config.masking, 8, 16)
    assert four["student_backbone"] == 4 * one["student_backbone"]  # no stochastic-depth subsets at rate 0


def test_mfu_and_peak() -> None:
    assert mfu(4e12, 2.0, 1e13) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1.0)
    peak = measure_peak_flops("cpu", size=256, repeats=3, products_per_repeat=4)
    assert 1e8 < peak < 1e13  # any CPU of the last 15 years, well short of impossible
