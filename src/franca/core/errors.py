"""Exceptions that carry one actionable line for the user.

Every error a user can fix (a bad config key, an unreadable checkpoint, an empty folder) is raised as a
subclass of :class:`FrancaError`; the command line prints its message on one line and exits with status 2
instead of showing a stack trace.
"""

from __future__ import annotations

from collections.abc import Iterable


class FrancaError(Exception):
    """Base class for errors whose message tells the user what to do."""


class CheckpointError(FrancaError):
    """A checkpoint file is missing, unreadable, of an unknown layout or incompatible with a request."""


class ConfigError(FrancaError):
    """A configuration key or value is invalid."""


class DataError(FrancaError):
    """A data set is missing, empty or inconsistent."""


class DiskFullError(FrancaError):
    """A file could not be written because its disk (or quota) is full."""


class RunDirectoryBusyError(FrancaError):
    """Another process is writing the same run directory."""


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Raise a one-line ConfigError naming ``name`` (an option or config key) when ``value`` is not in ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(map(str, choices))}")
