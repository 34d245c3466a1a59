"""Stochastic depth of the transformer block: the official student's batch-subset variant (default) and per-sample
DropPath (option), on the single-tensor path and on the multi-crop list path."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from franca.models import build_model
from franca.models.checkpoints import infer_config
from franca.models.layers import Block, drop_add_residual_batch_subset
from franca.models.vision_transformer import ViTConfig
from franca.train.flops import vit_flops_breakdown

DIM, TOKENS = 8, 3
ATTN, FFN = 1.0, 1000.0  # the constant outputs of the two residual branches (decodable from a row's change)


class Constant(nn.Module):
    """Stands in for LayerScale: the branch's output is ``value`` on every token and channel of every sample."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.value)


def _block(rate: float, mode: str = "batch_subset", constant: bool = True) -> Block:
    block = Block(DIM, 2, 16, ffn_layer="swiglu", drop_path_rate=rate, drop_path_mode=mode)
    if constant:  # attention branch adds ATTN, FFN branch adds FFN to every token of the samples it runs on
        block.ls1, block.ls2 = Constant(ATTN), Constant(FFN)
    return block.train()


def _run(block: Block, xs: list[torch.Tensor], path: str) -> list[torch.Tensor]:
    with torch.no_grad():
        if path == "tensor":
            return [block(x) for x in xs]
        return block(xs)


