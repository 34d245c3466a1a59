"""Images in, features out: the one feature extractor every command and protocol of franca uses.

See :mod:`franca.features.tokens` for the token vocabulary and :mod:`franca.features.extract` for the extractor.
"""

from franca.features.extract import Features, TensorImages, extract_features, forward_tokens, iterate_features
from franca.features.tokens import ALIASES, TOKENS, canonical_token, canonical_tokens

__all__ = [
    "ALIASES",
    "TOKENS",
    "Features",
    "TensorImages",
    "canonical_token",
    "canonical_tokens",
    "extract_features",
    "forward_tokens",
    "iterate_features",
]
