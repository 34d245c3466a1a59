"""Backbones in the formats people already use: ONNX, timm, Hugging Face transformers and franca's safetensors.

:func:`export_backbone` (``franca export``) writes

- ``onnx``: ``forward_features`` as an ONNX graph with dynamic batch, height and width
  (:mod:`franca.models.formats.onnx_graph`), run by onnxruntime through :class:`OnnxBackbone`;
- ``timm``: a safetensors state dict that ``timm.create_model(name, **kwargs)`` loads (the name and keywords are in
  its metadata and in :attr:`Export.details`; :mod:`franca.models.formats.timm_vit`);
- ``hf``: a folder (``config.json`` + ``model.safetensors``) that ``transformers.AutoModel.from_pretrained`` loads
  as ``Dinov2Model`` or ``Dinov2WithRegistersModel`` (:mod:`franca.models.formats.transformers_dinov2`);
- ``safetensors``: franca's own export (:func:`franca.models.checkpoints.save_backbone`).

The other way, :func:`franca.models.checkpoints.load_backbone` reads timm and transformers files and folders
(:func:`franca.models.formats.to_official_layout`).

timm and transformers resize positions otherwise than the official code (see :mod:`franca.models.formats.positions`).
A backbone whose config resizes as the target does is exported with its own grid and gives franca's features at
every input size; any other is exported with franca's positions for one input size (``img_size``, default the
model's grid), where the features are franca's exactly (other sizes are resized by the library's own rule). Each
export is written atomically and logs what it wrote.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from franca.core.errors import ConfigError
from franca.core.io import atomic_target, atomic_write_text
from franca.models.checkpoints import FORMAT_KEY, save_backbone
from franca.models.formats import timm_vit, transformers_dinov2
from franca.models.formats.onnx_graph import ONNX_OPSET, OnnxBackbone, export_onnx
from franca.models.formats.positions import Size, image_size, positions_at, resizes_like
from franca.models.vision_transformer import DinoVisionTransformer

__all__ = [
    "FORMATS",
    "ONNX_OPSET",
    "Export",
    "OnnxBackbone",
    "export_backbone",
    "export_onnx",
    "export_timm",
    "export_transformers",
]

logger = logging.getLogger(__name__)
FORMATS = ("onnx", "timm", "hf", "safetensors")


@dataclass(frozen=True)
class Export:
    """What an export wrote: the ``format``, the file or folder ``path``, the input size (height, width) at which
    the target library gives franca's features exactly (``None``: every size) and the format's ``details``
    (timm: ``model`` and ``kwargs``; hf: ``architecture``; onnx: ``opset`` and ``outputs``)."""

    format: str
    path: Path
    exact_size: Size | None = None
    details: dict[str, Any] = field(default_factory=dict)


def export_backbone(
    model: DinoVisionTransformer,
    out: str | os.PathLike,
    format: str,
    img_size: int | Size | None = None,
    opset: int = ONNX_OPSET,
) -> Export:
    """Write ``model`` to ``out`` in ``format`` (one of :data:`FORMATS`); ``img_size`` (timm, hf) is the input
    size whose positions are stored, ``opset`` the ONNX opset. Returns what was written."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    model = getattr(model, "module", model)
    if img_size is not None and format in ("onnx", "safetensors"):
        raise ConfigError(
            f"img_size applies to the timm and hf formats; {format} exports take every input size as the model does"
        )
    if format == "timm":
        return export_timm(model, out, img_size)
    if format == "hf":
        return export_transformers(model, out, img_size)
    if format == "onnx":
        path = export_onnx(model, out, opset)
        outputs = ["x_norm_clstoken"] + (["x_norm_regtokens"] if model.num_register_tokens else [])
        outputs += ["x_norm_patchtokens"] + (["x_norm_patchtokens_rasa"] if model.rasa is not None else [])
        return Export("onnx", path, None, {"opset": opset, "outputs": outputs})
    return Export("safetensors", save_backbone(model, out), None, {})


