"""The torch.hub entry points (``franca_vitb14``, ``franca_vitl14``, ``franca_vitg14``) over the model registry.

The entry points are thin names over the model registry (:mod:`franca.models.registry`), where every file's URL, cache
name and architecture is recorded and :func:`download_weights` fetches them: ``franca_vitb14(weights="IN21K")`` is
``franca.create_model("franca_vitb14.in21k", pretrained=True)``. The ``weights=`` values are those of the official
repository (``IN21K``, ``LAION``, ``Dinov2_In21K``, case and the README's spellings such as ``Dinov2_In21k`` or
``LAION600m`` accepted). Files are downloaded only when a model is asked for with ``pretrained=True`` and no local file;
a local ``.pth``/``.safetensors`` path can be given as ``weights=`` or ``checkpoint=`` instead (it must hold the entry
point's architecture).

Release caveats (official release notes, recorded in the registry): the v1.0.0 "Franca ViT-L/14 In21K" file is
identical to the DINOv2-L baseline and the ViT-g In21K file is incomplete, so both are refused with a pointer to a
working choice; ViT-g LAION is shipped as three tar.gz parts; the DINOv2 baselines come from release v1.1.0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from franca.core.errors import ConfigError
from franca.models.registry import create_model, download_weights, model_info
from franca.models.vision_transformer import DinoVisionTransformer

__all__ = [
    "WEIGHTS",
    "download_release",
    "download_weights",
    "franca_vitb14",
    "franca_vitg14",
    "franca_vitl14",
    "registry_name",
    "release_file_name",
]

#: ``weights=`` of the entry points (lower case) -> the registry's weights tag
WEIGHTS = {"in21k": "in21k", "laion": "laion600m", "laion600m": "laion600m", "dinov2_in21k": "dinov2_in21k"}


def registry_name(arch: str, weights: Any) -> str:
    """The registry name of an entry point's weights: ``("vitb14", "IN21K")`` -> ``franca_vitb14.in21k``.

    Raises :class:`ConfigError` for unknown ``weights`` and for refused combinations (with a working choice)."""
    key = str(getattr(weights, "name", weights)).strip().lower()
    if key not in WEIGHTS:
        raise ConfigError(
            f"unknown weights {weights!r}; choose 'IN21K', 'LAION' or 'Dinov2_In21K', or a local file"
        )
    name = f"franca_{arch}.{WEIGHTS[key]}"
    model_info(name)  # refused or unknown: one line with a working choice
    return name


def release_file_name(arch: str, weights: str, rasa: bool = False) -> str:
    """The official file name, e.g. ``franca_vitb14_In21K.pth`` or ``franca_vitb14_In21K_rasa.pth``."""
    info = model_info(registry_name(arch, weights))
    name = info.rasa_file_name if rasa else info.file_name
    if name is None:
        raise ConfigError(f"no {'RASA head' if rasa else 'weights'} file was released for '{info.name}'")
    return name


def download_release(arch: str, weights: str, rasa: bool = False, progress: bool = True) -> Path:
    """Download an official Franca file (``arch`` ``vitb14``/``vitl14``/``vitg14``, hub ``weights=``) once."""
    return download_weights(registry_name(arch, weights), rasa=rasa, progress=progress)


def _make(
    arch: str, default_weights: str, pretrained: bool, weights: Any, rasa: Any, **kwargs: Any
) -> DinoVisionTransformer:
    checkpoint = kwargs.pop("checkpoint", None) or kwargs.pop("local_state_dict", None)
    weights = default_weights if weights is None else weights
    if isinstance(weights, (str, os.PathLike)) and Path(weights).suffix in (".pth", ".pt", ".safetensors"):
        checkpoint = weights if checkpoint is None else checkpoint
        weights = default_weights
    name = registry_name(arch, weights)
    source = checkpoint if checkpoint is not None else bool(pretrained)
    return create_model(name, pretrained=source, rasa=rasa, **kwargs)


def franca_vitb14(
    *, pretrained: bool = True, weights: Any = None, rasa: Any = None, **kwargs: Any
) -> DinoVisionTransformer:
    """Franca ViT-B/14 (IN21K, 518-px grid) or the DINOv2-B In21K baseline (``weights='Dinov2_In21K'``)."""
    return _make("vitb14", "IN21K", pretrained, weights, rasa, **kwargs)


def franca_vitl14(
    *, pretrained: bool = True, weights: Any = None, rasa: Any = None, **kwargs: Any
) -> DinoVisionTransformer:
    """Franca ViT-L/14 (LAION-600M) or the DINOv2-L In21K baseline (``weights='Dinov2_In21K'``)."""
    return _make("vitl14", "LAION", pretrained, weights, rasa, **kwargs)


def franca_vitg14(
    *, pretrained: bool = True, weights: Any = None, rasa: Any = None, **kwargs: Any
) -> DinoVisionTransformer:
    """Franca ViT-g/14 (LAION-600M)."""
    return _make("vitg14", "LAION", pretrained, weights, rasa, **kwargs)
