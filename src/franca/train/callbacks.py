"""Hooks into :meth:`franca.train.trainer.Trainer.fit`: what a run watches or decides while it trains.

A callback subclasses :class:`Callback` and overrides the hooks it needs; the trainer calls them on every rank, in the
order given. :meth:`Trainer.request_stop` ends a fit early: the trainer writes a checkpoint at the iteration reached
(so the same command continues the schedule) and returns a result whose ``stopped`` names the reason;
:meth:`Trainer.write_record` adds a ``metrics.jsonl`` record of a callback's own. :class:`TimeBudget` stops a run
before a wall-time budget runs out; :class:`PeriodicEvaluation` measures the teacher backbone every N iterations (the
k-NN monitor of ``franca train``, :mod:`franca.apps.monitor`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # cycle: franca.train.trainer imports this module
    from franca.train.trainer import Trainer, TrainResult

logger = logging.getLogger(__name__)

#: What :class:`PeriodicEvaluation` calls: the teacher backbone in, named numbers out (``{"top1": 61.2, ...}``).
Evaluate = Callable[[nn.Module], Mapping[str, float]]


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


@contextlib.contextmanager
def _root_parameters_gathered(network: nn.Module) -> Iterator[None]:
    """Around a forward of a part of ``network`` (its backbone) rather than of ``network`` itself.

    Under FSDP2 (:func:`franca.train.parallel.shard_network`) the root module holds the parameters outside the blocks
    and heads (patch embedding, CLS and register tokens, position embedding, final norm) as shards that only a forward
    of the root gathers; ``unshard`` gathers them (a collective: every rank calls it) and ``reshard`` frees them again.
    Each block gathers its own parameters in its forward. A module that is not sharded needs nothing.
    """
    unshard, reshard = getattr(network, "unshard", None), getattr(network, "reshard", None)
    if not (callable(unshard) and callable(reshard)):
        yield
        return
    unshard()
    try:
        yield
    finally:
        reshard()


class PeriodicEvaluation(Callback):
    """Evaluate the teacher backbone every ``every`` iterations and at the end of each fit, and log the numbers.

    ``evaluate(backbone)`` returns named numbers; each evaluation becomes one ``metrics.jsonl`` record
    ``{"iteration", "<name>_<key>": value, ..., "<name>_time_s"}`` (written by rank 0, beside the step records), one
    log line, and an entry ``(iteration, numbers)`` of :attr:`history`. During the call the backbone is in eval mode
    (its mode is restored afterwards) and gradients are off; the random state is restored afterwards, so that a run
    trains the same with or without monitoring. The end of a fit is evaluated unless its last iteration just was, or
    the fit made no step.

    Every rank calls ``evaluate`` at the same iterations: under FSDP2 the teacher's forward is a collective (each
    block gathers its parameters from every rank), so ``evaluate`` must run the same number of forward passes on every
    rank, e.g. over the same images. The parameters the sharded root holds itself are gathered around the call. FSDP2
    gets ready in the first teacher forward of a process, so an evaluation that falls on a step every rank skipped
    (all its images unreadable) waits for the next step that ran.
    """

    def __init__(self, every: int, evaluate: Evaluate, name: str = "eval") -> None:
        if every < 1:
            raise ValueError(f"an evaluation period must be >= 1 iteration, got {every}")
        if not name:
            raise ValueError("an evaluation needs a name (the prefix of its metrics.jsonl keys)")
        self.every, self.evaluate, self.name = every, evaluate, name
        self.history: list[tuple[int, dict[str, float]]] = []
        self._due = False  # an evaluation is owed (its step may have been skipped)
        self._ready = False  # the teacher ran a forward in this fit
        self._last_iteration: int | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self._due = self._ready = False

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        self._ready = self._ready or "skipped_empty_batch" not in logs
        self._due = self._due or trainer.iteration % self.every == 0
        if self._due and self._ready:
            self._run(trainer)

    def on_fit_end(self, trainer: Trainer, result: TrainResult) -> None:
        if self._ready and self._last_iteration != trainer.iteration:
            self._run(trainer)

    def _run(self, trainer: Trainer) -> None:
        """Evaluate the teacher backbone now and log the numbers."""
        start = time.perf_counter()
        backbone = trainer.teacher.backbone
        was_training = backbone.training
        rng_devices = [trainer.device] if trainer.device.type == "cuda" else []
        backbone.eval()
        try:
            with (
                torch.random.fork_rng(devices=rng_devices),
                torch.no_grad(),
                _root_parameters_gathered(trainer.teacher),
            ):
                numbers = {key: float(value) for key, value in self.evaluate(backbone).items()}
        finally:
            backbone.train(was_training)
        seconds = time.perf_counter() - start
        self._due, self._last_iteration = False, trainer.iteration
        self.history.append((trainer.iteration, numbers))
        if trainer.is_main:
            record = {f"{self.name}_{key}": value for key, value in numbers.items()}
            trainer.write_record({"iteration": trainer.iteration, **record, f"{self.name}_time_s": seconds})
            shown = ", ".join(f"{key} {value:.4g}" for key, value in record.items())
            logger.info("iteration %d: %s (%.1f s)", trainer.iteration, shown, seconds)