def _stored_size(
    model: DinoVisionTransformer, img_size: int | Size | None, offset: float, antialias: bool, target: str
) -> tuple[Size, Size | None]:
    """(the input size whose positions are exported, the size the features are exact at or None for all)."""
    size = image_size(model, img_size)
    if img_size is None and resizes_like(model.config, offset, antialias):
        return size, None
    if img_size is None:
        logger.warning(
            "%s resizes positions otherwise than this model (interpolate_offset=%s, interpolate_antialias=%s): the "
            "export gives franca's features exactly at %dx%d px only; pass img_size for another input size",
            target,
            model.config.interpolate_offset,
            model.config.interpolate_antialias,
            *size,
        )
    return size, size


def _warn_rasa(model: DinoVisionTransformer, target: str) -> None:
    if model.rasa is not None:
        logger.warning(
            "%s has no place for the RASA projection: it is not exported (use onnx or safetensors)", target
        )


def export_timm(
    model: DinoVisionTransformer, path: str | os.PathLike, img_size: int | Size | None = None
) -> Export:
    """Write a safetensors state dict for ``timm.create_model(name, **kwargs)`` (see :attr:`Export.details`)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: timm exports are safetensors files; use a .safetensors name")
    _warn_rasa(model, "timm")
    size, exact = _stored_size(model, img_size, **_resize(timm_vit.TIMM_RESIZE), target="timm")
    name, kwargs = timm_vit.timm_model_args(model.config, size)
    state = timm_vit.to_timm(model, positions_at(model, size), kwargs)
    metadata = {FORMAT_KEY: "timm", "timm_model": name, "timm_kwargs": json.dumps(kwargs)}
    if size[0] == size[1]:  # what franca reads back (it keeps square grids only)
        bias = kwargs["proj_bias"]
        stored = replace(model.config, img_size=size[0], proj_bias=bias, ffn_bias=bias)
        metadata["config"] = json.dumps(stored.to_dict())
    with atomic_target(path, sum(t.numel() * t.element_size() for t in state.values())) as tmp:
        save_file({key: value.contiguous() for key, value in state.items()}, str(tmp), metadata=metadata)
    logger.info("wrote %s: timm.create_model(%r, **kwargs) loads it", path, name)
    return Export("timm", path, exact, {"model": name, "kwargs": kwargs})


def export_transformers(
    model: DinoVisionTransformer, folder: str | os.PathLike, img_size: int | Size | None = None
) -> Export:
    """Write a transformers model folder (``config.json`` + ``model.safetensors``) that ``AutoModel`` loads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.suffix in (".safetensors", ".onnx", ".pth", ".pt") or folder.is_file():
        raise ConfigError(f"{folder}: hf exports are folders; give a folder name (created if missing)")
    _warn_rasa(model, "transformers")
    architecture = transformers_dinov2.model_class(model.config)
    resize = _resize(transformers_dinov2.RESIZE[architecture])
    size, exact = _stored_size(model, img_size, **resize, target=f"transformers' {architecture}")
    if size[0] != size[1]:
        raise ConfigError(
            f"transformers keeps square position grids; choose a square img_size, not {size[0]}x{size[1]}"
        )
    config = transformers_dinov2.hf_config(model.config, size[0], architecture)
    state = transformers_dinov2.to_transformers(model, positions_at(model, size))
    stored = replace(
        model.config,
        img_size=size[0],
        proj_bias=True,
        ffn_bias=True,
        layerscale_init=model.config.layerscale_init or 1.0,
    )
    metadata = {"format": "pt", FORMAT_KEY: "hf", "config": json.dumps(stored.to_dict())}
    weights = folder / transformers_dinov2.WEIGHTS_FILES[0]
    with atomic_target(weights, sum(t.numel() * t.element_size() for t in state.values())) as tmp:
        save_file({key: value.contiguous() for key, value in state.items()}, str(tmp), metadata=metadata)
    atomic_write_text(folder / transformers_dinov2.CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    logger.info("wrote %s: transformers.AutoModel.from_pretrained loads it as %s", folder, architecture)
    return Export("hf", folder, exact, {"architecture": architecture, "config": config})


def _resize(options: Mapping[str, Any]) -> dict[str, Any]:
    return {"offset": options["interpolate_offset"], "antialias": options["interpolate_antialias"]}
