"""The backbone against independent implementations: timm's DINOv2 ViT and the official interpolation formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from franca.models import build_model, vit_tiny
from franca.models.layers import swiglu_hidden_dim

timm = pytest.importorskip("timm")


def _timm_to_franca(timm_state: dict[str, torch.Tensor], registers: bool) -> dict[str, torch.Tensor]:
    """Map timm's DINOv2 parameter names onto ours (the only differences are the FFN and register layout)."""
    state = {"mask_token": torch.zeros(1, timm_state["cls_token"].shape[-1])}
    for key, value in timm_state.items():
        if key == "reg_token":
            state["register_tokens"] = value
        elif key == "pos_embed" and registers:
            # timm keeps no class position for the register variants: our CLS position is zero then.
            state["pos_embed"] = torch.cat([torch.zeros_like(value[:, :1]), value], dim=1)
        else:
            state[key] = value
    return state


def _randomise(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("registers", [0, 4])
def test_matches_timm_dinov2_small(registers: int) -> None:
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    reference = timm.create_model(name, pretrained=False, num_classes=0, img_size=98, depth=3).eval()
    _randomise(reference)
    ours = build_model(
        "vit_small", depth=3, img_size=98, ffn_layer="mlp", num_register_tokens=registers
    ).eval()
    ours.load_state_dict(_timm_to_franca(reference.state_dict(), bool(registers)))
    x = torch.randn(2, 3, 98, 98)
    with torch.no_grad():
        expected = reference.forward_features(x)
        out = ours.forward_features(x)
    prefix = 1 + registers
    torch.testing.assert_close(out["x_norm_clstoken"], expected[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_norm_patchtokens"], expected[:, prefix:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_norm_regtokens"], expected[:, 1:prefix], atol=1e-5, rtol=1e-5)
    assert out["x_prenorm"].shape == expected.shape


def test_swiglu_matches_timm_packed_swiglu() -> None:
    reference = timm.create_model(
        "vit_giant_patch14_dinov2",
        pretrained=False,
        num_classes=0,
        img_size=56,
        depth=2,
        embed_dim=384,
        num_heads=6,
    ).eval()
    _randomise(reference)
    hidden = reference.blocks[0].mlp.fc2.in_features
    ours = build_model("vit_small", depth=2, img_size=56, ffn_layer="swiglu", ffn_hidden_dim=hidden).eval()
    state = {"mask_token": torch.zeros(1, 384)}
    for key, value in reference.state_dict().items():
        state[key.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")] = value
    ours.load_state_dict(state)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.forward_features(x)["x_norm_patchtokens"],
            reference.forward_features(x)[:, 1:],
            atol=1e-5,
            rtol=1e-5,
        )


def test_swiglu_hidden_dims_of_the_official_models() -> None:
    # The method doc's table: 2048 (B), 2736 (L), 4096 (g).
    assert [swiglu_hidden_dim(d) for d in (768, 1024, 1536)] == [2048, 2736, 4096]


def _official_interpolation(pos_embed: torch.Tensor, w: int, h: int, patch: int) -> torch.Tensor:
    """DINOv2's interpolate_pos_encoding, written as in the official code (w is the image height there)."""
    n_patches = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch, h // patch
    m = int(math.sqrt(n_patches))
    sx, sy = float(w0 + 0.1) / m, float(h0 + 0.1) / m
    patch_pos = F.interpolate(
        pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2),
        scale_factor=(sx, sy),
        mode="bicubic",
        antialias=False,
    )
    patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((pos_embed[:, :1], patch_pos), dim=1)


@pytest.mark.parametrize("size", [(224, 224), (98, 168), (518, 266)])
def test_position_interpolation_follows_the_official_offset_formula(size: tuple[int, int]) -> None:
    model = vit_tiny(patch_size=14, img_size=518)  # a 37x37 grid like the released 518-px checkpoints
    height, width = size
    expected = _official_interpolation(model.pos_embed.detach(), height, width, 14)
    torch.testing.assert_close(model.interpolate_pos_encoding(height, width).detach(), expected)


def test_rectangular_input_token_counts_and_reshape() -> None:
    model = vit_tiny(patch_size=14, img_size=224).eval()
    x = torch.randn(1, 3, 140, 84)
    out = model.forward_features(x)
    assert out["x_norm_patchtokens"].shape == (1, 10 * 6, 192)
    (grid,) = model.get_intermediate_layers(x, 1, reshape=True)
    assert grid.shape == (1, 192, 10, 6)
    # reshape lays the row-major tokens out as rows x cols
    torch.testing.assert_close(grid[0, :, 2, 3], out["x_norm_patchtokens"][0, 2 * 6 + 3])


