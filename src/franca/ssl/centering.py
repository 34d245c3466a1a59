"""Teacher target probabilities from teacher logits: Sinkhorn-Knopp (default) or an EMA mean centre per level.

Method doc sections 2.5 and 2.6. The official EMA centre keeps one [1, 131072] buffer and breaks with Matryoshka
heads; here it keeps one centre per nesting level. Use one :class:`TeacherTargets` for the DINO head and a
separate one for the iBOT head (their centres are different statistics).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from franca.core import distributed
from franca.core.errors import ConfigError
from franca.ssl.sinkhorn import sinkhorn_knopp

__all__ = ["CENTERING_MODES", "EmaCenter", "TeacherTargets"]

CENTERING_MODES = ("sinkhorn", "centering")


class EmaCenter(nn.Module):
    """One exponential-moving-average mean centre per Matryoshka level.

    ``prototype_counts`` lists K_j per level; the centres are buffers ``center_j`` of shape [1, K_j], initialised
    to zero (so they are saved in the state dict). Targets are ``softmax((t_j - c_j) / temperature)``, and an
    update sets ``c_j <- momentum * c_j + (1 - momentum) * mean_j``, where ``mean_j`` is the mean of the teacher
    logits of level j over the samples of all ranks (one all-reduce for all levels).
    """

    def __init__(self, prototype_counts: Sequence[int], momentum: float = 0.9) -> None:
        super().__init__()
        if len(prototype_counts) == 0 or any(int(k) < 1 for k in prototype_counts):
            raise ConfigError(f"EmaCenter needs at least one level with K >= 1, got {list(prototype_counts)}")
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"centre momentum must be in [0, 1], got {momentum}")
        self.prototype_counts = [int(k) for k in prototype_counts]
        self.momentum = float(momentum)
        for level, count in enumerate(self.prototype_counts):
            self.register_buffer(f"center_{level}", torch.zeros(1, count))

    def extra_repr(self) -> str:
        return f"prototype_counts={self.prototype_counts}, momentum={self.momentum}"

    def centers(self) -> list[Tensor]:
        """The current centres, one [1, K_j] tensor per level."""
        return [getattr(self, f"center_{level}") for level in range(len(self.prototype_counts))]

    def _check(self, teacher_logits: Sequence[Tensor]) -> None:
        counts = [logits.shape[-1] for logits in teacher_logits]
        if counts != self.prototype_counts:
            raise ValueError(
                f"teacher logits have prototype counts {counts}, the centre expects {self.prototype_counts}"
            )

    @torch.no_grad()
    def forward(self, teacher_logits: Sequence[Tensor], temperature: float) -> list[Tensor]:
        """Centred, sharpened teacher probabilities: per level [N, K_j] -> [N, K_j], fp32."""
        self._check(teacher_logits)
        outputs = []
        for logits, center in zip(teacher_logits, self.centers()):
            with torch.autocast(device_type=logits.device.type, enabled=False):
                outputs.append(torch.softmax((logits.float() - center) / temperature, dim=-1))
        return outputs

    @torch.no_grad()
    def update(self, teacher_logits: Sequence[Tensor]) -> None:
        """EMA update of every level's centre from the mean of ``teacher_logits`` [N_local, K_j] over all ranks."""
        self._check(teacher_logits)
        device = self.centers()[0].device
        sums = [logits.float().sum(dim=0) for logits in teacher_logits]
        count = torch.tensor([float(teacher_logits[0].shape[0])], device=device)
        packed = distributed.all_reduce_sum(torch.cat([*sums, count]))
        total_count = packed[-1]
        has_samples = total_count > 0  # a tensor test, so no host synchronisation on GPU
        for center, level_sum in zip(self.centers(), packed[:-1].split(self.prototype_counts)):
            batch_mean = level_sum.unsqueeze(0) / total_count.clamp(min=1.0)
            updated = self.momentum * center + (1.0 - self.momentum) * batch_mean
            center.copy_(torch.where(has_samples, updated, center))


class TeacherTargets(nn.Module):
    """Turns per-level teacher logits into per-level target probabilities.

    ``mode='sinkhorn'`` (the default, and the method's choice) applies :func:`sinkhorn_knopp` per level with
    ``sinkhorn_iterations`` iterations; it needs no state. ``mode='centering'`` uses an :class:`EmaCenter` (then
    ``prototype_counts`` is required): it returns ``softmax((t - c) / temperature)`` with the current centre and,
    when ``update_center`` is true, updates the centre with this batch afterwards (as DINO does).

    Call: ``targets(teacher_logits, temperature, n_samples=None)`` with teacher_logits a list of [N_local, K_j]
    tensors -> list of [N_local, K_j] fp32 probabilities whose rows sum to 1. ``n_samples`` is passed through to
    Sinkhorn-Knopp (see there). All ranks must call it (both modes run collectives).
    """

    def __init__(
        self,
        mode: str = "sinkhorn",
        prototype_counts: Sequence[int] | None = None,
        momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if mode not in CENTERING_MODES:
            raise ConfigError(f"unknown centering mode {mode!r}: use one of {', '.join(CENTERING_MODES)}")
        if sinkhorn_iterations < 1:
            raise ConfigError(f"sinkhorn iterations must be >= 1, got {sinkhorn_iterations}")
        self.mode = mode
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.center: EmaCenter | None = None
        if mode == "centering":
            if prototype_counts is None:
                raise ConfigError("centering mode 'centering' needs the per-level prototype counts")
            self.center = EmaCenter(prototype_counts, momentum)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, sinkhorn_iterations={self.sinkhorn_iterations}"

    @torch.no_grad()
    def forward(
        self,
        teacher_logits: Tensor | Sequence[Tensor],
        temperature: float,
        n_samples: int | Tensor | None = None,
        update_center: bool = True,
    ) -> list[Tensor]:
        """Per-level target probabilities (see the class docstring)."""
        levels = [teacher_logits] if isinstance(teacher_logits, Tensor) else list(teacher_logits)
        if self.center is None:
            return [
                sinkhorn_knopp(logits, temperature, self.sinkhorn_iterations, n_samples=n_samples)
                for logits in levels
            ]
        targets = self.center(levels, temperature)
        if update_center:
            self.center.update(levels)
        return targets
