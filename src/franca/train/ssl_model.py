"""The Franca student/teacher pair and the loss of one training step (method §2).

:class:`SSLNetwork` is one backbone with its DINO (CLS) and iBOT (patch) heads; the student and the EMA teacher are two
of them. :class:`FrancaLoss` turns a multi-crop batch into the DINO, iBOT and KoLeo losses summed over the Matryoshka
levels. The training loop (:mod:`franca.train.trainer`) wires them; they hold no loop state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from franca.core.errors import CheckpointError, ConfigError
from franca.core.runtime import to_floats
from franca.data.batch import TrainBatch
from franca.models.checkpoints import load_backbone
from franca.models.heads import DINOHead, MatryoshkaHead, load_heads
from franca.models.vision_transformer import DinoVisionTransformer, build_model
from franca.ssl import DinoLoss, IBotPatchLoss, TeacherTargets, koleo_loss
from franca.train.config import TrainConfig


def build_backbone(config: TrainConfig) -> DinoVisionTransformer:
    """The backbone of ``config.model``; a ``pretrained_backbone`` is loaded with its positions resampled to the grid."""
    model_cfg = config.model
    backbone = build_model(model_cfg.arch, **model_cfg.vit_overrides())
    if model_cfg.pretrained_backbone:
        pretrained = load_backbone(model_cfg.pretrained_backbone, img_size=model_cfg.img_size)
        if pretrained.config.embed_dim != backbone.embed_dim or pretrained.n_blocks != backbone.n_blocks:
            raise CheckpointError(
                f"{model_cfg.pretrained_backbone}: a {pretrained.embed_dim}-wide {pretrained.n_blocks}-block backbone "
                f"cannot initialise model.arch={model_cfg.arch} ({backbone.embed_dim} wide, {backbone.n_blocks} blocks)"
            )
        state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("rasa.")}
        result = backbone.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            bad = (result.missing_keys or result.unexpected_keys)[0]
            raise CheckpointError(
                f"{model_cfg.pretrained_backbone}: does not fit model settings (tensor {bad!r})"
            )
    return backbone


def build_head(config: TrainConfig, embed_dim: int) -> nn.Module:
    """One projection/clustering head as ``config.heads`` describes (Matryoshka modes or the DINOv2 baseline)."""
    heads = config.heads
    if heads.mode == "dinov2":
        return DINOHead(
            embed_dim,
            heads.n_prototypes,
            heads.hidden_dim,
            heads.bottleneck_dim,
            heads.nlayers,
            init=heads.init,
        )
    levels = heads.level_widths(embed_dim)
    return MatryoshkaHead(
        embed_dim,
        levels=levels,
        n_prototypes=heads.n_prototypes,
        hidden_dim=heads.hidden_dim,
        bottleneck_dim=heads.bottleneck_dim,
        nlayers=heads.nlayers,
        mode=heads.mode,
        normalize_bottleneck=heads.normalize_bottleneck,
        init=heads.init,
    )


class SSLNetwork(nn.Module):
    """A backbone with its DINO head (on CLS tokens) and iBOT head (on patch tokens; the same module when shared)."""

    def __init__(
        self, backbone: DinoVisionTransformer, dino_head: nn.Module, ibot_head: nn.Module | None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head if ibot_head is not None else dino_head

    @property
    def separate_ibot_head(self) -> bool:
        return self.ibot_head is not self.dino_head

    def parts(self) -> dict[str, nn.Module]:
        """The modules that are clipped and scheduled separately: backbone, dino_head (and ibot_head)."""
        parts = {"backbone": self.backbone, "dino_head": self.dino_head}
        if self.separate_ibot_head:
            parts["ibot_head"] = self.ibot_head
        return parts

    def forward(self, batch: TrainBatch, teacher: bool = False) -> dict[str, object]:
        """Run backbone and heads on a multi-crop batch.

        The teacher sees only the unmasked global crops; the student sees the masked global crops and the local
        crops. Returns per-level logits: ``cls`` [2B or (2+n_local)B, K_j], ``patch`` [M, K_j] at the masked positions
        (both global-first, view-major), plus the backbone ``global_cls`` [2B, D] for KoLeo.
        """
        n_global = batch.global_crops.shape[0]
        if teacher or batch.local_crops is None or not batch.local_crops.shape[0]:
            global_out = self.backbone.forward_features(
                batch.global_crops, masks=None if teacher else batch.masks
            )
            cls_tokens = global_out["x_norm_clstoken"]
        else:  # global and local crops through the blocks together (token-concatenated multi-crop forward)
            global_out, local_out = self.backbone.forward_features_list(
                [batch.global_crops, batch.local_crops], [batch.masks, None]
            )
            cls_tokens = torch.cat([global_out["x_norm_clstoken"], local_out["x_norm_clstoken"]])
        patch_tokens = global_out["x_norm_patchtokens"].flatten(0, 1)[batch.masked_indices]
        if self.separate_ibot_head:
            cls_logits, patch_logits = self.dino_head(cls_tokens), self.ibot_head(patch_tokens)
        else:  # one head: a single pass over CLS and masked patch tokens together
            joint = self.dino_head(torch.cat([cls_tokens, patch_tokens]))
            cls_logits = [level[: cls_tokens.shape[0]] for level in joint]
            patch_logits = [level[cls_tokens.shape[0] :] for level in joint]
        return {"cls": cls_logits, "patch": patch_logits, "global_cls": cls_tokens[:n_global]}


def build_student_teacher(config: TrainConfig) -> tuple[SSLNetwork, SSLNetwork]:
    """Student and teacher networks; the teacher starts as an exact copy and never receives gradients."""
    backbone = build_backbone(config)
    dino_head = build_head(config, backbone.embed_dim)
    ibot_head = build_head(config, backbone.embed_dim) if config.heads.separate_ibot_head else None
    student = SSLNetwork(backbone, dino_head, ibot_head)
    if config.model.pretrained_heads:
        load_pretrained_heads(student, config.model.pretrained_heads)
    teacher = copy.deepcopy(student)
    teacher.backbone.drop_path_rate = 0.0
    for block in teacher.backbone.blocks:
        block.drop_path_rate = 0.0
        block.drop_path = nn.Identity()
    teacher.requires_grad_(False)
    return student, teacher


def load_pretrained_heads(network: SSLNetwork, source: str) -> None:
    """Copy the heads of an official (or our) checkpoint into ``network``; their shapes must match the config."""
    wanted = ("dino_head", "ibot_head") if network.separate_ibot_head else ("dino_head",)
    heads = load_heads(source, heads=wanted)
    for name in wanted:
        target: nn.Module = getattr(network, name)
        try:
            target.load_state_dict(heads[name].state_dict())
        except RuntimeError as error:
            first = str(error).strip().splitlines()[-1].strip()
            raise CheckpointError(
                f"{source}: its {name} does not match the configured heads ({first}); "
                "adjust the heads.* settings or set model.pretrained_heads=null to re-initialise them"
            ) from None


@dataclass
class StepLosses:
    """The losses of one step: the total to back-propagate and the detached per-level values for the logs."""

    total: Tensor
    dino: Tensor
    ibot: Tensor
    koleo: Tensor
    dino_levels: list[Tensor]
    ibot_levels: list[Tensor]

    def log_values(self) -> dict[str, float]:
        """The losses as floats, read from the device in one copy (one host synchronisation, not one per value)."""
        tensors = {
            "loss": self.total,
            "dino_loss": self.dino,
            "ibot_loss": self.ibot,
            "koleo_loss": self.koleo,
        }
        tensors.update({f"dino_loss_level{j}": v for j, v in enumerate(self.dino_levels)})
        tensors.update({f"ibot_loss_level{j}": v for j, v in enumerate(self.ibot_levels)})
        return dict(zip(tensors, to_floats(list(tensors.values()))))


class FrancaLoss(nn.Module):
    """DINO + iBOT + KoLeo over the Matryoshka levels, with Sinkhorn-Knopp (or EMA-centred) teacher targets.

    Holds the centring state (the per-level EMA centres when ``loss.centering == "centering"``), so it is saved with
    the training checkpoint.
    """

    def __init__(self, config: TrainConfig, dino_prototypes: list[int], ibot_prototypes: list[int]) -> None:
        super().__init__()
        loss_cfg = config.loss
        if loss_cfg.level_weights is not None and len(loss_cfg.level_weights) != len(dino_prototypes):
            raise ConfigError(
                f"config key 'loss.level_weights' has {len(loss_cfg.level_weights)} weights for "
                f"{len(dino_prototypes)} Matryoshka levels"
            )
        self.config = loss_cfg
        self.dino_targets = TeacherTargets(
            loss_cfg.centering, dino_prototypes, loss_cfg.center_momentum, loss_cfg.sk_iterations
        )
        self.ibot_targets = TeacherTargets(
            loss_cfg.centering, ibot_prototypes, loss_cfg.center_momentum, loss_cfg.sk_iterations
        )
        compiled = config.train.compile  # train.compile also compiles the losses' cross-entropy kernels
        self.dino_loss = DinoLoss(loss_cfg.student_temp, loss_cfg.level_weights, compiled)
        self.ibot_loss = IBotPatchLoss(loss_cfg.student_temp, loss_cfg.level_weights, compiled)

    def forward(self, student: dict, teacher: dict, batch: TrainBatch, teacher_temp: float) -> StepLosses:
        n_global = batch.global_crops.shape[0]
        per_view = n_global // 2
        with torch.no_grad():
            dino_targets = self.dino_targets([t.float() for t in teacher["cls"]], teacher_temp)
            ibot_targets = self.ibot_targets([t.float() for t in teacher["patch"]], teacher_temp)
        student_global = [s[:n_global].float().view(2, per_view, -1) for s in student["cls"]]
        n_local = (student["cls"][0].shape[0] - n_global) // per_view
        student_local = (
            [s[n_global:].float().view(n_local, per_view, -1) for s in student["cls"]] if n_local else None
        )
        dino = self.dino_loss(student_global, student_local, [t.view(2, per_view, -1) for t in dino_targets])
        ibot = self.ibot_loss(
            [s.float() for s in student["patch"]], ibot_targets, batch.masked_weights, n_global_crops=n_global
        )
        koleo = sum(koleo_loss(chunk) for chunk in student["global_cls"].float().chunk(2))
        cfg = self.config
        total = cfg.dino_weight * dino.total + cfg.ibot_weight * ibot.total + cfg.koleo_weight * koleo
        return StepLosses(total, dino.total, ibot.total, koleo, dino.per_level, ibot.per_level)
