"""Features of image files, the engine of ``franca embed``: paths in, an :class:`EmbeddingResult` out.

Images get the standard inference preprocessing (shorter side resized, center crop, ImageNet normalisation) and go
through :func:`franca.features.iterate_features` (bf16 autocast on CUDA); unreadable files are skipped, warned about
and counted. :func:`franca.features.files.save_embeddings` writes the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from franca.core.errors import ConfigError
from franca.data.augmentations import eval_transform
from franca.data.images import ImageFileDataset, collate_skip_none
from franca.features.extract import iterate_features
from franca.features.files import EmbeddingResult
from franca.features.tokens import RASA_TOKENS, canonical_token
from franca.models.vision_transformer import DinoVisionTransformer

#: Tokens with one vector per patch: written as [N, h*w, D], row-major over the grid (the layout of
#: ``x_norm_patchtokens``), rather than the [N, h, w, D] of :class:`franca.features.Features`.
_PATCH_TOKENS = ("patch", "patch_blocks", "patch_rasa")


def _requested(tokens: Sequence[str]) -> dict[str, str]:
    """{name as asked: vocabulary token}, one name per token (the first asked), in the order asked."""
    names: dict[str, str] = {}
    for name in tokens:
        token = canonical_token(name)
        if token not in names.values():
            names[name] = token
    return names


def _check(model: DinoVisionTransformer, size: int, tokens: Sequence[str]) -> None:
    """ConfigError, before any image is read, when ``size`` or a RASA token does not suit ``model``."""
    if size % model.patch_size:
        raise ConfigError(f"--size {size} is not a multiple of the patch size {model.patch_size}")
    rasa = [token for token in tokens if token in RASA_TOKENS]
    if rasa and model.rasa is None:
        raise ConfigError(
            f"token kind {rasa[0]!r} needs a RASA head: pass --rasa or a backbone exported with one"
        )


def _as_rows(token: str, value: Tensor) -> Tensor:
    """A batch of ``token`` on the CPU, patch grids [B, h, w, D] flattened to [B, h*w, D]."""
    value = value.cpu()
    return value.flatten(1, 2) if token in _PATCH_TOKENS else value


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
    """Run ``model`` over image files and keep ``tokens`` (names of :mod:`franca.features.tokens`, aliases such as
    ``mean`` included; each is stored under the name asked for, e.g. ``cls``, ``patch``, ``mean``, ``patch_rasa``).

    Rows follow the readable paths in order; with no readable image every tensor has zero rows [0, D].
    """
    names = _requested(tokens)
    _check(model, size, list(names.values()))
    device = torch.device(device)
    model = model.to(device)
    dataset = ImageFileDataset(list(paths), transform=eval_transform(size))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        pin_memory=device.type == "cuda",
    )
    chunks: dict[str, list[Tensor]] = {token: [] for token in names.values()}
    kept: list[int] = []
    for outputs, indices in iterate_features(
        model, loader, list(chunks), device, desc="embed", progress=progress
    ):
        for token, value in outputs.items():
            chunks[token].append(_as_rows(token, value))
        kept.extend(indices.tolist())
    kept_set = set(kept)
    return EmbeddingResult(
        features={
            name: torch.cat(chunks[token]) if kept else torch.empty(0, model.embed_dim)
            for name, token in names.items()
        },
        paths=[dataset.paths[i] for i in kept],
        skipped=[p for i, p in enumerate(dataset.paths) if i not in kept_set],
        grid=(size // model.patch_size, size // model.patch_size),
    )
