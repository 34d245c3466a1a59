"""Images in, features out: the one feature extractor every command and protocol of franca uses.

See :mod:`franca.features.tokens` for the token vocabulary, :mod:`franca.features.extract` for the extractor,
:mod:`franca.features.embed` for features of image files (``franca embed``) and :mod:`franca.features.files` for
the files it writes. Names are imported lazily, so that ``franca.features.tokens`` and ``franca.features.files`` (and
with them ``franca --help``) import no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ALIASES": "franca.features.tokens",
    "TOKENS": "franca.features.tokens",
    "canonical_token": "franca.features.tokens",
    "canonical_tokens": "franca.features.tokens",
    "Features": "franca.features.extract",
    "TensorImages": "franca.features.extract",
    "extract_features": "franca.features.extract",
    "forward_tokens": "franca.features.extract",
    "iterate_features": "franca.features.extract",
    "embed_images": "franca.features.embed",
    "EmbeddingResult": "franca.features.files",
    "OUTPUT_SUFFIXES": "franca.features.files",
    "paths_file": "franca.features.files",
    "read_embedding_paths": "franca.features.files",
    "save_embeddings": "franca.features.files",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'franca.features' has no attribute {name!r}")
