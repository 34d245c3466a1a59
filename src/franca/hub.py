"""The official release files and the ``torch.hub`` entry points (``franca_vitb14``, ``franca_vitl14``, ``franca_vitg14``).

The names and ``weights=`` values are those of the official repository (``IN21K``, ``LAION``, ``Dinov2_In21K``, case and
the README's spellings such as ``Dinov2_In21k`` or ``LAION600m`` accepted). Files are downloaded only when a model is
asked for with ``pretrained=True`` and no local file; a local ``.pth``/``.safetensors`` path can be given as
``weights=`` or ``checkpoint=`` instead.

Release caveats handled here (official release notes): the v1.0.0 "Franca ViT-L/14 In21K" file is identical to the
DINOv2-L baseline and the ViT-g In21K file is incomplete, so both are refused with a pointer to a working choice;
ViT-g LAION is shipped as three tar.gz parts.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import torch

from franca.core.errors import CheckpointError, ConfigError
from franca.models.checkpoints import load_backbone
from franca.models.vision_transformer import DinoVisionTransformer

RELEASE_URL = "https://github.com/valeoai/Franca/releases/download/v1.0.0"
WEIGHTS = {"in21k": "In21K", "laion": "Laion600M", "laion600m": "Laion600M", "dinov2_in21k": "Dinov2_In21K"}
GIANT_PARTS = ("chunked.tar.gz.part_aa", "chunked.tar.gz.part_ab", "chunked.tar.gz.part_ac")

# (arch, dataset tag) -> why it is not offered
UNAVAILABLE = {
    ("vitb14", "Laion600M"): "Franca ViT-B/14 was not trained on LAION; use weights='IN21K'",
    ("vitl14", "In21K"): "the v1.0.0 ViT-L/14 In21K file is the DINOv2-L baseline (official release notes); "
    "use weights='LAION' for Franca-L or weights='Dinov2_In21K' for the baseline",
    (
        "vitg14",
        "In21K",
    ): "the v1.0.0 ViT-g/14 In21K release is incomplete (official release notes); use weights='LAION'",
    ("vitg14", "Dinov2_In21K"): "no DINOv2 ViT-g/14 In21K baseline was released; use weights='LAION'",
}


def _dataset_tag(weights: str) -> str:
    key = str(getattr(weights, "name", weights)).strip().lower()
    if key not in WEIGHTS:
        raise ConfigError(
            f"unknown weights {weights!r}; choose 'IN21K', 'LAION' or 'Dinov2_In21K', or a local file"
        )
    return WEIGHTS[key]


def release_file_name(arch: str, weights: str, rasa: bool = False) -> str:
    """The official file name, e.g. ``franca_vitb14_In21K.pth`` or ``franca_vitb14_In21K_rasa.pth``."""
    tag = _dataset_tag(weights)
    if (arch, tag) in UNAVAILABLE:
        raise ConfigError(UNAVAILABLE[(arch, tag)])
    return f"franca_{arch}_{tag}{'_rasa' if rasa else ''}.pth"


def _hub_dir() -> Path:
    path = Path(torch.hub.get_dir()) / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


def download_release(arch: str, weights: str, rasa: bool = False, progress: bool = True) -> Path:
    """Download an official file into torch.hub's cache (once) and return its local path."""
    name = release_file_name(arch, weights, rasa)
    target = _hub_dir() / name
    if target.exists():
        return target
    if arch == "vitg14" and not rasa:
        stem = name[: -len(".pth")]
        with tempfile.TemporaryDirectory(dir=_hub_dir()) as tmp:
            archive = Path(tmp) / f"{stem}.tar.gz"
            with open(archive, "wb") as joined:
                for part in GIANT_PARTS:
                    part_path = Path(tmp) / part
                    torch.hub.download_url_to_file(
                        f"{RELEASE_URL}/{stem}_{part}", str(part_path), progress=progress
                    )
                    joined.write(part_path.read_bytes())
                    part_path.unlink()
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith((".pth", ".pt"))]
                if not members:
                    raise CheckpointError(f"{archive}: the downloaded ViT-g archive holds no .pth file")
                tar.extractall(tmp, members=members[:1], filter="data")
                os.replace(Path(tmp) / members[0].name, target)
        return target
    tmp_target = target.with_name(target.name + ".partial")
    torch.hub.download_url_to_file(f"{RELEASE_URL}/{name}", str(tmp_target), progress=progress)
    os.replace(tmp_target, target)
    return target


def _make(
    arch: str, default_weights: str, pretrained: bool, weights: Any, rasa: Any, **kwargs: Any
) -> DinoVisionTransformer:
    from franca.models.vision_transformer import build_model

    checkpoint = kwargs.pop("checkpoint", None) or kwargs.pop("local_state_dict", None)
    weights = default_weights if weights is None else weights
    if (
        checkpoint is None
        and isinstance(weights, (str, os.PathLike))
        and Path(weights).suffix in (".pth", ".pt", ".safetensors")
    ):
        checkpoint = weights
    arch_name = {"vitb14": "vit_base", "vitl14": "vit_large", "vitg14": "vit_giant2"}[arch]
    if not pretrained and checkpoint is None:
        kwargs.setdefault("ffn_layer", "swiglu")
        return build_model(arch_name, patch_size=14, **kwargs)
    if checkpoint is None:
        checkpoint = download_release(arch, weights)
        if rasa is True:
            rasa = download_release(arch, weights, rasa=True)
    return load_backbone(checkpoint, rasa=rasa, **kwargs)


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
