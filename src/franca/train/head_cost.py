"""What the projection/clustering heads of a training config cost: parameters, FLOPs, activation and optimizer memory.

:func:`head_cost` builds the DINO and iBOT heads that :func:`franca.train.ssl_model.build_student_teacher` builds for a
:class:`~franca.train.config.TrainConfig`, on the meta device (a ViT-g head of 131072 prototypes costs no memory), and
*measures* them rather than estimating:

- parameters: counted from the modules (DINO and iBOT head; the iBOT count is 0 when ``heads.separate_ibot_head`` is
  false and one head serves both);
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over a forward and a backward pass of one token (meta tensors; a
  head's products are linear in the number of tokens), times the tokens one image sends through the heads in a step.
  The student's DINO head sees the CLS tokens of the 2 global and ``n_local`` local crops, its iBOT head the masked
  patch tokens of the global crops (their expectation, :func:`~franca.train.flops.expected_masked_patches`); the
  teacher runs the forward only, on the 2 global CLS tokens and the same masked patches
  (:meth:`franca.train.ssl_model.SSLNetwork.forward`). The conventions are those of :mod:`franca.train.flops`
  (matrix products only, a multiply-add is 2 FLOPs), so the counts equal :func:`~franca.train.flops.franca_step_flops`'
  head parts;
- activation memory: the bytes of the tensors autograd saves for the backward pass in the student heads' forward
  (``torch.autograd.graph.saved_tensors_hooks``, unique storages, parameters left out, fp32), split into a part per
  token and a fixed part per step (the weight-normalised prototype matrices ``g * v / ||v||``, which the prototype
  layers save whatever the batch), plus the teacher's logits, which live until the loss has its targets;
- optimizer memory: AdamW's two fp32 moments and the fp32 gradient per trainable head parameter, and the EMA
  teacher's fp32 copy of every head parameter.

The backbone's parameters and training FLOPs per image come alongside, so that the heads' share of the step is known.
Loss-side memory (the student's log-softmax, the Sinkhorn-Knopp targets) is not counted; the student's logits are
reported as :attr:`HeadCost.student_logit_bytes` for scale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.flop_counter import FlopCounterMode

from franca.models.vision_transformer import DinoVisionTransformer
from franca.train.config import TrainConfig, load_config
from franca.train.flops import expected_masked_patches, franca_step_flops, vit_config_from_train
from franca.train.ssl_model import build_head

__all__ = ["PAPER_MODELS", "HeadCost", "HeadMeasure", "head_cost", "measure_head", "paper_head_cost"]

FP32_BYTES = 4


@dataclass(frozen=True)
class HeadMeasure:
    """One head measured on the meta device (fp32).

    ``params``: all parameters; ``trainable_params``: those with ``requires_grad`` (DINOHead freezes its prototype
    magnitudes g); ``forward_flops`` / ``train_flops``: FLOPs of the forward / forward + backward of one token
    (input gradient included, as in training, where the tokens come from the backbone); ``activation_bytes``: bytes
    saved for the backward per token; ``activation_fixed_bytes``: bytes saved per forward call whatever the number of
    tokens; ``logit_bytes``: the logits of one token over every level.
    """

    params: int
    trainable_params: int
    forward_flops: int
    train_flops: int
    activation_bytes: int
    activation_fixed_bytes: int
    logit_bytes: int


def _saved_bytes(head: nn.Module, tokens: int) -> int:
    """Bytes of the unique non-parameter storages autograd saves in ``head``'s forward on ``tokens`` meta tokens."""
    parameter_storages = {param.untyped_storage()._cdata for param in head.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameter_storages:
            saved[storage._cdata] = storage.nbytes()
        return tensor  # kept alive by the graph until the sum below, so no storage key is reused

    x = torch.empty(tokens, head.in_dim, device="meta", requires_grad=True)
    with saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = head(x)
    total = sum(saved.values())
    del outputs
    return total


def _flops(head: nn.Module, tokens: int) -> tuple[int, int]:
    """FlopCounterMode's (forward, forward + backward) FLOPs of ``head`` on ``tokens`` meta tokens."""
    x = torch.empty(tokens, head.in_dim, device="meta", requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        outputs = head(x)
        forward = counter.get_total_flops()
        torch.autograd.backward(outputs, [torch.empty_like(output) for output in outputs])
    return int(forward), int(counter.get_total_flops())


def measure_head(head: nn.Module) -> HeadMeasure:
    """Measure a :class:`~franca.models.heads.MatryoshkaHead` or :class:`~franca.models.heads.DINOHead` (see
    :class:`HeadMeasure`). Built on the meta device it costs no memory; a real head is measured on meta inputs too
    (its parameters must then be on the meta device: build it under ``torch.device("meta")``)."""
    forward, train = _flops(head, 1)
    one, two = _saved_bytes(head, 1), _saved_bytes(head, 2)
    params = list(head.parameters())
    return HeadMeasure(
        params=sum(param.numel() for param in params),
        trainable_params=sum(param.numel() for param in params if param.requires_grad),
        forward_flops=forward,
        train_flops=train,
        activation_bytes=two - one,
        activation_fixed_bytes=2 * one - two,
        logit_bytes=FP32_BYTES * sum(head.prototype_counts),
    )


@dataclass(frozen=True)
class HeadCost:
    """The cost of the training heads of one config, per image of a step unless a name says otherwise.

    Tokens per image: ``cls_tokens`` (2 + n_local, the student's DINO head), ``teacher_cls_tokens`` (2) and
    ``masked_patches`` (expected masked patch tokens per image, student and teacher iBOT head; the expectation for
    ``batch_size`` images, which moves it by a fraction of a patch). FLOPs per image: ``student_flops`` (forward +
    backward), ``teacher_flops`` (forward), ``backbone_flops`` (teacher forward + student forward and backward, with
    the config's stochastic-depth subsets, :func:`~franca.train.flops.franca_step_flops`). Bytes (fp32):
    ``activation_bytes`` (saved for the backward per image), ``activation_fixed_bytes`` (per step),
    ``teacher_logit_bytes`` and ``student_logit_bytes`` (per image).
    """

    arch: str
    mode: str
    separate_ibot_head: bool
    batch_size: int
    dino: HeadMeasure
    ibot: HeadMeasure | None
    cls_tokens: float
    teacher_cls_tokens: float
    masked_patches: float
    backbone_params: int
    backbone_flops: float

    def _per_head(self, student: bool, value: str) -> float:
        """``value`` (a per-token field of :class:`HeadMeasure`) times each head's tokens per image, summed."""
        cls = self.cls_tokens if student else self.teacher_cls_tokens
        ibot = self.ibot if self.ibot is not None else self.dino  # a shared head sees both token sets
        return getattr(self.dino, value) * cls + getattr(ibot, value) * self.masked_patches

    @property
    def dino_params(self) -> int:
        return self.dino.params

    @property
    def ibot_params(self) -> int:
        return self.ibot.params if self.ibot is not None else 0

    @property
    def params(self) -> int:
        return self.dino_params + self.ibot_params

    @property
    def trainable_params(self) -> int:
        return self.dino.trainable_params + (self.ibot.trainable_params if self.ibot is not None else 0)

    @property
    def student_flops(self) -> float:
        return self._per_head(True, "train_flops")

    @property
    def teacher_flops(self) -> float:
        return self._per_head(False, "forward_flops")

    @property
    def flops(self) -> float:
        """Head FLOPs per image of one step: student forward + backward and teacher forward."""
        return self.student_flops + self.teacher_flops

    @property
    def flops_share(self) -> float:
        """The heads' fraction of the step's FLOPs (heads + backbone, student and teacher)."""
        return self.flops / (self.flops + self.backbone_flops)

    @property
    def activation_bytes(self) -> float:
        """Saved-for-backward bytes of the student heads per image (the fixed part, per step, is apart)."""
        return self._per_head(True, "activation_bytes")

    @property
    def activation_fixed_bytes(self) -> int:
        return self.dino.activation_fixed_bytes + (
            self.ibot.activation_fixed_bytes if self.ibot is not None else 0
        )

    @property
    def teacher_logit_bytes(self) -> float:
        return self._per_head(False, "logit_bytes")

    @property
    def student_logit_bytes(self) -> float:
        return self._per_head(True, "logit_bytes")

    @property
    def param_bytes(self) -> int:
        return FP32_BYTES * self.params

    @property
    def grad_bytes(self) -> int:
        return FP32_BYTES * self.trainable_params

    @property
    def adam_bytes(self) -> int:
        """AdamW's two fp32 moments per trainable parameter."""
        return 2 * FP32_BYTES * self.trainable_params

    @property
    def ema_bytes(self) -> int:
        """The EMA teacher's fp32 copy of the heads."""
        return FP32_BYTES * self.params

    @property
    def optimizer_bytes(self) -> int:
        """AdamW moments + EMA teacher copy + gradients."""
        return self.adam_bytes + self.ema_bytes + self.grad_bytes

    def to_dict(self) -> dict[str, Any]:
        """Every field and derived quantity as plain numbers (the two head measures as nested dicts)."""
        data = dataclasses.asdict(self)
        derived = [name for name, value in vars(HeadCost).items() if isinstance(value, property)]
        data.update({name: getattr(self, name) for name in derived})
        return data


def _backbone_params(config: TrainConfig) -> int:
    """Parameters of the config's backbone, built on the meta device."""
    with torch.device("meta"):
        backbone = DinoVisionTransformer(vit_config_from_train(config))
    return sum(param.numel() for param in backbone.parameters())


def head_cost(config: TrainConfig, batch_size: int | None = None) -> HeadCost:
    """Parameters, FLOPs and memory of the heads that ``config`` trains, and of its backbone (see :class:`HeadCost`).

    ``batch_size`` (default ``train.batch_size_per_device``) is the per-process batch the expected masked-patch count
    and the stochastic-depth subsets of the backbone are taken for; the results are per image.
    """
    batch_size = int(batch_size or config.train.batch_size_per_device)
    vit = vit_config_from_train(config)
    with torch.device("meta"):
        dino = build_head(config, vit.embed_dim)
        ibot = build_head(config, vit.embed_dim) if config.heads.separate_ibot_head else None
    num_patches = (config.crops.global_size // vit.patch_size) ** 2
    masked = expected_masked_patches(config.masking, 2 * batch_size, num_patches) / batch_size
    step = franca_step_flops(config, batch_size)
    return HeadCost(
        arch=config.model.arch,
        mode=config.heads.mode,
        separate_ibot_head=ibot is not None,
        batch_size=batch_size,
        dino=measure_head(dino),
        ibot=measure_head(ibot) if ibot is not None else None,
        cls_tokens=float(2 + config.crops.n_local),
        teacher_cls_tokens=2.0,
        masked_patches=masked,
        backbone_params=_backbone_params(config),
        backbone_flops=(step["teacher_backbone"] + step["student_backbone"]) / batch_size,
    )


#: The paper's model sizes as training presets (label -> preset, overrides): its heads (five levels, 131072 prototypes
#: at the widest, 2048 hidden, 384 bottleneck) and crops (2 x 224 + 8 x 98 px).
PAPER_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ViT-S": ("vitb14_in21k", ("model.arch=vit_small",)),
    "ViT-B": ("vitb14_in21k", ()),
    "ViT-L": ("vitl14_laion", ()),
    "ViT-g": ("vitg14_laion", ()),
}


def paper_head_cost(label: str, mode: str) -> HeadCost:
    """:func:`head_cost` of one of :data:`PAPER_MODELS` trained with ``heads.mode=mode``."""
    preset, overrides = PAPER_MODELS[label]
    return head_cost(load_config(preset, [*overrides, "data.path=unused", f"heads.mode={mode}"]))
