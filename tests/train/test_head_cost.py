"""head_cost: parameters, FLOPs and memory of the training heads, against hand formulas and the analytic FLOP counts."""

from __future__ import annotations

import pytest
import torch

from franca.models.heads import MatryoshkaHead
from franca.train.config import load_config
from franca.train.flops import HeadSpec, franca_step_flops, head_flops_per_token
from franca.train.head_cost import head_cost, measure_head
from franca.train.ssl_model import build_backbone

D, HIDDEN, BOTTLENECK, K_MAX = 64, 32, 16, 128
LEVELS = (16, 32, 64)  # heads.levels=[0.25, 0.5, 1.0] of d = 64
COUNTS = (32, 64, 128)  # K_j = 128 * m_j / 64
TINY = [
    "data.path=unused",
    f"model.embed_dim={D}",
    "model.depth=2",
    "model.num_heads=2",
    "model.patch_size=8",
    "model.img_size=32",
    "heads.levels=[0.25,0.5,1.0]",
    f"heads.n_prototypes={K_MAX}",
    f"heads.hidden_dim={HIDDEN}",
    f"heads.bottleneck_dim={BOTTLENECK}",
    "train.batch_size_per_device=4",
]
MODES = ("slice", "project", "tied", "dinov2")


def _config(mode: str, *extra: str):
    return load_config("tiny_cpu", [*TINY, f"heads.mode={mode}", *extra])


def _mlp_params(in_dim: int) -> int:
    """Linear(in->h), Linear(h->h), Linear(h->b), with biases (nlayers 3)."""
    return in_dim * HIDDEN + HIDDEN + HIDDEN * HIDDEN + HIDDEN + HIDDEN * BOTTLENECK + BOTTLENECK


def _prototype_params(k: int) -> int:
    return k * BOTTLENECK + k  # v [K, b] and g [K, 1]


def _hand_params(mode: str) -> int:
    """One head's parameters from its layer shapes (docs/method.md §2.2)."""
    if mode == "slice":
        return sum(m * m + m + _mlp_params(m) + _prototype_params(k) for m, k in zip(LEVELS, COUNTS))
    if mode == "project":
        return sum(D * m + m + _mlp_params(m) + _prototype_params(k) for m, k in zip(LEVELS, COUNTS))
    if mode == "tied":
        return D * D + D + _mlp_params(D) + _prototype_params(K_MAX)
    return _mlp_params(D) + _prototype_params(K_MAX)  # dinov2: one level of K_MAX prototypes


@pytest.mark.parametrize("mode", MODES)
def test_parameters_match_the_layer_shapes(mode: str) -> None:
    cost = head_cost(_config(mode))
    assert cost.dino_params == cost.ibot_params == _hand_params(mode)
    assert cost.params == 2 * _hand_params(mode)
    frozen_g = K_MAX if mode == "dinov2" else 0  # DINOHead keeps its prototype magnitudes at 1
    assert cost.trainable_params == 2 * (_hand_params(mode) - frozen_g)
    assert cost.backbone_params == sum(p.numel() for p in build_backbone(_config(mode)).parameters())


@pytest.mark.parametrize("mode", MODES)
def test_optimizer_memory_is_two_fp32_moments_a_gradient_and_an_ema_copy(mode: str) -> None:
    cost = head_cost(_config(mode))
    trainable = 2 * (_hand_params(mode) - (K_MAX if mode == "dinov2" else 0))
    assert cost.adam_bytes == 2 * 4 * trainable
    assert cost.grad_bytes == 4 * trainable
    assert cost.ema_bytes == 4 * 2 * _hand_params(mode)
    assert cost.optimizer_bytes == cost.adam_bytes + cost.grad_bytes + cost.ema_bytes
    if mode != "dinov2":
        assert cost.adam_bytes == 2 * 4 * cost.params


@pytest.mark.parametrize("mode", MODES)
def test_flops_match_the_analytic_count_and_the_step_count(mode: str) -> None:
    config = _config(mode)
    cost = head_cost(config)
    analytic = head_flops_per_token(HeadSpec.from_config(config.heads, D))
    assert cost.dino.forward_flops == cost.ibot.forward_flops == analytic
    assert cost.dino.train_flops == 3 * analytic  # backward: input and weight gradients, 2 x forward
    batch = cost.batch_size
    step = franca_step_flops(config, batch)
    assert cost.student_flops == pytest.approx(step["student_heads"] / batch, rel=1e-12)
    assert cost.teacher_flops == pytest.approx(step["teacher_heads"] / batch, rel=1e-12)
    assert cost.flops_share == pytest.approx(
        (step["student_heads"] + step["teacher_heads"]) / step["total"], rel=1e-12
    )


