"""argparse ``type=`` validators shared by every command (``franca embed``, ``franca eval <protocol>``, ``franca rasa``).

A bad value stops at parse time with argparse's one error line naming the option (exit status 2), before any model
or data is read, instead of a DataLoader traceback or a failure after a long run. Torch-free, so that building the
parsers for ``franca --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from franca.core.errors import ConfigError
from franca.core.io import output_dir_problem


def int_at_least(minimum: int, hint: str = "") -> Callable[[str], int]:
    """argparse type: an integer of at least ``minimum`` (``hint`` explains the smallest value in the message)."""

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an integer; give {minimum} or more{hint}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}; give {minimum} or more{hint}")
        return value

    return check


positive_int = int_at_least(1)  # batch sizes, counts
non_negative_int = int_at_least(0, " (0: load in the main process)")  # --num-workers


def output_folder(text: str) -> str:
    """argparse type of ``--output-dir``: a folder that exists or can be created (see
    :func:`franca.eval.output.output_dir_problem`)."""
    problem = output_dir_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def output_file(suffixes: Sequence[str]) -> Callable[[str], str]:
    """argparse type of an output file option (e.g. ``franca embed --out``): one of ``suffixes``, not a folder, in a
    folder that exists or can be created."""

    def check(text: str) -> str:
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(
                f"{text} is a folder; give a file name ending in {' or '.join(suffixes)}"
            )
        if Path(text).suffix not in suffixes:
            raise argparse.ArgumentTypeError(f"{text}: use a {' or '.join(suffixes)} file name")
        problem = output_dir_problem(Path(text).parent)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return text

    return check


def seed_list(base_seed: int, count: int) -> list[int]:
    """``count`` consecutive seeds starting at ``base_seed`` (the ``--seed`` / ``--seeds`` options of the dense
    protocols); ConfigError when ``count`` is below 1."""
    if count < 1:
        raise ConfigError(f"--seeds must be at least 1 (got {count})")
    return [base_seed + index for index in range(count)]


def input_size(size: int | None, model: object, option: str = "--size") -> int:
    """The input side to use: ``size`` when given, else the resolution the checkpoint records (its ``img_size``,
    the size it was trained at); ConfigError when it is not a multiple of the model's patch size."""
    config = getattr(model, "config", None)
    recorded = config.get("img_size") if isinstance(config, dict) else getattr(config, "img_size", None)
    resolved = int(size if size is not None else recorded or 224)
    patch = int(getattr(model, "patch_size", 1))
    if resolved <= 0 or resolved % patch:
        raise ConfigError(f"{option} {resolved} is not a positive multiple of the patch size {patch}")
    return resolved


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that states every option's default: ``(default: X)`` is appended unless the help already names its
    default, or the default is None / False (an absent option) / suppressed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})"
