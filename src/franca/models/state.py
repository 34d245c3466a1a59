"""Checks of a state dict against the tensors a module expects, shared by the backbone and head loaders."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from franca.core.errors import CheckpointError

_log = logging.getLogger(__name__)


def check_tensors(
    state: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    where: str,
    described: str,
    names: Mapping[str, str] | None = None,
) -> None:
    """One :class:`CheckpointError` line when ``state`` lacks a tensor of ``expected``, has one more, or one of
    another shape (named with its shape and the expected one).

    ``where`` names the file, ``described`` says what ``expected`` comes from ("the inferred head"), and ``names``
    maps a key to the name the file spells it with (the official layout), for the message.
    """
    names = names or {}

    def shown(key: str) -> str:
        return repr(names.get(key, key))

    missing = [key for key in expected if key not in state]
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} tensors of {described} are missing (e.g. {shown(missing[0])}); "
            "the file is incomplete or of another architecture"
        )
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise CheckpointError(
            f"{where}: {len(unexpected)} tensors are not part of {described} (e.g. {shown(unexpected[0])})"
        )
    wrong = [key for key, shape in expected.items() if tuple(state[key].shape) != tuple(shape)]
    if wrong:
        key = wrong[0]
        more = f" ({len(wrong) - 1} more tensors have another shape too)" if len(wrong) > 1 else ""
        raise CheckpointError(
            f"{where}: tensor {shown(key)} has shape {list(state[key].shape)} where {described} expects "
            f"{list(expected[key])}{more}; the file is corrupt, edited or of another model: download or export it "
            "again"
        )


def warn_non_finite(
    state: Mapping[str, Tensor], where: str, consequence: str = "the features will be NaN"
) -> None:
    """Log one warning naming the tensors of ``state`` that hold NaN or inf values (the first few and the count)."""
    bad = [
        key
        for key, value in state.items()
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all())
    ]
    if not bad:
        return
    names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    count = f"{len(bad)} tensors hold" if len(bad) > 1 else "1 tensor holds"
    _log.warning("%s: %s NaN or inf values (%s); %s", where, count, names, consequence)
