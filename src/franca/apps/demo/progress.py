"""The demo's phase lines (``[demo 1m23s] ...``) and phase timings."""

from __future__ import annotations

import sys
import time


class PhaseLog:
    """Prints ``[demo 1m23s] message`` lines (through tqdm, so bars are not broken) and records phase timings."""

    def __init__(self, enabled: bool = True) -> None:
        self.start = time.perf_counter()
        self.enabled = enabled
        self.timings: dict[str, float] = {}
        self._phase: tuple[str, float] | None = None

    def elapsed(self) -> float:
        """Seconds since the demo started."""
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        """Print one progress line with the elapsed time."""
        if not self.enabled:
            return
        from franca.core.progress import ProgressBar

        ProgressBar.write(f"[demo {format_duration(self.elapsed())}] {message}", file=sys.stdout)
        sys.stdout.flush()

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
