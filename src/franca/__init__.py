"""Franca: nested Matryoshka clustering for scalable visual representation learning.

The public entry points are imported lazily so that ``import franca`` stays cheap:

- :func:`franca.load_backbone` / :func:`franca.save_backbone`: official Franca and DINOv2 checkpoints and our exports;
- :func:`franca.load_heads`: the DINO and iBOT Matryoshka heads of an official checkpoint;
- :func:`franca.export_backbone`: a backbone as ONNX, timm, Hugging Face transformers or safetensors files;
- :func:`franca.create_model` / :func:`franca.list_models` / :func:`franca.model_info`: the model registry, names such
  as ``franca_vitb14.in21k`` or ``dinov2_vitl14_reg.lvd142m`` with their weights' metadata (franca.models.registry);
- :func:`franca.build_model` and the presets ``vit_tiny`` ... ``vit_giant2``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_backbone": "franca.models.checkpoints",
    "save_backbone": "franca.models.checkpoints",
    "read_state_dict": "franca.models.checkpoints",
    "load_heads": "franca.models.heads",
    "export_backbone": "franca.models.export",
    "create_model": "franca.models.registry",
    "list_models": "franca.models.registry",
    "model_info": "franca.models.registry",
    "build_model": "franca.models.vision_transformer",
    "DinoVisionTransformer": "franca.models.vision_transformer",
    "vit_tiny": "franca.models.vision_transformer",
    "vit_small": "franca.models.vision_transformer",
    "vit_base": "franca.models.vision_transformer",
    "vit_large": "franca.models.vision_transformer",
    "vit_giant2": "franca.models.vision_transformer",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'franca' has no attribute {name!r}")