def test_one_level_head_flops_and_tokens_by_hand() -> None:
    """One level of width d: per token 2(d*d + d*h + h*h + h*b + b*K) forward; tokens per image from the crops."""
    config = _config("slice", "heads.levels=[1.0]", "crops.n_local=3")
    cost = head_cost(config)
    per_token = 2 * (D * D + D * HIDDEN + HIDDEN * HIDDEN + HIDDEN * BOTTLENECK + BOTTLENECK * K_MAX)
    assert cost.dino.forward_flops == per_token
    # 4 images, 8 global crops of 4x4 patches, 4 of them masked, crop i masking int(16 r), r ~ U[p_i, p_i+1] with
    # p = 0.1, 0.2375, 0.375, 0.5125, 0.65: 16 r spans [1.6, 3.8], [3.8, 6], [6, 8.2], [8.2, 10.4], whose floors
    # integrate to 4.8, 9.6, 14.6 and 19.4 over widths of 2.2 each
    assert cost.cls_tokens == 2 + 3 and cost.teacher_cls_tokens == 2
    assert cost.masked_patches == pytest.approx((4.8 + 9.6 + 14.6 + 19.4) / 2.2 / 4)
    tokens_student = 5 + cost.masked_patches
    tokens_teacher = 2 + cost.masked_patches
    assert cost.student_flops == pytest.approx(3 * per_token * tokens_student)
    assert cost.teacher_flops == pytest.approx(per_token * tokens_teacher)


def test_activation_bytes_of_a_one_level_head_by_hand() -> None:
    """Slice head, 1 level, 1-layer MLP: per token the head input x [d], the projection's output [d] (the MLP's
    input) and the bottleneck [b] (the prototype layer's input); per call the prototype norms [K] and the normalised
    prototype matrix [K, b]. fp32, parameters excluded."""
    d, b, k = 24, 8, 40
    with torch.device("meta"):
        head = MatryoshkaHead(d, [d], k, hidden_dim=16, bottleneck_dim=b, nlayers=1)
    measured = measure_head(head)
    assert measured.activation_bytes == 4 * (d + d + b)
    assert measured.activation_fixed_bytes == 4 * (k + k * b)
    assert measured.logit_bytes == 4 * k
    assert measured.params == d * d + d + d * b + b + k * b + k


def test_shared_head_counts_one_module_and_the_same_flops() -> None:
    separate = head_cost(_config("slice"))
    shared = head_cost(_config("slice", "heads.separate_ibot_head=false"))
    assert shared.ibot is None and shared.ibot_params == 0
    assert shared.params == separate.params // 2
    assert shared.flops == pytest.approx(separate.flops)
    assert shared.activation_bytes == pytest.approx(separate.activation_bytes)
    assert shared.activation_fixed_bytes == separate.activation_fixed_bytes // 2


def test_mode_ordering() -> None:
    """dinov2 (one level, no nesting) is smaller than slice in everything; tied holds fewer parameters than slice
    but runs the same products; project costs a little more than slice (d -> m_j projections)."""
    cost = {mode: head_cost(_config(mode)) for mode in MODES}
    slice_, tied, dinov2 = cost["slice"], cost["tied"], cost["dinov2"]
    for name in ("params", "flops", "activation_bytes", "teacher_logit_bytes", "optimizer_bytes"):
        assert getattr(dinov2, name) < getattr(slice_, name), name
    assert tied.params < slice_.params and tied.optimizer_bytes < slice_.optimizer_bytes
    assert tied.flops == slice_.flops
    assert tied.activation_fixed_bytes < slice_.activation_fixed_bytes  # one prototype matrix, sliced by rows
    assert cost["project"].flops > slice_.flops


def test_paper_vit_g_heads_cost_no_memory_and_match_the_method_doc() -> None:
    """ViT-g (d 1536) with 131072 prototypes, built on the meta device: levels 96..1536 take 253,952 prototypes."""
    config = load_config("vitg14_laion", ["data.path=unused"])
    cost = head_cost(config)
    assert cost.dino.logit_bytes == 4 * (8192 + 16384 + 32768 + 65536 + 131072)
    prototypes = 253952 * (384 + 1)
    assert cost.dino_params > prototypes and cost.dino_params < prototypes + 40_000_000
    assert 0 < cost.flops_share < 0.1  # a 1.1 B-parameter backbone dwarfs the heads' products
