"""AdamW parameter groups (decay/no-decay, patch-embed lr, layer-wise decay, last layer), schedules, clipping."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from franca.train.optim import (
    apply_schedules,
    build_optimizer,
    build_param_groups,
    clip_grad_norm_per_module,
    count_parameters,
)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.ls1 = LayerScale(dim)


class TinyBackbone(nn.Module):
    """Parameter names as in the DINOv2/Franca ViT."""

    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=2, stride=2)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)


class TinyHead(nn.Module):
    """Names as the Matryoshka head: mlps.{j}.{k} and weight-normalised last_layers.{j}."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 6), nn.GELU(), nn.Linear(6, 4)) for _ in range(2)
        )
        self.last_layers = nn.ModuleList(weight_norm(nn.Linear(4, 5, bias=False)) for _ in range(2))


def multipliers_by_name(groups: list[dict]) -> dict[str, tuple[float, float, bool]]:
    table = {}
    for group in groups:
        for name in group["names"]:
            assert name not in table, f"{name} in two groups"
            table[name] = (group["lr_multiplier"], group["wd_multiplier"], group["is_last_layer"])
    return table


def test_weight_decay_patch_embed_and_last_layer_membership() -> None:
    backbone, head = TinyBackbone(), TinyHead()
    groups = build_param_groups({"backbone": backbone, "head": head}, patch_embed_lr_mult=0.2)
    table = multipliers_by_name(groups)
    expected = {
        "backbone.cls_token": (1.0, 1.0, False),
        "backbone.pos_embed": (1.0, 1.0, False),
        "backbone.mask_token": (1.0, 1.0, False),
        "backbone.patch_embed.proj.weight": (0.2, 1.0, False),
        "backbone.patch_embed.proj.bias": (0.2, 0.0, False),
        "backbone.blocks.1.norm1.weight": (1.0, 0.0, False),
        "backbone.blocks.1.norm1.bias": (1.0, 0.0, False),
        "backbone.blocks.2.attn.qkv.weight": (1.0, 1.0, False),
        "backbone.blocks.2.attn.qkv.bias": (1.0, 0.0, False),
        "backbone.blocks.0.ls1.gamma": (1.0, 0.0, False),
        "backbone.norm.weight": (1.0, 0.0, False),
        "head.mlps.0.0.weight": (1.0, 1.0, False),
        "head.mlps.1.2.bias": (1.0, 0.0, False),
        # weight_g (original0) and weight_v (original1) are decayed and flagged as the last layer
        "head.last_layers.0.parametrizations.weight.original0": (1.0, 1.0, True),
        "head.last_layers.1.parametrizations.weight.original1": (1.0, 1.0, True),
    }
    for name, value in expected.items():
        assert table[name] == pytest.approx(value), name
    all_names = {f"backbone.{n}" for n, _ in backbone.named_parameters()} | {
        f"head.{n}" for n, _ in head.named_parameters()
    }
    assert set(table) == all_names
    # merged: one group per distinct (lr, wd, last-layer) triple
    assert len(groups) == len(set(table.values())) == 5
    assert count_parameters(groups) == sum(p.numel() for p in backbone.parameters()) + sum(
        p.numel() for p in head.parameters()
    )


def test_layerwise_decay_factors() -> None:
    decay, depth = 0.5, 3
    backbone, head = TinyBackbone(depth=depth), TinyHead()
    table = multipliers_by_name(
        build_param_groups({"backbone": backbone, "head": head}, layerwise_decay=decay)
    )
    for i in range(depth):
        assert table[f"backbone.blocks.{i}.attn.qkv.weight"][0] == pytest.approx(decay ** (depth - i))
    assert table["backbone.cls_token"][0] == pytest.approx(decay ** (depth + 1))
    assert table["backbone.pos_embed"][0] == pytest.approx(decay ** (depth + 1))
    assert table["backbone.patch_embed.proj.weight"][0] == pytest.approx(0.2 * decay ** (depth + 1))
    assert table["backbone.norm.weight"][0] == pytest.approx(1.0)
    assert table["head.mlps.0.0.weight"][0] == pytest.approx(1.0)  # heads have no blocks: no decay


def test_chunked_block_names_use_the_global_index() -> None:
    class Chunked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # FSDP block chunks: blocks.<chunk>.<global index>
            self.blocks = nn.ModuleDict(
                {
                    "0": nn.ModuleDict({"0": nn.Linear(2, 2), "1": nn.Linear(2, 2)}),
                    "1": nn.ModuleDict({"2": nn.Linear(2, 2), "3": nn.Linear(2, 2)}),
                }
            )

    table = multipliers_by_name(build_param_groups(Chunked(), layerwise_decay=0.9, n_blocks=4))
    for chunk, index in ((0, 0), (0, 1), (1, 2), (1, 3)):
        assert table[f"model.blocks.{chunk}.{index}.weight"][0] == pytest.approx(0.9 ** (4 - index))


