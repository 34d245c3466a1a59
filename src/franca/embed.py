"""Turn image files into backbone features (the engine of ``franca embed``).

Images get the standard inference preprocessing (shorter side resized, center crop, ImageNet normalisation); unreadable
files are skipped, warned about and counted. Features come back as float32 CPU tensors whose rows follow
``EmbeddingResult.paths``; :func:`save_embeddings` writes them with the paths (``<stem>.paths.jsonl``, any file name
round-trips) and :func:`read_embedding_paths` reads the paths back.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from franca.core.errors import ConfigError, DataError
from franca.core.io import atomic_target, ensure_output_dir
from franca.core.progress import ProgressBar
from franca.core.runtime import autocast_context
from franca.data.images import ImageFileDataset, SkipCounter, collate_skip_none
from franca.models.vision_transformer import DinoVisionTransformer

TOKEN_KINDS = ("cls", "patch", "mean", "patch_rasa")
#: Suffixes of the feature files :func:`save_embeddings` writes.
OUTPUT_SUFFIXES = (".npy", ".safetensors")


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


def paths_file(out: str | os.PathLike) -> Path:
    """The file beside the features file ``out`` that lists the image path of each row: ``<stem>.paths.jsonl``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.paths.jsonl")


def _write_paths(paths: Sequence[str | os.PathLike], target: Path) -> None:
    """One JSON string per line, ASCII only (see :func:`save_embeddings` for why and how to read it back)."""
    with open(target, "w", encoding="ascii", newline="\n") as handle:
        handle.writelines(json.dumps(os.fspath(path)) + "\n" for path in paths)


def _write_features(result: EmbeddingResult, suffix: str, files: list[Path]) -> None:
    """The features into ``files``: one safetensors file with a tensor per kind, or one ``.npy`` per kind."""
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {
            "paths": json.dumps([os.fspath(p) for p in result.paths]),
            "grid": json.dumps(list(result.grid)),
            "skipped": json.dumps([os.fspath(p) for p in result.skipped]),
        }
        tensors = {kind: value.contiguous() for kind, value in result.features.items()}
        save_file(tensors, str(files[0]), metadata=metadata)
        return
    for kind, file in zip(result.features, files):
        with open(file, "wb") as handle:
            np.save(handle, result.features[kind].numpy())


def save_embeddings(result: EmbeddingResult, out: str | os.PathLike) -> list[Path]:
    """Write features to ``out`` (``.safetensors``: one tensor per kind; ``.npy``: one file per kind) and the paths.

    With ``.npy`` and several kinds, each goes to ``<stem>.<kind>.npy``. The image path of each row goes to
    ``<stem>.paths.jsonl`` (see :func:`paths_file`), one JSON string per line, and for ``.safetensors`` also into the
    file's metadata (``paths``, a JSON list). The JSON is ASCII-only, so any file name survives: a newline is written
    as ``\\n``, and bytes that are not UTF-8 (Linux names are bytes) come as the lone surrogates of
    :func:`os.fsdecode` (``\\udcff`` for byte 0xff); ``os.fsencode(json.loads(line))`` gives back the exact bytes,
    and the decoded string opens the file as is. :func:`read_embedding_paths` reads the list back.

    Every file is first written under a temporary name (``.<name>.tmp``) and all of them are renamed into place only
    once all are complete, so that an error while writing leaves the previous outputs untouched and never a features
    file without its paths (or the other way round). Outputs of an earlier run to the same ``out`` that this one does
    not rewrite are removed, since their rows would not match the new paths: ``<stem>.<kind>.npy`` of other kinds,
    ``out`` itself when several ``.npy`` kinds are written, and the ``<stem>.paths.txt`` of older versions.
    """

    out = Path(out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out {out}: use a .npy or .safetensors file name")
    ensure_output_dir(out.parent, option="--out")
    kinds = list(result.features)
    if out.suffix == ".safetensors":
        targets = [out]
    else:
        targets = [out if len(kinds) == 1 else out.with_name(f"{out.stem}.{kind}.npy") for kind in kinds]
    try:
        with contextlib.ExitStack() as stack:  # every file renamed into place only once all are complete
            temporaries = [
                stack.enter_context(atomic_target(target)) for target in [*targets, paths_file(out)]
            ]
            _write_features(result, out.suffix, temporaries[:-1])
            _write_paths(result.paths, temporaries[-1])
    except OSError as error:
        raise ConfigError(
            f"--out {out}: cannot write {error.filename or out} ({error.strerror or error}); nothing was replaced"
        ) from error
    targets.append(paths_file(out))
    stale = [out.with_name(f"{out.stem}.paths.txt")]
    if out.suffix == ".npy":
        stale += [out, *(out.with_name(f"{out.stem}.{kind}.npy") for kind in TOKEN_KINDS)]
    for path in stale:
        if path not in targets and path.is_file():
            path.unlink()
    return targets


def read_embedding_paths(out: str | os.PathLike) -> list[str]:
    """The image path of each row of the features that ``franca embed`` wrote to ``out``, in row order.

    Reads ``<stem>.paths.jsonl`` (see :func:`save_embeddings`); paths are :func:`os.fsdecode` strings, so
    ``os.fsencode(path)`` gives the exact bytes of a name that is not UTF-8. Outputs of older versions are read too:
    the ``<stem>.paths.txt`` list (one path per line), or else the metadata of a ``.safetensors`` file.
    Raises :class:`~franca.core.errors.DataError` when none is found.
    """
    out = Path(out)
    jsonl = paths_file(out)
    if jsonl.is_file():
        lines = jsonl.read_text(encoding="utf-8").split("\n")
        return [json.loads(line) for line in lines if line]
    legacy = out.with_name(f"{out.stem}.paths.txt")
    if legacy.is_file():
        return legacy.read_text(encoding="utf-8", errors="surrogateescape").split("\n")[:-1]
    if out.suffix == ".safetensors" and out.is_file():
        from safetensors import safe_open

        with safe_open(str(out), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if "paths" in metadata:
            return json.loads(metadata["paths"])
    raise DataError(f"no list of image paths for {out}: expected {jsonl} beside it (written by franca embed)")
