"""Self-supervised building blocks of Franca: Sinkhorn-Knopp targets, CyclicMask, DINO/iBOT/KoLeo losses, centering.

Each piece is a small module that can be used and tested on its own:

- :func:`sinkhorn_knopp` (``franca.ssl.sinkhorn``): log-domain, distributed Sinkhorn-Knopp teacher targets.
- :class:`CyclicMask`, :func:`build_mask_batch`, :class:`MaskBatch` (``franca.ssl.masking``): inverse block masks
  rolled on the torus, and the per-batch masks, indices and weights of the collate function.
- :class:`DinoLoss`, :class:`IBotPatchLoss`, :func:`koleo_loss`, :class:`LevelLosses` (``franca.ssl.losses``).
- :func:`soft_cross_entropy` (``franca.ssl.cross_entropy``): the losses' cross-entropy over wide logits, without an
  fp32 copy kept for the backward pass.
- :class:`TeacherTargets`, :class:`EmaCenter` (``franca.ssl.centering``): teacher logits -> target probabilities.
"""

from __future__ import annotations

from franca.ssl.centering import CENTERING_MODES, EmaCenter, TeacherTargets
from franca.ssl.cross_entropy import soft_cross_entropy
from franca.ssl.losses import DinoLoss, IBotPatchLoss, LevelLosses, koleo_loss
from franca.ssl.masking import CyclicMask, MaskBatch, build_mask_batch
from franca.ssl.sinkhorn import distributed_logsumexp_over_samples, sinkhorn_knopp

__all__ = [
    "CENTERING_MODES",
    "CyclicMask",
    "DinoLoss",
    "EmaCenter",
    "IBotPatchLoss",
    "LevelLosses",
    "MaskBatch",
    "TeacherTargets",
    "build_mask_batch",
    "distributed_logsumexp_over_samples",
    "koleo_loss",
    "sinkhorn_knopp",
    "soft_cross_entropy",
]
