"""Per-iteration schedules of a run: learning rate, weight decay, teacher momentum and temperature.

The shapes follow DINOv2's ``CosineScheduler`` exactly (what the official Franca code uses): an optional stretch of
zeros, a linear warm-up made with ``np.linspace`` (both ends included), then a half cosine from the base value towards
the final value; past the end of the array the final value is returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from franca.core.errors import ConfigError
from franca.train.config import TrainConfig, resolve_batch_sizes


def cosine_schedule(
    base: float,
    final: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
    freeze_iters: int = 0,
) -> np.ndarray:
    """Return a float64 array [total_iters]: ``freeze_iters`` zeros, a linear warm-up, then a cosine base -> final.

    Warm-up value k (0-based) is start + (base - start) * k / (warmup_iters - 1). Cosine value k of the n remaining
    iterations is final + (base - final) * (1 + cos(pi * k / n)) / 2, so it starts at ``base`` and approaches
    ``final`` (reached one step after the array ends).
    """
    if min(total_iters, warmup_iters, freeze_iters) < 0:
        raise ValueError("schedule lengths must be non-negative")
    cosine_iters = total_iters - warmup_iters - freeze_iters
    if cosine_iters < 0:
        raise ValueError(
            f"warm-up ({warmup_iters}) plus freeze ({freeze_iters}) iterations exceed the schedule length ({total_iters})"
        )
    freeze = np.zeros(freeze_iters)
    warmup = np.linspace(start_warmup_value, base, warmup_iters)
    steps = np.arange(cosine_iters)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * steps / max(cosine_iters, 1)))
    return np.concatenate((freeze, warmup, cosine)).astype(np.float64)


def linear_warmup_schedule(start: float, value: float, total_iters: int, warmup_iters: int) -> np.ndarray:
    """Return an array [total_iters]: ``np.linspace(start, value, warmup_iters)`` then ``value`` (cut to total_iters).

    This is DINOv2's teacher-temperature schedule (a CosineScheduler whose base and final values are equal).
    """
    if min(total_iters, warmup_iters) < 0:
        raise ValueError("schedule lengths must be non-negative")
    warmup = np.linspace(start, value, warmup_iters)
    constant = np.full(max(total_iters - warmup_iters, 0), value, dtype=np.float64)
    return np.concatenate((warmup, constant))[:total_iters].astype(np.float64)


def scaled_lr(base_lr: float, rule: str, global_batch_size: int) -> float:
    """The peak learning rate for ``global_batch_size`` images per step.

    ``sqrt_wrt_1024``: base_lr * sqrt(B / 1024) (official Franca/DINOv2); ``linear_wrt_256``: base_lr * B / 256;
    ``none``: base_lr.
    """
    if global_batch_size <= 0:
        raise ValueError(f"global batch size must be positive, got {global_batch_size}")
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch_size / 1024.0)
    if rule == "linear_wrt_256":
        return base_lr * global_batch_size / 256.0
    if rule == "none":
        return base_lr
    raise ConfigError(
        f"config key 'optim.lr_scaling_rule' must be sqrt_wrt_1024, linear_wrt_256 or none; got '{rule}'"
    )


@dataclass(frozen=True)
class ScheduleValues:
    """The scheduled values for one iteration."""

    lr: float
    weight_decay: float
    teacher_momentum: float
    teacher_temp: float
    last_layer_lr: float


class Schedules:
    """All per-iteration schedules of a run, as float64 arrays of length ``total_iterations``.

    - ``lr``: linear warm-up from 0 to the scaled peak lr, then cosine to ``optim.min_lr`` (``optim.lr_schedule``
      ``cosine``) or the peak held (``constant``).
    - ``weight_decay``: cosine from ``weight_decay_start`` to ``weight_decay_end`` over the whole run.
    - ``teacher_momentum``: cosine from ``teacher_momentum_start`` to ``teacher_momentum_end``.
    - ``teacher_temp``: linear warm-up ``teacher_temp_start`` -> ``teacher_temp`` then constant.
    - ``last_layer_lr``: ``lr`` with zeros for the first ``freeze_last_layer_iterations`` (prototypes frozen).

    ``schedules[i]`` gives the :class:`ScheduleValues` of iteration i; past the end, the final values.
    ``peak_lr`` and ``global_batch_size`` record how the learning rate was scaled.
    """

    def __init__(
        self,
        lr: np.ndarray,
        weight_decay: np.ndarray,
        teacher_momentum: np.ndarray,
        teacher_temp: np.ndarray,
        last_layer_lr: np.ndarray,
        final: ScheduleValues,
        peak_lr: float | None = None,
        global_batch_size: int | None = None,
    ) -> None:
        lengths = {len(lr), len(weight_decay), len(teacher_momentum), len(teacher_temp), len(last_layer_lr)}
        if len(lengths) != 1:
            raise ValueError(f"all schedules must have the same length, got {sorted(lengths)}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.teacher_momentum = teacher_momentum
        self.teacher_temp = teacher_temp
        self.last_layer_lr = last_layer_lr
        self.final = final
        self.total_iterations = len(lr)
        self.peak_lr = float(lr.max()) if peak_lr is None and len(lr) else peak_lr
        self.global_batch_size = global_batch_size

    @classmethod
    def from_config(cls, config: TrainConfig, world_size: int = 1) -> Schedules:
        """Build the schedules of ``config`` for ``world_size`` processes (the global batch sets the peak lr)."""
        optim, total = config.optim, config.train.iterations
        _, global_batch = resolve_batch_sizes(config.train, world_size)
        peak_lr = scaled_lr(optim.base_lr, optim.lr_scaling_rule, global_batch)
        final_lr = peak_lr if optim.lr_schedule == "constant" else optim.min_lr
        lr = cosine_schedule(peak_lr, final_lr, total, warmup_iters=optim.warmup_iterations)
        weight_decay = cosine_schedule(optim.weight_decay_start, optim.weight_decay_end, total)
        momentum = cosine_schedule(optim.teacher_momentum_start, optim.teacher_momentum_end, total)
        loss = config.loss
        teacher_temp = linear_warmup_schedule(
            loss.teacher_temp_start, loss.teacher_temp, total, loss.teacher_temp_warmup_iterations
        )
        last_layer_lr = lr.copy()
        last_layer_lr[: optim.freeze_last_layer_iterations] = 0.0
        final = ScheduleValues(
            lr=final_lr,
            weight_decay=optim.weight_decay_end,
            teacher_momentum=optim.teacher_momentum_end,
            teacher_temp=loss.teacher_temp,
            last_layer_lr=final_lr,
        )
        return cls(lr, weight_decay, momentum, teacher_temp, last_layer_lr, final, peak_lr, global_batch)

    def __len__(self) -> int:
        return self.total_iterations

    def __getitem__(self, iteration: int) -> ScheduleValues:
        if iteration < 0:
            raise IndexError(f"iteration must be >= 0, got {iteration}")
        if iteration >= self.total_iterations:
            return self.final
        return ScheduleValues(
            lr=float(self.lr[iteration]),
            weight_decay=float(self.weight_decay[iteration]),
            teacher_momentum=float(self.teacher_momentum[iteration]),
            teacher_temp=float(self.teacher_temp[iteration]),
            last_layer_lr=float(self.last_layer_lr[iteration]),
        )
