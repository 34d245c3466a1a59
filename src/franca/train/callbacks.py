"""Hooks into :meth:`franca.train.trainer.Trainer.fit`: what a run watches or decides while it trains.

A callback subclasses :class:`Callback` and overrides the hooks it needs; the trainer calls them on every rank, in the
order given. :meth:`Trainer.request_stop` ends a fit early: the trainer writes a checkpoint at the iteration reached
(so the same command continues the schedule) and returns a result whose ``stopped`` names the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from franca.train.trainer import Trainer, TrainResult


class Callback:
    """Base class: every hook does nothing."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """The run directory is open and the state resumed; ``trainer.iteration`` is the first step's index."""

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        """One iteration is done (``trainer.iteration`` counts it); ``logs`` are the step's values."""

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """A record was logged (a ``metrics.jsonl`` line on rank 0); a callback may add keys before it is written."""

    def on_checkpoint(self, trainer: Trainer, path: Path | None) -> None:
        """A checkpoint and the teacher exports of ``trainer.iteration`` were written."""

    def on_fit_end(self, trainer: Trainer, result: TrainResult) -> None:
        """The fit returned ``result`` (finished, stopped, or at ``stop_at``)."""


class TimeBudget(Callback):
    """Stop a fit before it runs past ``seconds`` of wall time (measured from its start, checkpoints included).

    After each step it predicts the next one from the mean step time so far and stops when that step would end past
    the budget; the first step always runs.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter) -> None:
        if not seconds > 0:
            raise ValueError(f"a time budget must be positive, got {seconds}")
        self.seconds = seconds
        self.clock = clock
        self._start = 0.0
        self._first_iteration = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        self._start = self.clock()
        self._first_iteration = trainer.iteration

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        elapsed = self.clock() - self._start
        per_step = elapsed / max(trainer.iteration - self._first_iteration, 1)
        if elapsed + per_step > self.seconds:
            trainer.request_stop(
                f"time budget of {self.seconds:.0f} s used up at iteration {trainer.iteration}"
            )