def test_input_not_multiple_of_patch_is_an_error() -> None:
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit_tiny(patch_size=14)(torch.randn(1, 3, 100, 112))


def test_mask_token_replaces_masked_patches_only() -> None:
    model = vit_tiny(patch_size=8, img_size=32).eval()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5, 7]] = True
    tokens = model.prepare_tokens_with_masks(x, masks)
    plain = model.prepare_tokens_with_masks(x)
    pos = model.interpolate_pos_encoding(32, 32)
    # masked patches carry mask_token + position; everything else is unchanged
    torch.testing.assert_close(tokens[0, 1 + 5], model.mask_token[0] + pos[0, 1 + 5])
    torch.testing.assert_close(tokens[1], plain[1])
    unmasked = [i for i in range(16) if i not in (1, 5, 7)]
    torch.testing.assert_close(tokens[0, [1 + i for i in unmasked]], plain[0, [1 + i for i in unmasked]])
    out = model.forward_features(x, masks)
    assert out["masks"] is masks


def test_intermediate_layers_and_forward() -> None:
    model = vit_tiny(patch_size=8, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    layers = model.get_intermediate_layers(x, n=2, return_class_token=True)
    assert len(layers) == 2
    features = model.forward_features(x)
    # the last block's normalised output is what forward_features returns
    torch.testing.assert_close(layers[-1][0], features["x_norm_patchtokens"])
    torch.testing.assert_close(layers[-1][1], features["x_norm_clstoken"])
    torch.testing.assert_close(model(x), features["x_norm_clstoken"])
    unnormed = model.get_intermediate_layers(x, n=[5], norm=False)[0]
    torch.testing.assert_close(unnormed, features["x_prenorm"][:, 1:])


def test_batch_subset_stochastic_depth_keeps_untouched_samples() -> None:
    torch.manual_seed(0)
    model = vit_tiny(patch_size=8, img_size=32, depth=1, drop_path_rate=0.5).train()
    block = model.blocks[0]
    x = torch.randn(8, 5, 192)
    calls = []

    def branch(sub: torch.Tensor) -> torch.Tensor:
        calls.append(sub.shape[0])
        return torch.ones_like(sub)

    from franca.models.layers import drop_add_residual_batch_subset

    out = drop_add_residual_batch_subset(x, branch, 0.5)
    assert calls == [4]
    changed = (out - x).abs().amax(dim=(1, 2)) > 0
    assert changed.sum() == 4
    # the kept samples get the residual scaled by B / subset = 2
    torch.testing.assert_close((out - x)[changed], torch.full_like(x[changed], 2.0))
    assert block.drop_path_rate == 0.5


@pytest.mark.parametrize("mode", ["batch_subset", "per_sample"])
def test_drop_path_in_training_only(mode: str) -> None:
    model = vit_tiny(patch_size=8, img_size=32, drop_path_rate=0.1, drop_path_mode=mode)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        b = model(x)
        assert not torch.allclose(a, b)  # stochastic depth draws new samples in training
        model.eval()
        a, b = model(x), model(x)
    torch.testing.assert_close(a, b)


def test_token_concatenated_multicrop_forward_equals_separate_forwards() -> None:
    model = vit_tiny(patch_size=8, img_size=32, num_register_tokens=2).eval()
    with torch.no_grad():
        model.mask_token.normal_()
    global_crops, local_crops = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)
    masks = torch.rand(4, 16) < 0.4
    with torch.no_grad():
        together = model.forward_features_list([global_crops, local_crops], [masks, None])
        apart = [model.forward_features(global_crops, masks), model.forward_features(local_crops)]
    for joint, single in zip(together, apart):
        for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_norm_regtokens", "x_prenorm"):
            torch.testing.assert_close(joint[key], single[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.2])
def test_gradient_checkpointing_gives_the_same_gradients(drop_path_rate: float) -> None:
    """With stochastic depth too: the recomputation replays the same random subsets (the RNG state is restored)."""
    torch.manual_seed(0)
    model = vit_tiny(patch_size=8, img_size=32, depth=2, drop_path_rate=drop_path_rate).train()
    crops = [torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)]

    def grads() -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        model.zero_grad()
        outs = model.forward_features_list(crops)
        sum(o["x_norm_clstoken"].pow(2).sum() + o["x_norm_patchtokens"].sum() for o in outs).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5)