def _decode(x: torch.Tensor, out: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples got the attention / FFN residual, from ``out - x`` = scale * (a * ATTN + f * FFN)."""
    delta = (out - x).double()
    per_row = delta[:, 0, 0]
    # every token and channel of a row changed by the same amount: whole samples, nothing else
    torch.testing.assert_close(delta, per_row[:, None, None].expand_as(delta), atol=1e-3, rtol=0)
    ffn = per_row > scale * FFN / 2
    attn = (per_row - ffn.double() * scale * FFN) > scale * ATTN / 2
    expected = scale * (attn.double() * ATTN + ffn.double() * FFN)
    torch.testing.assert_close(per_row, expected, atol=1e-3, rtol=0)  # scaled by exactly `scale`
    return attn, ffn


# (batch, rate, floor(batch * (1 - rate))), written out by hand
KEPT = [(10, 0.1, 9), (64, 0.1, 57), (7, 0.1, 6), (16, 0.05, 15), (40, 0.05, 38), (5, 0.05, 4), (128, 0.4, 76),
        (9, 0.4, 5), (3, 0.5, 1), (1, 0.4, 1), (2, 0.9, 1)]  # fmt: skip


@pytest.mark.parametrize("path", ["tensor", "list"])
@pytest.mark.parametrize(("batch", "rate", "kept"), KEPT)
def test_batch_subset_keeps_exactly_floor_b_times_1_minus_p(
    path: str, batch: int, rate: float, kept: int
) -> None:
    torch.manual_seed(batch)
    block = _block(rate)
    xs = [torch.randn(batch, TOKENS, DIM), torch.randn(batch + 3, TOKENS + 2, DIM)]
    outs = _run(block, xs, path)
    # the subset is drawn per list element (per crop batch), as the official nested forward does
    for x, out, size in zip(xs, outs, [batch, batch + 3]):
        expected_kept = kept if size == batch else max(int(size * (1 - rate)), 1)
        attn, ffn = _decode(x, out, size / expected_kept)
        assert int(attn.sum()) == expected_kept
        assert int(ffn.sum()) == expected_kept
        untouched = ~(attn | ffn)
        assert torch.equal(out[untouched], x[untouched])  # the others pass bit for bit unchanged


def test_batch_subset_default_and_hand_computed_output() -> None:
    """Default mode, rate 0.1 (ViT-B): 9 of 10 samples get the residual, scaled by 10 / 9, the 10th is untouched."""
    torch.manual_seed(0)
    block = Block(DIM, 2, 16, drop_path_rate=0.1).train()
    assert block.drop_path_mode == "batch_subset"
    block.ls1, block.ls2 = Constant(ATTN), Constant(0.0)
    x = torch.randn(10, TOKENS, DIM)
    with torch.no_grad():
        out = block(x)
    changed = (out != x).any(dim=(1, 2))
    assert int(changed.sum()) == 9
    torch.testing.assert_close(out[changed], x[changed] + 10 / 9 * ATTN)
    assert torch.equal(out[~changed], x[~changed])


def test_batch_subset_function_scales_the_branch_of_the_kept_samples() -> None:
    """A branch that depends on the sample (2x): kept sample i becomes x_i + 2 x_i * B / kept."""
    torch.manual_seed(0)
    x = torch.randn(20, TOKENS, DIM)
    calls: list[int] = []

    def branch(sub: torch.Tensor) -> torch.Tensor:
        calls.append(sub.shape[0])
        return 2 * sub

    out = drop_add_residual_batch_subset(x, branch, 0.1)
    assert calls == [18]
    changed = (out != x).any(dim=(1, 2))
    assert int(changed.sum()) == 18
    torch.testing.assert_close(out[changed], x[changed] * (1 + 2 * 20 / 18))
    assert torch.equal(out[~changed], x[~changed])


@pytest.mark.parametrize("path", ["tensor", "list"])
@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_per_sample_mode_drops_whole_samples_with_rate_p(path: str, rate: float) -> None:
    torch.manual_seed(0)
    block = _block(rate, mode="per_sample")
    batch, repeats = 500, 4
    counts = []
    for _ in range(repeats):
        xs = [torch.randn(batch, TOKENS, DIM), torch.randn(batch, TOKENS, DIM)]
        for x, out in zip(xs, _run(block, xs, path)):
            attn, ffn = _decode(x, out, 1 / (1 - rate))  # DropPath rescales the kept samples by 1 / (1 - p)
            counts += [int(attn.sum()), int(ffn.sum())]
    n = batch * len(counts)
    dropped = 1 - sum(counts) / n
    std = (rate * (1 - rate) / n) ** 0.5
    assert abs(dropped - rate) < 5 * std  # independent Bernoulli(p) drops, not a fixed subset
    assert len(set(counts)) > 1


@pytest.mark.parametrize("mode", ["batch_subset", "per_sample"])
def test_eval_mode_is_identity_stochastic_depth(mode: str) -> None:
    """In eval mode both modes are the plain block: x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x))."""
    torch.manual_seed(0)
    block = _block(0.4, mode=mode, constant=False).eval()
    with torch.no_grad():
        for module in (block.ls1, block.ls2):
            module.gamma.fill_(0.5)
        x = torch.randn(6, TOKENS, DIM)
        expected = x + block.ls1(block.attn(block.norm1(x)))
        expected = expected + block.ls2(block.mlp(block.norm2(expected)))
        torch.testing.assert_close(block(x), expected)
        torch.testing.assert_close(block([x, x[:2]])[0], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["batch_subset", "per_sample"])
def test_list_forward_equals_per_element_forward_in_eval(mode: str) -> None:
    torch.manual_seed(0)
    model = build_model(
        "vit_tiny", patch_size=8, img_size=32, depth=2, drop_path_rate=0.3, drop_path_mode=mode
    ).eval()
    crops = [torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16), torch.randn(1, 3, 24, 24)]
    with torch.no_grad():
        together = model.forward_features_list(crops)
        apart = [model.forward_features(crop) for crop in crops]
    for joint, single in zip(together, apart):
        torch.testing.assert_close(joint["x_prenorm"], single["x_prenorm"], atol=1e-5, rtol=1e-5)


def test_disabled_drop_path_is_deterministic_in_training() -> None:
    """The teacher switches stochastic depth off by rate 0 (ssl_model): training mode is then the plain block."""
    block = _block(0.1, constant=False)
    block.drop_path_rate = 0.0
    block.drop_path = nn.Identity()
    x = torch.randn(5, TOKENS, DIM)
    with torch.no_grad():
        train_out = block(x)
        list_out = block([x, x])
        eval_out = block.eval()(x)
    torch.testing.assert_close(train_out, eval_out)
    torch.testing.assert_close(list_out[1], eval_out, atol=1e-6, rtol=1e-5)


def test_the_model_passes_the_mode_to_its_blocks() -> None:
    assert ViTConfig().drop_path_mode == "batch_subset"
    model = build_model("vit_tiny", depth=2, drop_path_rate=0.1)
    assert [block.drop_path_mode for block in model.blocks] == ["batch_subset"] * 2
    model = build_model("vit_tiny", depth=2, drop_path_rate=0.1, drop_path_mode="per_sample")
    assert [block.drop_path_mode for block in model.blocks] == ["per_sample"] * 2


def test_unknown_mode_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"drop_path_mode.*'batch_subset'.*'per_sample'"):
        Block(DIM, 2, 16, drop_path_mode="per-sample")
    with pytest.raises(ValueError, match=r"drop_path_mode.*'batch_subset'.*'per_sample'"):
        ViTConfig(drop_path_mode="subset")


def test_export_metadata_without_the_mode_still_loads() -> None:
    """Exports written before the field existed: the architecture loads, the mode takes its default."""
    model = build_model("vit_tiny", patch_size=8, img_size=32, depth=1)
    stored = model.config.to_dict()
    stored.pop("drop_path_mode")
    import json

    config = infer_config(model.state_dict(), {"config": json.dumps(stored)})
    assert config == model.config
    assert config.drop_path_mode == "batch_subset"


@pytest.mark.parametrize(("rate", "mode", "samples"), [(0.1, "batch_subset", 9), (0.1, "per_sample", 10),
                                                        (0.4, "per_sample", 10), (0.0, "batch_subset", 10)])  # fmt: skip
def test_flop_count_follows_the_mode(rate: float, mode: str, samples: int) -> None:
    """Batch-subset stochastic depth really skips the dropped samples at any rate; per-sample DropPath computes all."""
    torch.manual_seed(0)
    model = build_model(
        "vit_tiny", patch_size=8, img_size=32, depth=2, drop_path_rate=rate, drop_path_mode=mode
    ).train()
    x = torch.randn(10, 3, 32, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward_features(x)
    counted = vit_flops_breakdown(model, 32, batch=10, stochastic_depth=True)
    assert counted["total"] == counter.get_total_flops()
    assert vit_flops_breakdown(model.config, 32, batch=10, stochastic_depth=True) == counted
    full = vit_flops_breakdown(model, 32, batch=10)
    assert counted["blocks"] == full["blocks"] * samples // 10
