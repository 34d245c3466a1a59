"""ONNX export of a backbone's ``forward_features`` and an onnxruntime runner that returns the same dict.

The graph takes ``images`` [B, 3, H, W] (float32, ImageNet-normalised) with a dynamic batch, height and width (any
multiple of the patch size) and returns ``x_norm_clstoken`` [B, D], ``x_norm_regtokens`` [B, R, D] (with registers),
``x_norm_patchtokens`` [B, N, D] and ``x_norm_patchtokens_rasa`` [B, N, D] (with a RASA head). The position resize
is part of the graph (:func:`~franca.models.formats.positions.traceable_positions`), so a 518-px and a 224-px input
both give franca's features. It is written by torch's TorchScript-based exporter at opset :data:`ONNX_OPSET`
(native ``LayerNormalization``), checked with ``onnx.checker`` and carries franca's config in its metadata.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.onnx.operators import shape_as_tensor

from franca.core.errors import CheckpointError, ConfigError
from franca.core.io import atomic_target
from franca.models.formats.positions import traceable_positions
from franca.models.vision_transformer import DinoVisionTransformer

logger = logging.getLogger(__name__)

ONNX_OPSET = 17
INPUT_NAME = "images"
CONFIG_KEY = "franca_config"
RASA_INITIALIZER = "rasa_matrix_t"
_CLS, _REG, _PATCH, _RASA = (
    "x_norm_clstoken",
    "x_norm_regtokens",
    "x_norm_patchtokens",
    "x_norm_patchtokens_rasa",
)
_PROTOBUF_LIMIT = 2**31 - 2**26  # bytes of weights past which the graph keeps them in an external .data file


class _Graph(nn.Module):
    """The traceable forward: the model's own layers, positions resized with tensor operations only."""

    def __init__(self, model: DinoVisionTransformer) -> None:
        super().__init__()
        self.model = model
        if (
            model.rasa is not None
        ):  # applied as patch @ M.T; kept transposed so that it stays one named initializer
            self.register_buffer(RASA_INITIALIZER, model.rasa.weight.detach().t().contiguous())

    @property
    def output_names(self) -> list[str]:
        names = [_CLS] + ([_REG] if self.model.num_register_tokens else []) + [_PATCH]
        return names + ([_RASA] if self.model.rasa is not None else [])

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        shape = shape_as_tensor(images)
        rows, cols = shape[2] // model.patch_size, shape[3] // model.patch_size
        tokens = model.patch_embed.proj(images).flatten(2).transpose(1, 2)
        cls = model.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + traceable_positions(model, rows, cols)
        if model.register_tokens is not None:
            registers = model.register_tokens.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        for block in model.blocks:
            tokens = block(tokens)
        normed = model.norm(tokens)
        first_patch = 1 + model.num_register_tokens
        outputs = [normed[:, 0]]
        if model.num_register_tokens:
            outputs.append(normed[:, 1:first_patch])
        outputs.append(normed[:, first_patch:])
        if model.rasa is not None:
            outputs.append(torch.matmul(outputs[-1], getattr(self, RASA_INITIALIZER)))
        return tuple(outputs)


