"""Tests of the Matryoshka / DINOv2 heads and their checkpoint loading (tiny sizes, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from franca.core.errors import CheckpointError, ConfigError
from franca.models.heads import (
    DINOHead,
    MatryoshkaHead,
    default_matryoshka_levels,
    heads_state_dict_official,
    load_heads,
    matryoshka_prototype_counts,
)

D = 32
LEVELS = [2, 4, 8, 16, 32]
COUNTS = [4, 8, 16, 32, 64]  # 64 * m / 32, by hand
HIDDEN, BOTTLENECK = 24, 12


def _tiny(mode: str = "slice", nlayers: int = 3) -> MatryoshkaHead:
    torch.manual_seed(0)
    return MatryoshkaHead(D, LEVELS, 64, HIDDEN, BOTTLENECK, nlayers, mode=mode)


# ---------------------------------------------------------------- reference implementation (official layout)
def _official_matryoshka_tensors(mode: str, nlayers: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the official key layout, written by hand from the documented shapes."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    state = {}
    for j, (m, k) in enumerate(zip(LEVELS, COUNTS)):
        state[f"matryoshka_projections.{j}.weight"] = rnd(m, m if mode == "slice" else D)
        state[f"matryoshka_projections.{j}.bias"] = rnd(m)
        if nlayers == 1:
            state[f"mlps.{j}.weight"] = rnd(BOTTLENECK, m)
            state[f"mlps.{j}.bias"] = rnd(BOTTLENECK)
        else:
            widths = [m] + [HIDDEN] * (nlayers - 1) + [BOTTLENECK]
            for layer in range(nlayers):
                state[f"mlps.{j}.{2 * layer}.weight"] = rnd(widths[layer + 1], widths[layer])
                state[f"mlps.{j}.{2 * layer}.bias"] = rnd(widths[layer + 1])
        state[f"last_layers.{j}.weight_g"] = torch.rand(k, 1, generator=gen) + 0.5
        state[f"last_layers.{j}.weight_v"] = rnd(k, BOTTLENECK)
    return state


def _reference_matryoshka(state: dict[str, torch.Tensor], x: torch.Tensor, mode: str, nlayers: int = 3):
    """Plain-torch forward of an official MRL head: x[:, :m] @ W.T + b, GELUs, then g * v / ||v|| prototypes."""
    outputs = []
    for j, m in enumerate(LEVELS):
        h = x[:, :m] if mode == "slice" else x
        h = h @ state[f"matryoshka_projections.{j}.weight"].T + state[f"matryoshka_projections.{j}.bias"]
        if nlayers == 1:
            h = h @ state[f"mlps.{j}.weight"].T + state[f"mlps.{j}.bias"]
        else:
            for layer in range(nlayers):
                w, b = state[f"mlps.{j}.{2 * layer}.weight"], state[f"mlps.{j}.{2 * layer}.bias"]
                h = F.gelu(h @ w.T + b)  # the official MRL MLP ends with a GELU too
        g, v = state[f"last_layers.{j}.weight_g"], state[f"last_layers.{j}.weight_v"]
        outputs.append(F.linear(h, g * v / v.norm(dim=1, keepdim=True)))
    return outputs


def _backbone_tensors() -> dict[str, torch.Tensor]:
    return {
        "backbone.cls_token": torch.zeros(1, 1, D),
        "backbone.pos_embed": torch.zeros(1, 5, D),
        "backbone.norm.weight": torch.ones(D),
        "backbone.blocks.0.0.ls1.gamma": torch.ones(D),
    }


# ---------------------------------------------------------------- prototype counts and validation
@pytest.mark.parametrize("d", [768, 1024])
def test_official_prototype_counts(d):
    levels = default_matryoshka_levels(d)
    assert levels == [d // 16, d // 8, d // 4, d // 2, d]
    assert matryoshka_prototype_counts(levels, 131072) == [8192, 16384, 32768, 65536, 131072]


def test_built_head_prototype_shapes():
    head = _tiny()
    assert head.prototype_counts == COUNTS
    out = head(torch.randn(3, D))
    assert [tuple(o.shape) for o in out] == [(3, k) for k in COUNTS]
    for layer, k in zip(head.last_layers, COUNTS):
        assert tuple(layer.parametrizations.weight.original0.shape) == (k, 1)
        assert tuple(layer.parametrizations.weight.original1.shape) == (k, BOTTLENECK)


@pytest.mark.parametrize(
    ("in_dim", "levels", "mode"),
    [
        (32, [5, 32], "slice"),
        (32, [8, 64], "slice"),
        (32, [16, 8], "slice"),
        (40, None, "slice"),
        (32, None, "x"),
    ],
)
def test_invalid_configs_raise_config_error(in_dim, levels, mode):
    with pytest.raises(ConfigError):
        MatryoshkaHead(in_dim, levels, 64, 8, 4, mode=mode)


def test_init_matches_official():
    head = MatryoshkaHead(64, None, 4096, 256, 64)
    for layer in head.last_layers:
        g = layer.parametrizations.weight.original0
        assert torch.equal(g, torch.ones_like(g)) and g.requires_grad
    weights = torch.cat([p.flatten() for n, p in head.named_parameters() if n.endswith("weight")])
    assert abs(weights.std().item() - 0.02) < 0.002
    for name, p in head.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
    v = head.last_layers[-1].parametrizations.weight.original1
    assert abs(v.std().item() - 0.02) < 0.002


# ---------------------------------------------------------------- slicing semantics
def test_slice_level_only_sees_its_prefix():
    head = _tiny("slice")
    x = torch.randn(5, D)
    base = head(x)
    for j, m in enumerate(LEVELS):
        x_cut = x.clone()
        x_cut[:, m:] = 0
        cut = head(x_cut)
        torch.testing.assert_close(cut[j], base[j], atol=0, rtol=0)
        if m < D:
            assert not torch.allclose(cut[-1], base[-1])


def test_project_level_uses_all_dims():
    head = _tiny("project")
    x = torch.randn(5, D)
    x_cut = x.clone()
    x_cut[:, LEVELS[0] :] = 0
    assert not torch.allclose(head(x_cut)[0], head(x)[0])


@pytest.mark.parametrize("mode", ["slice", "project", "tied"])
def test_no_l2_normalisation_of_bottleneck(mode):
    head = _tiny(mode)
    x = torch.randn(4, D)
    base = head(x)
    last_gelus = [head.mlp[-1]] if mode == "tied" else [mlp[-1] for mlp in head.mlps]
    assert all(isinstance(g, torch.nn.GELU) for g in last_gelus)
    handles = [g.register_forward_hook(lambda _m, _i, out: out * 3.0) for g in last_gelus]
    try:
        scaled = head(x)
    finally:
        for handle in handles:
            handle.remove()
    for a, b in zip(scaled, base):
        torch.testing.assert_close(a, 3.0 * b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- official checkpoints through load_heads
@pytest.mark.parametrize(("mode", "nlayers"), [("slice", 3), ("project", 3), ("slice", 1), ("project", 2)])
def test_official_layout_checkpoint_matches_reference(tmp_path, mode, nlayers):
    dino = _official_matryoshka_tensors(mode, nlayers, seed=1)
    ibot = _official_matryoshka_tensors(mode, nlayers, seed=2)
    teacher = {**_backbone_tensors()}
    teacher.update({f"dino_head.{k}": v for k, v in dino.items()})
    teacher.update({f"module.ibot_head.{k}": v for k, v in ibot.items()})  # DDP prefix is stripped
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, path)

    heads = load_heads(path)
    assert set(heads) == {"dino_head", "ibot_head"}
    x = torch.randn(7, D)
    for name, state in (("dino_head", dino), ("ibot_head", ibot)):
        head = heads[name]
        assert isinstance(head, MatryoshkaHead)
        assert (head.mode, head.levels, head.prototype_counts, head.nlayers) == (
            mode,
            LEVELS,
            COUNTS,
            nlayers,
        )
        with torch.no_grad():
            got = head(x)
        for a, b in zip(got, _reference_matryoshka(state, x, mode, nlayers)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_old_weight_norm_names_load_with_plain_load_state_dict():
    state = _official_matryoshka_tensors("slice", seed=3)
    head = _tiny("slice")
    head.load_state_dict(state)
    x = torch.randn(2, D)
    with torch.no_grad():
        for a, b in zip(head(x), _reference_matryoshka(state, x, "slice")):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["slice", "project", "tied"])
def test_official_state_dict_round_trips(tmp_path, mode):
    head = _tiny(mode)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # move g away from 1 and biases away from 0
    ibot = DINOHead(D, 48, HIDDEN, BOTTLENECK)
    state = {**heads_state_dict_official(head, "dino_head."), **heads_state_dict_official(ibot, "ibot_head.")}
    assert not any("parametrizations" in k for k in state)
    prototypes = "last_layer" if mode == "tied" else "last_layers.4"
    assert tuple(state[f"dino_head.{prototypes}.weight_g"].shape) == (64, 1)
    assert tuple(state[f"dino_head.{prototypes}.weight_v"].shape) == (64, BOTTLENECK)
    torch.save({"teacher": state}, tmp_path / "ckpt.pth")

    loaded = load_heads(tmp_path / "ckpt.pth")
    assert loaded["dino_head"].mode == mode and isinstance(loaded["ibot_head"], DINOHead)
    x = torch.randn(3, D)
    with torch.no_grad():
        for a, b in zip(loaded["dino_head"](x), head(x)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(loaded["ibot_head"](x)[0], ibot(x)[0], atol=0, rtol=0)


def test_missing_head_tensors_raise_checkpoint_error(tmp_path):
    path = tmp_path / "backbone_only.pth"
    torch.save({"teacher": _backbone_tensors()}, path)
    with pytest.raises(CheckpointError, match="backbone_only.pth"):
        load_heads(path)
    with pytest.raises(CheckpointError, match="absent.pth"):
        load_heads(tmp_path / "absent.pth")
    dino_only = {f"dino_head.{k}": v for k, v in _official_matryoshka_tensors("slice").items()}
    assert set(load_heads(dino_only, heads=("dino_head",))) == {"dino_head"}
    with pytest.raises(CheckpointError, match="ibot_head"):
        load_heads(dino_only)


def test_inconsistent_prototype_counts_raise_checkpoint_error():
    state = _official_matryoshka_tensors("slice")
    state["last_layers.0.weight_g"] = torch.ones(5, 1)
    state["last_layers.0.weight_v"] = torch.ones(5, BOTTLENECK)
    with pytest.raises(CheckpointError, match="prototype counts"):
        load_heads({f"dino_head.{k}": v for k, v in state.items()}, heads=("dino_head",))


# ---------------------------------------------------------------- tied mode
def test_tied_has_far_fewer_parameters_and_nested_prefix_semantics():
    slice_head, tied = _tiny("slice"), _tiny("tied")
    n_slice = sum(p.numel() for p in slice_head.parameters())
    n_tied = sum(p.numel() for p in tied.parameters())
    # one level's worth: projection 32*32+32, MLP 32*24+24 + 24*24+24 + 24*12+12, prototypes 64*(12+1)
    assert n_tied == (32 * 32 + 32) + (32 * 24 + 24) + (24 * 24 + 24) + (24 * 12 + 12) + 64 * 13
    assert n_tied < 0.6 * n_slice
    x = torch.randn(4, D)
    base = tied(x)
    assert [tuple(o.shape) for o in base] == [(4, k) for k in COUNTS]
    for j, m in enumerate(LEVELS):
        x_cut = x.clone()
        x_cut[:, m:] = 0
        torch.testing.assert_close(tied(x_cut)[j], base[j], atol=0, rtol=0)


def test_tied_matches_sliced_reference():
    tied = _tiny("tied")
    with torch.no_grad():
        for p in tied.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    s = heads_state_dict_official(tied)
    g, v = s["last_layer.weight_g"], s["last_layer.weight_v"]
    prototypes = g * v / v.norm(dim=1, keepdim=True)
    x = torch.randn(6, D)
    with torch.no_grad():
        got = tied(x)
    for j, (m, k) in enumerate(zip(LEVELS, COUNTS)):
        h = x[:, :m] @ s["matryoshka_projection.weight"][:m, :m].T + s["matryoshka_projection.bias"][:m]
        h = F.gelu(h @ s["mlp.0.weight"][:, :m].T + s["mlp.0.bias"])
        h = F.gelu(h @ s["mlp.2.weight"].T + s["mlp.2.bias"])
        h = F.gelu(h @ s["mlp.4.weight"].T + s["mlp.4.bias"])
        torch.testing.assert_close(got[j], h @ prototypes[:k].T, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- DINOv2 head
def test_dino_head_unit_bottleneck_and_frozen_g():
    head = DINOHead(D, 40, HIDDEN, BOTTLENECK)
    captured = []
    head.last_layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    out = head(torch.randn(6, D) * 5)
    assert len(out) == 1 and tuple(out[0].shape) == (6, 40)
    torch.testing.assert_close(captured[0].norm(dim=-1), torch.ones(6))
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones(40, 1))
    assert all(p.requires_grad for n, p in head.named_parameters() if "original0" not in n)
    # g = 1 and unit bottleneck: logits are cosine similarities, so bounded by 1
    assert out[0].abs().max() <= 1 + 1e-6


def test_dinov2_layout_loads_as_dino_head_and_matches_reference():
    gen = torch.Generator().manual_seed(5)
    state = {
        "mlp.0.weight": torch.randn(HIDDEN, D, generator=gen) * 0.3,
        "mlp.0.bias": torch.randn(HIDDEN, generator=gen) * 0.3,
        "mlp.2.weight": torch.randn(HIDDEN, HIDDEN, generator=gen) * 0.3,
        "mlp.2.bias": torch.randn(HIDDEN, generator=gen) * 0.3,
        "mlp.4.weight": torch.randn(BOTTLENECK, HIDDEN, generator=gen) * 0.3,
        "mlp.4.bias": torch.randn(BOTTLENECK, generator=gen) * 0.3,
        "last_layer.weight_g": torch.ones(50, 1),
        "last_layer.weight_v": torch.randn(50, BOTTLENECK, generator=gen),
    }
    heads = load_heads({"model": {f"dino_head.{k}": v for k, v in state.items()}}, heads=("dino_head",))
    head = heads["dino_head"]
    assert isinstance(head, DINOHead) and head.n_prototypes == 50
    x = torch.randn(4, D)
    h = F.gelu(x @ state["mlp.0.weight"].T + state["mlp.0.bias"])
    h = F.gelu(h @ state["mlp.2.weight"].T + state["mlp.2.bias"])
    h = h @ state["mlp.4.weight"].T + state["mlp.4.bias"]  # no trailing GELU in DINOv2
    h = h / h.norm(dim=-1, keepdim=True)
    v = state["last_layer.weight_v"]
    expected = h @ (v / v.norm(dim=1, keepdim=True)).T
    with torch.no_grad():
        torch.testing.assert_close(head(x)[0], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["slice", "tied"])
def test_normalized_bottleneck_option_makes_logits_cosines(mode: str) -> None:
    torch.manual_seed(0)
    head = MatryoshkaHead(
        32, n_prototypes=16, hidden_dim=24, bottleneck_dim=8, mode=mode, normalize_bottleneck=True
    )
    x = torch.randn(5, 32)
    # a unit bottleneck and unit prototypes (g = 1): every logit is a cosine, in [-1, 1]
    for logits in head(x):
        assert logits.abs().max() <= 1.0 + 1e-5
    if mode == "slice":  # the widest level by formula: cos(bottleneck, prototype)
        h = head.mlps[-1](head.matryoshka_projections[-1](x))
        v = head.last_layers[-1].parametrizations.weight.original1
        expected = F.normalize(h, dim=-1) @ F.normalize(v, dim=-1).T
        torch.testing.assert_close(head(x)[-1], expected, atol=1e-6, rtol=1e-5)


def test_fan_in_init_scales_each_layer_by_its_width() -> None:
    torch.manual_seed(0)
    head = MatryoshkaHead(
        256, levels=[128, 256], n_prototypes=512, hidden_dim=512, bottleneck_dim=64, init="fan_in"
    )
    for linear, fan_in in ((head.mlps[1][0], 256), (head.mlps[1][2], 512), (head.mlps[1][4], 512)):
        assert abs(float(linear.weight.std()) - fan_in**-0.5) < 0.05 * fan_in**-0.5
    official = MatryoshkaHead(256, levels=[128, 256], n_prototypes=512, hidden_dim=512, bottleneck_dim=64)
    assert abs(float(official.mlps[1][2].weight.std()) - 0.02) < 0.001
    with pytest.raises(ConfigError, match="head init"):
        MatryoshkaHead(256, n_prototypes=512, init="xavier")
