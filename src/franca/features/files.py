"""Feature files: what ``franca embed`` writes and how to read its row order back (no torch import, for the CLI).

:func:`save_embeddings` writes an :class:`EmbeddingResult` (from :func:`franca.features.embed.embed_images`) as one
``.safetensors`` file with a tensor per token, or one ``.npy`` file per token, plus the image path of each row in
``<stem>.paths.jsonl`` (:func:`paths_file`, any file name round-trips); :func:`read_embedding_paths` reads the paths
back.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from franca.core.errors import ConfigError, DataError
from franca.core.io import atomic_target, ensure_output_dir
from franca.features.tokens import ALIASES, TOKENS

if TYPE_CHECKING:
    from torch import Tensor

#: Suffixes of the feature files :func:`save_embeddings` writes.
OUTPUT_SUFFIXES = (".npy", ".safetensors")


@dataclass
class EmbeddingResult:
    """Features of image files by the token name asked for, and the image path of each row.

    ``features``: fp32 CPU tensors whose rows follow ``paths``: ``cls`` / ``pooled`` (``mean``) [N, D], ``patch`` /
    ``patch_rasa`` [N, h*w, D] (row-major over ``grid``), ``registers`` [N, R, D]. ``skipped``: the unreadable
    files; ``grid``: the patch grid (h, w) of the inputs.
    """

    features: dict[str, Tensor]
    paths: list[Path]
    skipped: list[Path] = field(default_factory=list)
    grid: tuple[int, int] = (0, 0)


def paths_file(out: str | os.PathLike) -> Path:
    """The file beside the features file ``out`` that lists the image path of each row: ``<stem>.paths.jsonl``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.paths.jsonl")


def _write_paths(paths: Sequence[str | os.PathLike], target: Path) -> None:
    """One JSON string per line, ASCII only (see :func:`save_embeddings` for why and how to read it back)."""
    with open(target, "w", encoding="ascii", newline="\n") as handle:
        handle.writelines(json.dumps(os.fspath(path)) + "\n" for path in paths)


def _write_features(result: EmbeddingResult, suffix: str, files: list[Path]) -> None:
    """The features into ``files``: one safetensors file with a tensor per token, or one ``.npy`` per token."""
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


def _stale_outputs(out: Path) -> list[Path]:
    """Outputs an earlier run to ``out`` may have left: the old paths list, and for ``.npy`` every per-token file."""
    stale = [out.with_name(f"{out.stem}.paths.txt")]
    if out.suffix == ".npy":
        stale += [out, *(out.with_name(f"{out.stem}.{kind}.npy") for kind in (*TOKENS, *ALIASES))]
    return stale


def save_embeddings(result: EmbeddingResult, out: str | os.PathLike) -> list[Path]:
    """Write features to ``out`` (``.safetensors``: one tensor per token; ``.npy``: one file per token) and the paths.

    With ``.npy`` and several tokens, each goes to ``<stem>.<token>.npy``. The image path of each row goes to
    ``<stem>.paths.jsonl`` (see :func:`paths_file`), one JSON string per line, and for ``.safetensors`` also into the
    file's metadata (``paths``, a JSON list). The JSON is ASCII-only, so any file name survives: a newline is written
    as ``\\n``, and bytes that are not UTF-8 (Linux names are bytes) come as the lone surrogates of
    :func:`os.fsdecode` (``\\udcff`` for byte 0xff); ``os.fsencode(json.loads(line))`` gives back the exact bytes,
    and the decoded string opens the file as is. :func:`read_embedding_paths` reads the list back.

    Every file is first written under a temporary name (``.<name>.tmp``) and all of them are renamed into place only
    once all are complete, so that an error while writing leaves the previous outputs untouched and never a features
    file without its paths (or the other way round). Outputs of an earlier run to the same ``out`` that this one does
    not rewrite are removed, since their rows would not match the new paths: ``<stem>.<token>.npy`` of other tokens,
    ``out`` itself when several ``.npy`` tokens are written, and the ``<stem>.paths.txt`` of older versions.
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
    for path in _stale_outputs(out):
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