def _dynamic_axes(names: list[str]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    for name in names:
        axes[name] = {0: "batch"} if name in (_CLS, _REG) else {0: "batch", 1: "patches"}
    return axes


def export_onnx(model: DinoVisionTransformer, path: str | os.PathLike, opset: int = ONNX_OPSET) -> Path:
    """Write the backbone (fp32, eval mode, RASA output when a head is attached) as an ONNX graph at ``path``.

    The graph is traced at the model's own grid with a batch of 2, then checked with ``onnx.checker``; weights over
    protobuf's 2 GB limit go to ``<path>.data`` beside it (keep the two together). Both files are written under
    temporary names and renamed into place once complete, so an export over an earlier one never appends to or mixes
    with its data; a ``<path>.data`` left by an earlier export is removed when the new graph holds its weights.
    Needs the ``onnx`` extra (onnx; onnxruntime to run it).
    """
    import onnx

    path = Path(path)
    if path.suffix != ".onnx":
        raise ConfigError(f"{path}: ONNX exports are .onnx files; use a .onnx name")
    model = getattr(model, "module", model)
    graph = _Graph(_float_copy(model)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        proto = _trace(graph, opset, Path(tmp) / "traced")
        _describe(proto, model, opset)
        external = sum(p.numel() * 4 for p in graph.parameters()) > _PROTOBUF_LIMIT
        data_name = f"{path.name}.data"
        written = Path(tmp) / "out" / path.name
        written.parent.mkdir()
        onnx.save_model(
            proto, str(written), save_as_external_data=external, location=data_name if external else None
        )
        del proto
        onnx.checker.check_model(str(written), full_check=True)  # by path: reads the external data beside it
        files = [(written, path)] + (
            [(written.parent / data_name, path.parent / data_name)] if external else []
        )
        with contextlib.ExitStack() as stack:  # both renamed into place once both are staged
            for source, target in files:
                os.replace(source, stack.enter_context(atomic_target(target, source.stat().st_size)))
    stale = path.parent / data_name
    if not external and stale.is_file():  # an earlier, larger export's weights: the new graph holds its own
        stale.unlink()
        logger.info("%s: removed %s, the weights of the export it replaced", path, stale.name)
    return path


def _trace(graph: _Graph, opset: int, folder: Path) -> Any:
    """The ModelProto of ``graph`` traced at the model's own grid with a batch of 2 (in ``folder``, which torch may
    fill with external weight files that ``onnx.load`` reads back)."""
    import onnx

    model = graph.model
    side = model.grid_size * model.patch_size
    example = torch.zeros(2, model.config.in_chans, side, side)
    folder.mkdir()
    traced = folder / "model.onnx"
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(
            graph,
            (example,),
            str(traced),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=graph.output_names,
            dynamic_axes=_dynamic_axes(graph.output_names),
            do_constant_folding=True,
        )
    return onnx.load(str(traced))


def _float_copy(model: DinoVisionTransformer) -> DinoVisionTransformer:
    """The model itself when it is fp32 on the CPU in eval mode, else an fp32 CPU copy (the caller's is untouched)."""
    param = next(model.parameters())
    if param.dtype == torch.float32 and param.device.type == "cpu" and not model.training:
        return model
    return copy.deepcopy(model).float().cpu().eval()


def _describe(proto: Any, model: DinoVisionTransformer, opset: int) -> None:
    """Store franca's config, the producer and the opset in the graph's metadata (read by :class:`OnnxBackbone`)."""
    entries = {
        CONFIG_KEY: json.dumps(model.config.to_dict()),
        "franca_opset": str(opset),
        "franca_outputs": ",".join(output.name for output in proto.graph.output),
    }
    for key, value in entries.items():
        item = proto.metadata_props.add()
        item.key, item.value = key, value
    proto.producer_name = "franca"


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The TorchScript exporter warns that it is deprecated and that traced shapes are constants; neither applies
    (the shapes that vary are read with shape_as_tensor)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        yield


class OnnxBackbone(nn.Module):
    """An exported graph run by onnxruntime, usable where franca expects a backbone for inference.

    ``forward_features(images)`` returns the dict of :meth:`DinoVisionTransformer.forward_features` (without
    ``x_prenorm``), ``forward(images)`` the CLS feature; ``patch_size``, ``embed_dim``, ``num_register_tokens``,
    ``config`` and ``rasa`` (an ``nn.Linear`` holding the RASA matrix, or None) are those of the exported model, so
    :func:`franca.features.forward_tokens` and :func:`~franca.features.extract_features` accept it (one block:
    ``n_blocks=1``). Inputs go to the session as float32 NumPy arrays; outputs come back on the input's device.
    """

    def __init__(
        self, path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None
    ) -> None:
        super().__init__()
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file; give the .onnx file written by franca export")
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            missing = _missing_external_data(path)
            if missing is not None:
                raise CheckpointError(
                    f"{path}: its weights are kept in {missing}, which is missing; move or copy the .onnx file "
                    f"together with the {missing.name} file written beside it"
                ) from None
            reason = " ".join(str(error).split())[:200]
            raise CheckpointError(f"{path}: onnxruntime cannot read it ({reason})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if CONFIG_KEY not in metadata:
            raise CheckpointError(
                f"{path}: not a franca export (no {CONFIG_KEY!r} metadata); export it with franca"
            )
        self.config = json.loads(metadata[CONFIG_KEY])
        self.patch_size = int(self.config["patch_size"])
        self.embed_dim = self.num_features = int(self.config["embed_dim"])
        self.num_register_tokens = int(self.config["num_register_tokens"])
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.rasa = _rasa_from(path) if _RASA in self.output_names else None

    def forward_features(self, images: Tensor, masks: Tensor | None = None) -> dict[str, Tensor | None]:
        """The final-normed tokens of images [B, 3, H, W] (H and W multiples of the patch size)."""
        if masks is not None:
            raise ConfigError("the ONNX graph has no mask input; run the PyTorch backbone for masked inputs")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ConfigError(
                f"input of {height}x{width} px is not a multiple of the patch size {self.patch_size}; resize it"
            )
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        values = self.session.run(self.output_names, {INPUT_NAME: array})
        out: dict[str, Tensor | None] = {
            name: torch.from_numpy(value).to(images.device) for name, value in zip(self.output_names, values)
        }
        if _REG not in out:
            out[_REG] = out[_CLS].new_zeros(out[_CLS].shape[0], 0, self.embed_dim)
        out["masks"] = None
        return out

    def get_intermediate_layers(self, *args: Any, **kwargs: Any) -> tuple:
        raise ConfigError("the ONNX graph gives the last block only; use n_blocks=1 or the PyTorch backbone")

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(images)[_CLS]


def _rasa_from(path: Path) -> nn.Linear:
    """The RASA projection stored in the graph as the initializer :data:`RASA_INITIALIZER` (M transposed)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=False)
    found = next((item for item in proto.graph.initializer if item.name == RASA_INITIALIZER), None)
    if found is None:
        raise CheckpointError(
            f"{path}: has a RASA output but no {RASA_INITIALIZER!r} initializer; export it again"
        )
    if found.data_location == onnx.TensorProto.EXTERNAL:
        onnx.external_data_helper.load_external_data_for_tensor(found, str(path.parent))
    matrix = torch.from_numpy(np.ascontiguousarray(numpy_helper.to_array(found).T))
    layer = nn.Linear(matrix.shape[1], matrix.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(matrix)
    return layer.requires_grad_(False)


def _missing_external_data(path: Path) -> Path | None:
    """The first file that the graph at ``path`` keeps initializer data in and that is not beside it, or None (also
    when the graph itself cannot be parsed)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable graph: onnxruntime's own reason is reported instead
        return None
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = path.parent / ExternalDataInfo(tensor).location
            if not location.is_file():
                return location
    return None
