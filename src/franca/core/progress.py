"""Progress bars that suit both a terminal and a log file.

Every long loop of the package shows a :class:`ProgressBar` (tqdm with a rate and an ETA). In a terminal it redraws
up to ten times a second, as tqdm does. When its stream is not a terminal (``make demo > demo.log``, a SLURM job, CI),
each redraw would be written into the file, thousands per run; there it redraws at most every
:data:`LOG_MININTERVAL_S` seconds instead (its first and final states are always written). An explicit
``mininterval`` wins; ``TQDM_MININTERVAL`` and tqdm's other environment overrides work as usual. ``set_postfix``
does not force a redraw (tqdm's does, which defeats ``mininterval`` in loops that update the postfix every step); the
new postfix shows at the next regular one.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm as _tqdm

__all__ = ["LOG_MININTERVAL_S", "ProgressBar", "is_interactive"]

LOG_MININTERVAL_S = 30.0


def is_interactive(stream: Any = None) -> bool:
    """Whether a bar on ``stream`` (default: stderr) is seen live: a terminal, or a Jupyter kernel."""
    if "ipykernel" in sys.modules:
        return True
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class ProgressBar(_tqdm):
    """``tqdm.auto.tqdm`` (same arguments) with ``dynamic_ncols`` and log-friendly redraws (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("dynamic_ncols", True)
        if (
            "mininterval" not in kwargs
            and "TQDM_MININTERVAL" not in os.environ
            and not is_interactive(kwargs.get("file"))
        ):
            kwargs["mininterval"] = LOG_MININTERVAL_S
        super().__init__(*args, **kwargs)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = False, **kwargs: Any) -> None:
        """tqdm's ``set_postfix``, without a forced redraw unless ``refresh=True``."""
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)
