"""The token vocabulary of franca: which part of a backbone's output a feature is (no torch import, for the CLI).

==================  ================  =====================================================================
token               shape per image   what it is
==================  ================  =====================================================================
``cls``             [D]               final-normed CLS token (``x_norm_clstoken``)
``cls_blocks``      [n*D]             final-normed CLS of the last ``n_blocks`` blocks, oldest first (the
                                      DINOv2 linear probe's ``n_last_blocks``); equals ``cls`` for n = 1
``registers``       [R, D]            final-normed register tokens (``x_norm_regtokens``)
``patch``           [h, w, D]         final-normed patch tokens of the last block as their grid (row-major)
``patch_blocks``    [h, w, n*D]       final-normed patch tokens of the last ``n_blocks`` blocks, oldest
                                      first, concatenated along channels (dense probes on several blocks)
``patch_rasa``      [h, w, D]         the patch tokens after the attached RASA projection
``pooled``          [D]               mean of the last block's patch tokens (DINOv2's ``avgpool``)
``pooled_rasa``     [D]               mean of the ``patch_rasa`` tokens
==================  ================  =====================================================================

Older names are accepted everywhere a token is named and mean the same thing: ``mean`` and ``avgpool`` are
``pooled``, ``avgpool_rasa`` is ``pooled_rasa``, ``cls_concat`` is ``cls_blocks``.
"""

from __future__ import annotations

from collections.abc import Iterable

from franca.core.errors import ConfigError

TOKENS: tuple[str, ...] = (
    "cls",
    "cls_blocks",
    "registers",
    "patch",
    "patch_blocks",
    "patch_rasa",
    "pooled",
    "pooled_rasa",
)
ALIASES: dict[str, str] = {
    "mean": "pooled",
    "avgpool": "pooled",
    "avgpool_rasa": "pooled_rasa",
    "cls_concat": "cls_blocks",
}
#: Tokens that need a RASA head attached to the model.
RASA_TOKENS: tuple[str, ...] = ("patch_rasa", "pooled_rasa")


def canonical_token(name: str) -> str:
    """The vocabulary name of ``name`` (an alias such as ``mean`` maps to ``pooled``); ConfigError when unknown."""
    token = ALIASES.get(name, name)
    if token not in TOKENS:
        choices = ", ".join([*TOKENS, *ALIASES])
        raise ConfigError(f"unknown token kind {name!r}; choose from {choices}")
    return token


def canonical_tokens(names: Iterable[str]) -> tuple[str, ...]:
    """:func:`canonical_token` of each name, duplicates removed, order kept."""
    return tuple(dict.fromkeys(canonical_token(name) for name in names))
