"""Turn image files into backbone features (the engine of ``franca embed``).

Images get the standard inference preprocessing (shorter side resized, center crop, ImageNet normalisation); unreadable
files are skipped, warned about and counted. Features come back as float32 CPU tensors whose rows follow
``EmbeddingResult.paths``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from franca.data.images import ImageFileDataset, SkipCounter, collate_skip_none
from franca.errors import ConfigError
from franca.eval.common import autocast_context
from franca.models.vision_transformer import DinoVisionTransformer
from franca.progress import ProgressBar

TOKEN_KINDS = ("cls", "patch", "mean", "patch_rasa")


@dataclass
class EmbeddingResult:
    """Features per token kind (``cls`` [N, D], ``mean`` [N, D], ``patch`` [N, h*w, D]) and their image paths."""

    features: dict[str, Tensor]
    paths: list[Path]
    skipped: list[Path] = field(default_factory=list)
    grid: tuple[int, int] = (0, 0)


def _select_tokens(out: dict[str, Tensor], kind: str) -> Tensor:
    if kind == "cls":
        return out["x_norm_clstoken"]
    if kind == "mean":
        return out["x_norm_patchtokens"].mean(dim=1)
    if kind == "patch_rasa":
        return out["x_norm_patchtokens_rasa"]
    return out["x_norm_patchtokens"]


def embed_images(
    model: DinoVisionTransformer,
    paths: Sequence[Path],
    size: int = 224,
    batch_size: int = 32,
    tokens: Sequence[str] = ("cls",),
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> EmbeddingResult:
    """Run ``model`` over image files; ``tokens`` picks among ``cls``, ``patch``, ``mean`` (of patches), ``patch_rasa``."""
    from franca.data.augmentations import eval_transform

    unknown = [kind for kind in tokens if kind not in TOKEN_KINDS]
    if unknown:
        raise ConfigError(f"unknown token kind {unknown[0]!r}; choose from {', '.join(TOKEN_KINDS)}")
    if size % model.patch_size:
        raise ConfigError(f"--size {size} is not a multiple of the patch size {model.patch_size}")
    if "patch_rasa" in tokens and model.rasa is None:
        raise ConfigError(
            "token kind 'patch_rasa' needs a RASA head: pass --rasa or a backbone exported with one"
        )
    device = torch.device(device)
    model = model.to(device).eval()
    dataset = ImageFileDataset(list(paths), transform=eval_transform(size))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        pin_memory=device.type == "cuda",
    )
    counter = SkipCounter()
    chunks: dict[str, list[Tensor]] = {kind: [] for kind in tokens}
    kept: list[int] = []
    with (
        torch.inference_mode(),
        ProgressBar(total=len(dataset), unit="img", desc="embed", disable=not progress) as bar,
    ):
        for batch in loader:
            bar.update(len(batch) + batch.num_skipped)
            if not counter.update(batch):
                continue
            with autocast_context(device):
                out = model.forward_features(batch.inputs.to(device, non_blocking=True))
            for kind in tokens:
                chunks[kind].append(_select_tokens(out, kind).float().cpu())
            kept.extend(batch.targets.tolist())
    kept_set = set(kept)
    grid = (size // model.patch_size, size // model.patch_size)
    features = {
        kind: torch.cat(parts) if parts else torch.empty(0, model.embed_dim) for kind, parts in chunks.items()
    }
    return EmbeddingResult(
        features=features,
        paths=[dataset.paths[i] for i in kept],
        skipped=[p for i, p in enumerate(dataset.paths) if i not in kept_set],
        grid=grid,
    )


def save_embeddings(result: EmbeddingResult, out: str | os.PathLike) -> list[Path]:
    """Write features to ``out`` (``.safetensors``: one tensor per kind; ``.npy``: one file per kind) and the paths.

    With ``.npy`` and several kinds, each goes to ``<stem>.<kind>.npy``. The image paths, one per row, go to
    ``<stem>.paths.txt`` (and into the safetensors metadata). Files are written under temporary names and renamed.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {
            "paths": json.dumps([str(p) for p in result.paths]),
            "grid": json.dumps(list(result.grid)),
            "skipped": json.dumps([str(p) for p in result.skipped]),
        }
        tmp = out.with_name(out.name + ".tmp")
        save_file(
            {kind: value.contiguous() for kind, value in result.features.items()}, str(tmp), metadata=metadata
        )
        os.replace(tmp, out)
        written.append(out)
    elif out.suffix == ".npy":
        kinds = list(result.features)
        for kind in kinds:
            target = out if len(kinds) == 1 else out.with_name(f"{out.stem}.{kind}.npy")
            tmp = target.with_name(target.name + ".tmp")
            with open(tmp, "wb") as handle:
                np.save(handle, result.features[kind].numpy())
            os.replace(tmp, target)
            written.append(target)
    else:
        raise ConfigError(f"--out {out}: use a .npy or .safetensors file name")
    paths_file = out.with_name(f"{out.stem}.paths.txt")
    paths_file.write_text("".join(f"{p}\n" for p in result.paths))
    written.append(paths_file)
    return written
