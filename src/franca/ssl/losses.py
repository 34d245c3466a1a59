"""DINO (CLS), iBOT (masked patch) and KoLeo losses (method doc sections 2.3, 2.4 and 2.7).

The DINO and iBOT losses work on one tensor per Matryoshka level (lists ordered like the head's levels); each
level's cross-entropy is computed on its own and the total is the weighted sum over levels (equal weights by
default, as in the paper). All loss maths runs in fp32 with autocast disabled, so the same code serves CPU fp32
and CUDA bf16 training; the cross-entropies over the prototypes go through
:func:`~franca.ssl.cross_entropy.soft_cross_entropy`, which keeps no fp32 copy of the logits for the backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from franca.ssl.cross_entropy import soft_cross_entropy

__all__ = ["DinoLoss", "IBotPatchLoss", "LevelLosses", "koleo_loss"]


@dataclass
class LevelLosses:
    """A loss summed over Matryoshka levels.

    Attributes:
        total: scalar, sum over levels of weight_j * per_level[j].
        per_level: one scalar per level, unweighted (what training logs for each level).
    """

    total: Tensor
    per_level: list[Tensor]


def _as_levels(value: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """Accept one tensor (a single-level head) or a sequence of per-level tensors."""
    return [value] if isinstance(value, Tensor) else list(value)


def _resolve_weights(level_weights: Sequence[float] | None, n_levels: int) -> list[float]:
    if level_weights is None:
        return [1.0] * n_levels
    if len(level_weights) != n_levels:
        raise ValueError(f"got {len(level_weights)} level weights for {n_levels} Matryoshka levels")
    return [float(weight) for weight in level_weights]


def _weighted_total(per_level: list[Tensor], weights: list[float]) -> Tensor:
    total = per_level[0] * weights[0]
    for value, weight in zip(per_level[1:], weights[1:]):
        total = total + value * weight
    return total


class _LevelLoss(nn.Module):
    """Shared settings of the per-level losses: the student temperature and optional per-level weights."""

    def __init__(
        self,
        student_temperature: float = 0.1,
        level_weights: Sequence[float] | None = None,
        compiled: bool = False,
    ) -> None:
        super().__init__()
        if student_temperature <= 0:
            raise ValueError(f"student temperature must be positive, got {student_temperature}")
        self.student_temperature = student_temperature
        self.level_weights = None if level_weights is None else [float(w) for w in level_weights]
        self.compiled = compiled  # the cross-entropy kernels through torch.compile (train.compile)

    def extra_repr(self) -> str:
        return (
            f"student_temperature={self.student_temperature}, level_weights={self.level_weights}, "
            f"compiled={self.compiled}"
        )

    def _cross_entropy(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Per-row -sum_k t log softmax(s / student_temperature), fp32 ``[R]`` (:func:`soft_cross_entropy`)."""
        return soft_cross_entropy(logits, targets, self.student_temperature, compiled=self.compiled)


class DinoLoss(_LevelLoss):
    """DINO cross-entropy between student CLS logits and teacher target probabilities, per Matryoshka level.

    Inputs, each a list with one tensor per level j (a single tensor is taken as one level):

    - ``student_global``: [2, B, K_j], student logits of the two (masked) global crops, view-major.
    - ``student_local``: [n_local, B, K_j], student logits of the local crops, crop-major; ``None`` or
      n_local = 0 when there are no local crops.
    - ``teacher_probs``: [2, B, K_j], teacher target probabilities of the two unmasked global crops in the
      teacher's own view order (e.g. Sinkhorn-Knopp outputs reshaped to [2, B, K_j]). The loss performs the view
      swap: student global view v is matched with teacher view 1 - v.

    For each level, with CE(s, t) = mean over the batch of -sum_k t_k log softmax(s / student_temperature)_k:

        L_j = [ sum_v CE(student_global[v], teacher[1 - v]) + sum_{l, v} CE(student_local[l], teacher[v]) ]
              / (2 + 2 * n_local)

    which is the official normalisation: the cross-view global term (mean over both views) is scaled by
    ``loss_scales = 2`` and every term is divided by 2*1 global + n_local*2 local terms (18 with 8 local crops).
    Returns a :class:`LevelLosses` with the weighted total and the per-level values.
    """

    def level_loss(
        self, student_global: Tensor, student_local: Tensor | None, teacher_probs: Tensor
    ) -> Tensor:
        """The loss of one level (see the class docstring); a scalar in fp32."""
        if student_global.dim() != 3 or student_global.shape[0] != 2:
            raise ValueError(f"student_global must be [2, B, K], got {tuple(student_global.shape)}")
        if teacher_probs.shape != student_global.shape:
            raise ValueError(
                f"teacher_probs {tuple(teacher_probs.shape)} must match student_global {tuple(student_global.shape)}"
            )
        batch_size, width = student_global.shape[1:]
        teacher = teacher_probs.detach()
        # the two cross-view pairs, summed, of the batch-mean cross-entropy; teacher.flip(0) is the view swap
        loss_sum = self._cross_entropy(
            student_global.reshape(-1, width), teacher.flip(0).reshape(-1, width)
        ).sum()
        n_local = 0
        if student_local is not None and student_local.shape[0] > 0:
            if student_local.dim() != 3 or student_local.shape[1:] != student_global.shape[1:]:
                raise ValueError(
                    f"student_local must be [n_local, B, K] with B, K of student_global, "
                    f"got {tuple(student_local.shape)}"
                )
            n_local = student_local.shape[0]
            # sum_v CE(s_l, t_v) == CE(s_l, sum_v t_v): one cross-entropy per local crop, against both views at once
            both_views = teacher.float().sum(dim=0)
            for crop in student_local:
                loss_sum = loss_sum + self._cross_entropy(crop, both_views).sum()
        return loss_sum / batch_size / (2 + 2 * n_local)

    def forward(
        self,
        student_global: Tensor | Sequence[Tensor],
        student_local: Tensor | Sequence[Tensor] | None,
        teacher_probs: Tensor | Sequence[Tensor],
    ) -> LevelLosses:
        """Per-level DINO losses and their weighted sum (layouts in the class docstring)."""
        student_global_levels = _as_levels(student_global)
        teacher_levels = _as_levels(teacher_probs)
        n_levels = len(student_global_levels)
        local_levels: list[Tensor | None] = (
            [None] * n_levels if student_local is None else list(_as_levels(student_local))
        )
        if not (len(teacher_levels) == len(local_levels) == n_levels) or n_levels == 0:
            raise ValueError(
                f"DinoLoss needs the same non-zero number of levels for student_global ({n_levels}), "
                f"student_local ({len(local_levels)}) and teacher_probs ({len(teacher_levels)})"
            )
        weights = _resolve_weights(self.level_weights, n_levels)
        per_level = [
            self.level_loss(s_global, s_local, teacher)
            for s_global, s_local, teacher in zip(student_global_levels, local_levels, teacher_levels)
        ]
        return LevelLosses(total=_weighted_total(per_level, weights), per_level=per_level)


