"""The demo's phase lines (``[demo 1m23s] ...``) and phase timings.

The lines are log records of the ``franca.demo`` logger at INFO (the library never prints): :mod:`franca.cli.demo`
shows them on stdout through a tqdm-safe handler, so that running progress bars are not broken.
"""

from __future__ import annotations

import logging
import time

LOGGER_NAME = "franca.demo"
logger = logging.getLogger(LOGGER_NAME)


class PhaseLog:
    """Logs ``[demo 1m23s] message`` lines (INFO, logger ``franca.demo``) and records phase timings."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self._phase: tuple[str, float] | None = None

    def elapsed(self) -> float:
        """Seconds since the demo started."""
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        """Log one progress line with the elapsed time."""
        logger.info("[demo %s] %s", format_duration(self.elapsed()), message)

    def phase(self, name: str, message: str) -> None:
        """Close the running phase (recording its duration) and start ``name``."""
        self.end_phase()
        self._phase = (name, time.perf_counter())
        self(message)

    def end_phase(self) -> None:
        """Record the duration of the running phase, if any."""
        if self._phase is not None:
            name, started = self._phase
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started
            self._phase = None


def format_duration(seconds: float) -> str:
    """``83.2`` -> ``"1m23s"``, ``7.5`` -> ``"7.5s"``, ``3725`` -> ``"1h02m05s"``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s"
