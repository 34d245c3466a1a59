"""The model registry: every backbone franca can build, by name, with its weights' metadata in one place.

Names follow timm's ``<architecture>.<weights tag>``: ``franca_vitb14.in21k``, ``franca_vitl14.laion600m``,
``dinov2_vitb14_reg.lvd142m``; the plain presets (``vit_tiny`` ... ``vit_giant2``, patch 14) have no tag and no
weights. An architecture name without its tag (``franca_vitb14``) means its first (default) weights, as in timm.

- :func:`create_model` builds a registered backbone: randomly initialised (``pretrained=False``), with its released
  weights (``pretrained=True``: downloaded once into torch.hub's cache by :func:`download_weights`), or with
  a local file or state dict (``pretrained=<path>``), always loaded by :func:`franca.load_backbone`, which checks the
  file against the architecture the entry states;
- :func:`list_models` lists the names (fnmatch pattern, with or without weights);
- :func:`model_info` returns a name's :class:`ModelInfo`: architecture, download location and cache file name, the
  resolution the weights were trained at (their position grid), the input normalisation, dataset, license and notes.

Unknown names raise :class:`~franca.core.errors.ConfigError` with the closest registered names; the two broken
v1.0.0 Franca files (and combinations never released) are refused with a pointer to a working choice.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from franca.core.constants import IMAGENET_MEAN, IMAGENET_STD
from franca.core.errors import CheckpointError, ConfigError
from franca.models.checkpoints import load_backbone
from franca.models.vision_transformer import ARCHITECTURES, DinoVisionTransformer, ViTConfig

__all__ = [
    "DINOV2_URL",
    "FRANCA_RELEASE_URL",
    "REFUSED",
    "ModelInfo",
    "create_model",
    "download_weights",
    "list_models",
    "model_info",
]

FRANCA_RELEASE_URL = "https://github.com/valeoai/Franca/releases/download"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"
FRANCA_LICENSE = "Franca model license (Research-Only RAIL, LICENSE_MODEL of github.com/valeoai/Franca)"
DINOV2_LICENSE = "Apache-2.0 (github.com/facebookresearch/dinov2)"
FRANCA_PAPER = "arXiv 2507.14137 (Franca, CVPR 2026)"
DINOV2_PAPER = "arXiv 2304.07193 (DINOv2); registers: arXiv 2309.16588"

# Fields passed to load_backbone with a checkpoint: every one is either checked against the tensors (width, depth,
# patch, FFN, registers) or something tensors cannot tell (heads, run-time interpolation, LayerScale init). The image
# size is not: the file's own position grid is kept unless the caller asks for another (then it is resampled).
_NOT_PASSED_TO_LOADER = ("img_size",)


@dataclass(frozen=True)
class ModelInfo:
    """One registered backbone and, when it has them, its released weights (timm's ``PretrainedCfg``).

    ``config`` holds the :class:`~franca.models.vision_transformer.ViTConfig` fields of the architecture (width,
    depth, heads, patch, FFN, registers, the position grid ``img_size`` and any non-default interpolation or
    LayerScale setting); ``input_size`` is the resolution the weights were trained at last (the grid they store).
    ``urls`` is one URL, or the parts of a tar.gz archive that are joined and unpacked (ViT-g); ``file_name`` is the
    file's name in torch.hub's cache. ``rasa_url``/``rasa_file_name`` locate the released RASA head, if any.
    """

    name: str
    preset: str  # the franca.models preset (vit_tiny ... vit_giant2) the network is built from
    config: Mapping[str, Any]
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"  # the resize of the inference preprocessing (shorter side to size*256/224)
    urls: tuple[str, ...] = ()
    file_name: str | None = None
    rasa_url: str | None = None
    rasa_file_name: str | None = None
    dataset: str | None = None
    license: str | None = None
    paper: str | None = None
    notes: str = ""

    @property
    def architecture(self) -> str:
        """The name without its weights tag (``franca_vitb14`` for ``franca_vitb14.in21k``)."""
        return self.name.partition(".")[0]

    @property
    def tag(self) -> str:
        """The weights tag (``in21k``), or '' for an architecture without weights."""
        return self.name.partition(".")[2]

    @property
    def has_weights(self) -> bool:
        return bool(self.urls)

    def vit_config(self, **overrides: Any) -> ViTConfig:
        """The :class:`ViTConfig` this entry builds, with ``overrides`` applied."""
        return ViTConfig(**{**self.config, **overrides})


_REGISTRY: dict[str, ModelInfo] = {}
_DEFAULT_TAG: dict[str, str] = {}  # architecture -> its first registered weights

#: Names that look plausible but are refused, with the reason and a working choice (official release notes).
REFUSED: dict[str, str] = {
    "franca_vitb14.laion600m": "Franca ViT-B/14 was not trained on LAION; use 'franca_vitb14.in21k' "
    "(torch.hub: weights='IN21K')",
    "franca_vitl14.in21k": "the v1.0.0 ViT-L/14 In21K file is the DINOv2-L baseline (official release notes); "
    "use 'franca_vitl14.laion600m' for Franca-L or 'franca_vitl14.dinov2_in21k' for the baseline "
    "(torch.hub: weights='LAION' or weights='Dinov2_In21K')",
    "franca_vitg14.in21k": "the v1.0.0 ViT-g/14 In21K release is incomplete (official release notes); "
    "use 'franca_vitg14.laion600m' (torch.hub: weights='LAION')",
    "franca_vitg14.dinov2_in21k": "no DINOv2 ViT-g/14 In21K baseline was released; use 'franca_vitg14.laion600m' "
    "(torch.hub: weights='LAION')",
}


def _register(name: str, preset: str, input_size: int, **arch: Any) -> ModelInfo:
    """Add an entry; ``arch`` holds the ViTConfig fields that differ from the preset and ModelInfo's other fields."""
    info_fields = {f.name for f in fields(ModelInfo)}
    extra = {key: arch.pop(key) for key in list(arch) if key in info_fields}
    config = {
        **ARCHITECTURES[preset],
        "patch_size": 14,
        "ffn_layer": "swiglu",
        "num_register_tokens": 0,
        **arch,
        "img_size": input_size,
    }
    ViTConfig(**config)  # a typo in a field name fails at import
    if name in _REGISTRY or name in REFUSED:
        raise ValueError(f"model {name!r} is registered twice")
    info = ModelInfo(
        name=name, preset=preset, config=MappingProxyType(config), input_size=input_size, **extra
    )
    _REGISTRY[name] = info
    if info.tag:
        _DEFAULT_TAG.setdefault(info.architecture, info.tag)
    return info


def _franca(release: str, stem: str) -> tuple[str, ...]:
    return (f"{FRANCA_RELEASE_URL}/{release}/{stem}.pth",)


# --------------------------------------------------------------------------- plain architectures (no weights)
for _preset in ARCHITECTURES:
    _register(
        _preset,
        _preset,
        224,
        notes="random initialisation only (patch 14, SwiGLU FFN as Franca); vit_tiny is franca's own (tests, CPU demo)",
    )

# --------------------------------------------------------------------------- Franca (github.com/valeoai/Franca)
_register(
    "franca_vitb14.in21k",
    "vit_base",
    518,
    urls=_franca("v1.0.0", "franca_vitb14_In21K"),
    file_name="franca_vitb14_In21K.pth",
    rasa_url=f"{FRANCA_RELEASE_URL}/v1.0.0/franca_vitb14_In21K_rasa.pth",
    rasa_file_name="franca_vitb14_In21K_rasa.pth",
    dataset="ImageNet-21K",
    license=FRANCA_LICENSE,
    paper=FRANCA_PAPER,
    notes="Franca-B, pretrained at 224 px then high-resolution fine-tuned: the file has a 518-px (37x37) grid",
)
_register(
    "franca_vitb14.dinov2_in21k",
    "vit_base",
    224,
    urls=_franca("v1.1.0", "franca_vitb14_Dinov2_In21K"),
    file_name="franca_vitb14_Dinov2_In21K.pth",
    dataset="ImageNet-21K",
    license=FRANCA_LICENSE,
    paper=FRANCA_PAPER,
    notes="the DINOv2-B baseline the Franca authors trained on ImageNet-21K (no distillation); published with "
    "release v1.1.0 (missing from v1.0.0), no RASA head",
)
_register(
    "franca_vitl14.laion600m",
    "vit_large",
    518,
    urls=_franca("v1.0.0", "franca_vitl14_Laion600M"),
    file_name="franca_vitl14_Laion600M.pth",
    rasa_url=f"{FRANCA_RELEASE_URL}/v1.0.0/franca_vitl14_Laion600M_rasa.pth",
    rasa_file_name="franca_vitl14_Laion600M_rasa.pth",
    dataset="LAION-600M (LAION-COCO)",
    license=FRANCA_LICENSE,
    paper=FRANCA_PAPER,
    notes="Franca-L; the v1.0.0 file has a 518-px (37x37) grid (the official README first listed 224 px)",
)
_register(
    "franca_vitl14.dinov2_in21k",
    "vit_large",
    224,
    urls=_franca("v1.1.0", "franca_vitl14_Dinov2_In21K"),
    file_name="franca_vitl14_Dinov2_In21K.pth",
    dataset="ImageNet-21K",
    license=FRANCA_LICENSE,
    paper=FRANCA_PAPER,
    notes="the DINOv2-L baseline the Franca authors trained on ImageNet-21K (no distillation); published with "
    "release v1.1.0 (missing from v1.0.0), no RASA head",
)
_register(
    "franca_vitg14.laion600m",
    "vit_giant2",
    224,
    urls=tuple(
        f"{FRANCA_RELEASE_URL}/v1.0.0/franca_vitg14_Laion600M_chunked.tar.gz.part_{part}"
        for part in ("aa", "ab", "ac")
    ),
    file_name="franca_vitg14_Laion600M.pth",
    rasa_url=f"{FRANCA_RELEASE_URL}/v1.0.0/franca_vitg14_Laion600M_rasa.pth",
    rasa_file_name="franca_vitg14_Laion600M_rasa.pth",
    dataset="LAION-600M (LAION-COCO)",
    license=FRANCA_LICENSE,
    paper=FRANCA_PAPER,
    notes="Franca-g, no high-resolution fine-tuning (224-px grid); shipped as three tar.gz parts, joined and unpacked",
)

# ------------------------------------------------------------------ DINOv2 (github.com/facebookresearch/dinov2)
for _short, _preset in (("s", "vit_small"), ("b", "vit_base"), ("l", "vit_large"), ("g", "vit_giant2")):
    _stem = f"dinov2_vit{_short}14"
    for _registers in (0, 4):
        _file = f"{_stem}{'_reg4' if _registers else ''}_pretrain.pth"
        _register(
            f"{_stem}{'_reg' if _registers else ''}.lvd142m",
            _preset,
            518,
            ffn_layer="swiglu" if _short == "g" else "mlp",
            num_register_tokens=_registers,
            layerscale_init=1.0,
            # the register models interpolate positions with antialias and an explicit size (no 0.1 offset)
            **({"interpolate_offset": 0.0, "interpolate_antialias": True} if _registers else {}),
            urls=(f"{DINOV2_URL}/{_stem}/{_file}",),
            file_name=_file,
            dataset="LVD-142M",
            license=DINOV2_LICENSE,
            paper=DINOV2_PAPER,
            notes=("ViT-g trained directly" if _short == "g" else "distilled from DINOv2 ViT-g")
            + (", 4 registers" if _registers else "")
            + "; the file has a 518-px (37x37) grid",
        )


def _suggestions(name: str) -> str:
    candidates = [*_REGISTRY, *_DEFAULT_TAG]
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    if not close:  # a wrong tag on a known architecture: offer that architecture's names
        close = [n for n in _REGISTRY if n.partition(".")[0] == name.partition(".")[0]][:3]
    return ("did you mean " + " or ".join(f"'{c}'" for c in close) + "? ") if close else ""


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered name (an architecture alone means its default weights).

    Raises :class:`ConfigError` (one line) for a refused or unknown name, naming the closest registered ones.
    """
    key = str(name).strip().lower()
    key = f"{key}.{_DEFAULT_TAG[key]}" if key in _DEFAULT_TAG and key not in _REGISTRY else key
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key in REFUSED:
        raise ConfigError(f"model '{name}' is not available: {REFUSED[key]}")
    raise ConfigError(f"unknown model '{name}' ({_suggestions(key)}franca.list_models() lists them all)")


def list_models(pattern: str = "*", pretrained: bool | None = None) -> list[str]:
    """Registered names matching the fnmatch ``pattern`` (case-insensitive), sorted.

    ``pretrained=True`` keeps the names with released weights, ``False`` those without, ``None`` all of them.
    """
    pattern = pattern.lower()
    return sorted(
        name
        for name, info in _REGISTRY.items()
        if fnmatch.fnmatchcase(name, pattern) and (pretrained is None or info.has_weights == bool(pretrained))
    )


def _check_overrides(info: ModelInfo, overrides: Mapping[str, Any]) -> None:
    known = [f.name for f in fields(ViTConfig)]
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown backbone option '{key}' for model '{info.name}' ({hint}valid: {', '.join(sorted(known))})"
            )


def _cache_dir() -> Path:
    path = Path(torch.hub.get_dir()) / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


def download_weights(info: ModelInfo | str, rasa: bool = False, progress: bool = True) -> Path:
    """Download a registered model's weights (or its RASA head) into torch.hub's cache, once; return the local path.

    The file keeps its release name in ``<torch.hub.get_dir()>/checkpoints`` (where torch.hub's own loaders put the
    same files), is written under a ``.partial`` name and renamed when complete; multi-part archives (ViT-g) are
    joined and unpacked in a temporary folder there, and only the unpacked ``.pth`` is moved into place.
    """
    info = model_info(info) if isinstance(info, str) else info
    if rasa:
        urls, name = ((info.rasa_url,) if info.rasa_url else ()), info.rasa_file_name
    else:
        urls, name = info.urls, info.file_name
    if not urls or name is None:
        what = "RASA head" if rasa else "weights"
        raise ConfigError(f"no {what} were released for '{info.name}'; pass a local file instead")
    target = _cache_dir() / name
    if target.exists():
        return target
    if len(urls) > 1:  # the parts of one tar.gz archive
        with tempfile.TemporaryDirectory(dir=_cache_dir()) as tmp:
            archive = Path(tmp) / f"{Path(name).stem}.tar.gz"
            with open(archive, "wb") as joined:
                for url in urls:
                    part_path = Path(tmp) / url.rsplit("/", 1)[-1]
                    torch.hub.download_url_to_file(url, str(part_path), progress=progress)
                    joined.write(part_path.read_bytes())
                    part_path.unlink()
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith((".pth", ".pt"))]
                if not members:
                    raise CheckpointError(
                        f"{archive}: the downloaded archive of '{info.name}' holds no .pth file"
                    )
                tar.extractall(tmp, members=members[:1], filter="data")
                os.replace(Path(tmp) / members[0].name, target)
        return target
    tmp_target = target.with_name(target.name + ".partial")
    torch.hub.download_url_to_file(urls[0], str(tmp_target), progress=progress)
    os.replace(tmp_target, target)
    return target


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike | Mapping[str, Any] = False,
    *,
    rasa: str | os.PathLike | Mapping[str, Any] | Tensor | bool | None = None,
    progress: bool = True,
    **overrides: Any,
) -> DinoVisionTransformer:
    """Build the backbone registered as ``name`` (see :func:`list_models`).

    ``pretrained``: ``False`` gives a random initialisation of the entry's architecture (at its ``input_size``
    grid); ``True`` its released weights, downloaded once into torch.hub's cache (``progress`` shows a bar); a path
    (``.pth``/``.pt``/``.safetensors``, or a sharded training folder) or a state dict loads that file instead.
    Weights always go through :func:`franca.load_backbone`, which refuses a file whose width, depth, patch, FFN or
    registers differ from the entry (or from ``overrides``) with one line. ``overrides`` are
    :class:`~franca.models.vision_transformer.ViTConfig` fields (``img_size=224`` resamples a file's position
    embedding, ``drop_path_rate=0.1``, ...). ``rasa`` attaches a RASA head: ``True`` downloads the released head
    (with ``pretrained=True``) or uses the ``rasa_head.*`` tensors of a local file; a head file, state dict or folded
    [D, D] matrix is attached as given. Returns a model in eval mode when weights were loaded.
    """
    info = model_info(name)
    _check_overrides(info, overrides)
    if pretrained is False or pretrained is None:
        if rasa is not None and rasa is not False:
            raise ConfigError(
                f"rasa needs weights: pass pretrained=True or a checkpoint to create '{info.name}'"
            )
        return DinoVisionTransformer(info.vit_config(**overrides))
    if pretrained is True:
        if not info.has_weights:
            with_weights = [n for n in list_models(pretrained=True) if _REGISTRY[n].preset == info.preset]
            hint = f" (e.g. {', '.join(repr(n) for n in with_weights[:3])})" if with_weights else ""
            raise ConfigError(
                f"model '{info.name}' has no released weights; pass pretrained=<file>, or choose a name from "
                f"franca.list_models(pretrained=True){hint}"
            )
        if rasa is True and not info.rasa_url:  # before a download that would be wasted
            raise ConfigError(
                f"no RASA head was released for '{info.name}'; pass rasa=<head file> or rasa=None"
            )
        source: Any = download_weights(info, progress=progress)
        if rasa is True:
            rasa = download_weights(info, rasa=True, progress=progress)
    else:
        source = pretrained
    stated = {key: value for key, value in info.config.items() if key not in _NOT_PASSED_TO_LOADER}
    return load_backbone(source, rasa=rasa, **{**stated, **overrides})