class IBotPatchLoss(_LevelLoss):
    """iBOT masked-patch cross-entropy, per Matryoshka level.

    Inputs (per-level lists, a single tensor is taken as one level):

    - ``student_logits``: [M, K_j], student iBOT-head logits at the M masked patches of the masked global crops.
    - ``teacher_probs``: [M, K_j], teacher target probabilities at the same patches (unmasked teacher crops).
    - ``masked_weights``: [M], 1 / (number of masked patches of that patch's crop), shared by all levels.
    - ``n_global_crops``: the number of *all* global crops of the rank's batch (2B, masked or not).

    For each level:

        L_j = -sum_m w_m sum_k t[m, k] log softmax(s[m] / student_temperature)_k / n_global_crops

    (the official ``loss_scales = 2`` times ``1 / n_global_crops_per_image = 1/2`` gives a factor 1). With M = 0
    the loss is 0. Returns a :class:`LevelLosses`.
    """

    def level_loss(
        self, student_logits: Tensor, teacher_probs: Tensor, masked_weights: Tensor, n_global_crops: int
    ) -> Tensor:
        """The loss of one level (see the class docstring); a scalar in fp32."""
        if student_logits.dim() != 2 or teacher_probs.shape != student_logits.shape:
            raise ValueError(
                f"student_logits and teacher_probs must both be [M, K], got {tuple(student_logits.shape)} "
                f"and {tuple(teacher_probs.shape)}"
            )
        if masked_weights.shape != student_logits.shape[:1]:
            raise ValueError(
                f"masked_weights must be [M={student_logits.shape[0]}], got {tuple(masked_weights.shape)}"
            )
        per_patch = self._cross_entropy(student_logits, teacher_probs.detach())
        return (per_patch * masked_weights.float()).sum() / n_global_crops

    def forward(
        self,
        student_logits: Tensor | Sequence[Tensor],
        teacher_probs: Tensor | Sequence[Tensor],
        masked_weights: Tensor,
        n_global_crops: int,
    ) -> LevelLosses:
        """Per-level iBOT losses and their weighted sum (layouts in the class docstring)."""
        if n_global_crops < 1:
            raise ValueError(f"n_global_crops must be >= 1, got {n_global_crops}")
        student_levels = _as_levels(student_logits)
        teacher_levels = _as_levels(teacher_probs)
        n_levels = len(student_levels)
        if len(teacher_levels) != n_levels or n_levels == 0:
            raise ValueError(
                f"IBotPatchLoss needs the same non-zero number of levels for student ({n_levels}) "
                f"and teacher ({len(teacher_levels)})"
            )
        weights = _resolve_weights(self.level_weights, n_levels)
        per_level = [
            self.level_loss(student, teacher, masked_weights, n_global_crops)
            for student, teacher in zip(student_levels, teacher_levels)
        ]
        return LevelLosses(total=_weighted_total(per_level, weights), per_level=per_level)


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo entropy regulariser of a batch of features [n, d] -> scalar (fp32).

    The features (the student backbone CLS of one global-crop chunk, full width) are L2-normalised; each one's
    nearest neighbour is the other sample with the largest inner product, and the loss is
    ``-mean_i log(||x_i - x_nn(i)|| + eps)``. Neighbours come from this batch only (no collective), and the method
    sums this loss over the two global-crop chunks separately. Exact duplicates give a distance of 0, hence the
    finite value ``-log(eps)`` and a zero gradient for that pair. A batch with fewer than 2 samples has no
    neighbour: the loss is defined as 0 (still attached to the graph).
    """
    if features.dim() != 2:
        raise ValueError(f"koleo_loss expects features of shape [n, d], got {tuple(features.shape)}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        features = features.float()
        if features.shape[0] < 2:
            return features.sum() * 0.0
        normalized = F.normalize(features, p=2, dim=-1, eps=eps)
        with torch.no_grad():
            similarity = normalized @ normalized.T
            similarity.fill_diagonal_(-torch.inf)
            neighbour = similarity.argmax(dim=1)
        distances = torch.linalg.vector_norm(normalized - normalized[neighbour], dim=-1)
        return -torch.log(distances + eps).mean()
