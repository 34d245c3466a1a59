"""Backbones (DINOv2-style ViTs) and the Franca projection heads."""

from franca.models.heads import (
    MATRYOSHKA_MODES,
    DINOHead,
    MatryoshkaHead,
    default_matryoshka_levels,
    head_from_state_dict,
    heads_state_dict_official,
    load_heads,
    matryoshka_prototype_counts,
)
from franca.models.vision_transformer import (
    ARCHITECTURES,
    DinoVisionTransformer,
    ViTConfig,
    build_model,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ARCHITECTURES",
    "DINOHead",
    "MATRYOSHKA_MODES",
    "MatryoshkaHead",
    "default_matryoshka_levels",
    "head_from_state_dict",
    "heads_state_dict_official",
    "load_heads",
    "matryoshka_prototype_counts",
    "DinoVisionTransformer",
    "ViTConfig",
    "build_model",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
