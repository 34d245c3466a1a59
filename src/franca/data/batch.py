"""The batch the pre-training step consumes: the collated multi-crop views and their CyclicMask masks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class TrainBatch:
    """One collated multi-crop batch (B images per process).

    ``global_crops`` [2B, 3, G, G] view-major (all first views, then all second views); ``local_crops``
    [n_local*B, 3, L, L] crop-major; ``masks`` [2B, N] bool; ``masked_indices`` [M] into the flattened [2B*N] patch
    grid; ``masked_weights`` [M] = 1 / #masked patches of the same crop; ``num_skipped`` unreadable samples dropped.
    """

    global_crops: Tensor
    local_crops: Tensor | None
    masks: Tensor
    masked_indices: Tensor
    masked_weights: Tensor
    batch_size: int
    num_skipped: int = 0
    positions: list[int] = field(default_factory=list)

    def to(self, device: torch.device, non_blocking: bool = True) -> TrainBatch:
        def move(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=non_blocking)

        return TrainBatch(
            move(self.global_crops),
            move(self.local_crops),
            move(self.masks),
            move(self.masked_indices),
            move(self.masked_weights),
            self.batch_size,
            self.num_skipped,
            self.positions,
        )
