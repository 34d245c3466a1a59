"""Conversions between franca's (the official) tensor layout and the layouts of timm, Hugging Face transformers and
ONNX; :mod:`franca.models.export` writes them and :func:`to_official_layout` reads the first two back.

:func:`franca.models.checkpoints.load_backbone` calls :func:`to_official_layout` on every state dict, so every loader
of franca (``load_backbone``, ``create_model(pretrained=<path>)``, the commands' ``--checkpoint``) reads timm state
dicts and transformers model folders or state dicts, with the architecture inferred from the tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from franca.core.errors import CheckpointError
from franca.models.formats import timm_vit, transformers_dinov2

FORMAT_KEY = "franca_format"  # the safetensors metadata entry that names the layout of a franca export
StateDict = dict[str, Tensor]


def to_official_layout(
    state: Mapping[str, Tensor], metadata: Mapping[str, str], where: str
) -> tuple[StateDict, dict[str, Any]]:
    """The backbone tensors of a timm or transformers model in the official layout, and the options its source
    implies (its position resize; transformers: its head count from ``config.json``). Other layouts come back
    unchanged with no options."""
    config_text = metadata.get(transformers_dinov2.CONFIG_METADATA)
    if metadata.get(FORMAT_KEY) == "hf" or config_text or transformers_dinov2.is_transformers_layout(state):
        options = transformers_dinov2.implied_options(state, config_text, where)
        return transformers_dinov2.from_transformers(state), options
    if metadata.get(FORMAT_KEY) == "timm" and not metadata.get("config"):  # exported for a rectangular input
        raise CheckpointError(
            f"{where}: a timm export whose positions are stored for one rectangular input; franca reads square "
            "position grids only: load the checkpoint it was exported from"
        )
    if metadata.get(FORMAT_KEY) == "timm" or timm_vit.is_timm_layout(state):
        return timm_vit.from_timm(state), dict(timm_vit.TIMM_RESIZE)
    return dict(state), {}