def test_part_lr_multipliers_and_frozen_parameters() -> None:
    backbone, head = TinyBackbone(), TinyHead()
    backbone.cls_token.requires_grad_(False)
    table = multipliers_by_name(
        build_param_groups({"backbone": backbone, "head": head}, lr_multipliers={"head": 3.0})
    )
    assert "backbone.cls_token" not in table
    assert table["head.mlps.0.0.weight"][0] == pytest.approx(3.0)
    assert table["backbone.pos_embed"][0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        build_param_groups({"backbone": backbone}, lr_multipliers={"heads": 2.0})


def test_apply_schedules_sets_lr_and_weight_decay() -> None:
    groups = build_param_groups({"backbone": TinyBackbone(), "head": TinyHead()}, patch_embed_lr_mult=0.2)
    optimizer = build_optimizer(groups, betas=(0.9, 0.99), device_type="cpu")
    assert isinstance(optimizer, torch.optim.AdamW)
    # the fused CPU kernel (torch >= 2.4)
    assert optimizer.defaults["fused"] is True and optimizer.defaults["betas"] == (0.9, 0.99)
    apply_schedules(optimizer, lr=1e-3, wd=0.05, last_layer_lr=0.0)
    for group in optimizer.param_groups:
        if group["is_last_layer"]:
            assert group["lr"] == 0.0
        else:
            assert group["lr"] == pytest.approx(1e-3 * group["lr_multiplier"])
        assert group["weight_decay"] == pytest.approx(0.05 * group["wd_multiplier"])
    apply_schedules(optimizer, lr=1e-3, wd=0.05, last_layer_lr=2e-3)
    assert [g["lr"] for g in optimizer.param_groups if g["is_last_layer"]] == [pytest.approx(2e-3)]


def test_optimizer_step_matches_per_parameter_adamw() -> None:
    """Grouped AdamW gives the same update as one reference AdamW group per parameter with lr/wd set by hand."""
    model = {"backbone": TinyBackbone(), "head": TinyHead()}
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(build_param_groups(model), device_type="cpu")
    ref_groups = []
    for module in reference.values():
        for name, param in module.named_parameters():
            lr = 1e-2 * (0.2 if "patch_embed" in name else 1.0) * (0.0 if "last_layer" in name else 1.0)
            wd = 0.0 if (name.endswith("bias") or "norm" in name or "gamma" in name) else 0.1
            ref_groups.append({"params": [param], "lr": lr, "weight_decay": wd})
    ref_optimizer = torch.optim.AdamW(ref_groups, betas=(0.9, 0.999), foreach=False)
    apply_schedules(optimizer, lr=1e-2, wd=0.1, last_layer_lr=0.0)
    for step in range(3):
        for modules in (model, reference):
            torch.manual_seed(step)
            for module in modules.values():
                for param in module.parameters():
                    param.grad = torch.randn_like(param)
        optimizer.step()
        ref_optimizer.step()
    for part in model:
        for (name, param), (_, ref_param) in zip(
            model[part].named_parameters(), reference[part].named_parameters()
        ):
            torch.testing.assert_close(param, ref_param, rtol=1e-5, atol=1e-7, msg=name)


def test_clip_per_module_matches_torch_on_each_module() -> None:
    modules = {"backbone": TinyBackbone(), "dino_head": TinyHead(), "ibot_head": TinyHead()}
    reference = copy.deepcopy(modules)
    for scale, name in zip((1.0, 10.0, 0.01), modules):
        for param, ref in zip(modules[name].parameters(), reference[name].parameters()):
            param.grad = torch.randn_like(param) * scale
            ref.grad = param.grad.clone()
    expected = {
        name: float(torch.nn.utils.clip_grad_norm_(m.parameters(), 3.0)) for name, m in reference.items()
    }
    norms = clip_grad_norm_per_module(modules, 3.0)
    assert norms.keys() == expected.keys()
    for name in expected:
        assert norms[name] == pytest.approx(expected[name], rel=1e-6)
        for param, ref in zip(modules[name].parameters(), reference[name].parameters()):
            torch.testing.assert_close(param.grad, ref.grad)
    # the small module is left as is, the large one ends at norm 3
    assert norms["ibot_head"] < 3.0
    clipped = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in modules["dino_head"].parameters()])
    )
    assert float(clipped) == pytest.approx(3.0, rel=1e-4)


def test_clip_disabled_and_modules_without_grads() -> None:
    module = TinyHead()
    for param in module.parameters():
        param.grad = torch.ones_like(param) * 100
    before = [p.grad.clone() for p in module.parameters()]
    assert clip_grad_norm_per_module({"head": module}, 0.0) == {}
    for param, grad in zip(module.parameters(), before):
        assert torch.equal(param.grad, grad)
    assert clip_grad_norm_per_module({"empty": TinyHead()}, 3.0) == {}
