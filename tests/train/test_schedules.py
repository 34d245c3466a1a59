"""Schedules: DINOv2 CosineScheduler semantics checked against closed-form values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from franca.core.errors import ConfigError
from franca.train.config import load_config
from franca.train.schedules import Schedules, cosine_schedule, linear_warmup_schedule, scaled_lr


def test_cosine_schedule_freeze_warmup_and_cosine_by_formula() -> None:
    base, final, total, warmup, start, freeze = 2.0, 0.5, 41, 11, 0.1, 5
    schedule = cosine_schedule(
        base, final, total, warmup_iters=warmup, start_warmup_value=start, freeze_iters=freeze
    )
    assert schedule.shape == (total,)
    assert np.all(schedule[:freeze] == 0.0)
    # linspace(start, base, 11): the midpoint (k = 5) is halfway between start and base; the last warm-up value is base
    assert schedule[freeze + 5] == pytest.approx((start + base) / 2)
    assert schedule[freeze + 1] == pytest.approx(start + (base - start) * 1 / 10)
    assert schedule[freeze + warmup - 1] == pytest.approx(base)
    # the cosine part has n = 25 steps; it starts at base and its value at step n/2 would be (base + final) / 2
    n = total - warmup - freeze
    first = freeze + warmup
    assert schedule[first] == pytest.approx(base)
    for k in (3, 12, n - 1):
        expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * k / n))
        assert schedule[first + k] == pytest.approx(expected)


def test_cosine_midpoint_is_the_mean_of_base_and_final() -> None:
    schedule = cosine_schedule(1.0, 0.2, 100)
    assert schedule[0] == pytest.approx(1.0)
    assert schedule[50] == pytest.approx((1.0 + 0.2) / 2)
    assert schedule[-1] == pytest.approx(0.2 + 0.4 * (1 + math.cos(math.pi * 99 / 100)))
    assert schedule[-1] > 0.2  # the final value is reached one step after the end, as in DINOv2


def test_cosine_schedule_rejects_too_long_warmup() -> None:
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 10, warmup_iters=8, freeze_iters=3)


def test_linear_warmup_then_constant() -> None:
    schedule = linear_warmup_schedule(0.04, 0.07, 20, 7)
    assert schedule[0] == pytest.approx(0.04)
    assert schedule[3] == pytest.approx(0.055)  # midpoint of linspace(0.04, 0.07, 7)
    assert schedule[6] == pytest.approx(0.07)
    assert np.allclose(schedule[6:], 0.07)
    assert len(linear_warmup_schedule(0.04, 0.07, 5, 10)) == 5


@pytest.mark.parametrize(
    ("rule", "batch", "expected"),
    [
        ("sqrt_wrt_1024", 2048, 1e-3 * math.sqrt(2)),
        ("sqrt_wrt_1024", 256, 1e-3 * 0.5),
        ("linear_wrt_256", 64, 2.5e-4),
        ("none", 4096, 1e-3),
    ],
)
def test_lr_scaling_rules(rule: str, batch: int, expected: float) -> None:
    assert scaled_lr(1e-3, rule, batch) == pytest.approx(expected)


def test_unknown_scaling_rule() -> None:
    with pytest.raises(ConfigError, match="lr_scaling_rule"):
        scaled_lr(1e-3, "cubic", 32)


def test_schedules_from_config() -> None:
    overrides = [
        "train.iterations=200",
        "train.batch_size_per_device=16",
        "optim.base_lr=1e-3",
        "optim.lr_schedule=cosine",  # tiny_cpu holds the peak
        "optim.min_lr=1e-5",
        "optim.warmup_iterations=21",
        "optim.freeze_last_layer_iterations=10",
        "optim.weight_decay_start=0.04",
        "optim.weight_decay_end=0.2",
        "optim.teacher_momentum_start=0.99",
        "optim.teacher_momentum_end=1.0",
        "loss.teacher_temp_start=0.04",
        "loss.teacher_temp=0.07",
        "loss.teacher_temp_warmup_iterations=31",
    ]
    cfg = load_config("tiny_cpu", overrides)
    schedules = Schedules.from_config(cfg, world_size=4)
    peak = 1e-3 * math.sqrt(16 * 4 / 1024)
    assert schedules.peak_lr == pytest.approx(peak) and schedules.global_batch_size == 64
    assert len(schedules) == 200
    assert schedules[0].lr == 0.0
    assert schedules[10].lr == pytest.approx(peak * 10 / 20)  # warm-up midpoint
    assert schedules[20].lr == pytest.approx(peak)
    cosine_n = 200 - 21
    k = 90
    assert schedules[21 + k].lr == pytest.approx(
        1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * k / cosine_n))
    )
    # last-layer lr: zero while frozen, then equal to the lr
    assert all(schedules[i].last_layer_lr == 0.0 for i in range(10))
    assert schedules[10].last_layer_lr == pytest.approx(schedules[10].lr) and schedules[10].lr > 0
    # weight decay and momentum: cosine over the whole run, midpoint = mean
    assert schedules[100].weight_decay == pytest.approx(0.12)
    assert schedules[100].teacher_momentum == pytest.approx(0.995)
    assert schedules[0].teacher_momentum == pytest.approx(0.99)
    # teacher temperature: linear over 31 iterations, then constant
    assert schedules[15].teacher_temp == pytest.approx(0.055)
    assert schedules[30].teacher_temp == pytest.approx(0.07) and schedules[150].teacher_temp == pytest.approx(
        0.07
    )
    # past the end: the final values
    end = schedules[10_000]
    assert (end.lr, end.weight_decay, end.teacher_momentum, end.teacher_temp) == (1e-5, 0.2, 1.0, 0.07)


def test_global_batch_size_sets_the_lr_whatever_the_world_size() -> None:
    cfg = load_config("vitb14_in21k", ["data.path=x", "train.iterations=200000"])
    for world_size in (1, 32, 64):
        assert Schedules.from_config(cfg, world_size).peak_lr == pytest.approx(1e-3, rel=0.01)
    laion = load_config("vitl14_laion", ["data.path=x", "train.iterations=200000"])
    assert Schedules.from_config(laion, 64).peak_lr == pytest.approx(3.5e-4, rel=0.01)


def test_negative_index_is_an_error() -> None:
    schedules = Schedules.from_config(load_config("tiny_cpu"))
    with pytest.raises(IndexError):
        schedules[-1]


@pytest.mark.parametrize("world_size", [1, 4])
def test_constant_lr_schedule_holds_the_scaled_peak(world_size: int) -> None:
    overrides = [
        "train.iterations=100",
        "train.batch_size_per_device=16",
        "optim.base_lr=1e-3",
        "optim.min_lr=1e-6",
        "optim.lr_schedule=constant",
        "optim.warmup_iterations=11",
        "optim.freeze_last_layer_iterations=5",
    ]
    schedules = Schedules.from_config(load_config("tiny_cpu", overrides), world_size=world_size)
    peak = 1e-3 * math.sqrt(16 * world_size / 1024)  # the sqrt rule at this global batch, min_lr ignored
    assert schedules[0].lr == 0.0 and schedules[5].lr == pytest.approx(peak * 5 / 10)
    assert np.allclose(schedules.lr[10:], peak, rtol=0, atol=1e-15)
    assert schedules[100].lr == pytest.approx(peak) and schedules[1000].last_layer_lr == pytest.approx(peak)
    assert schedules[4].last_layer_lr == 0.0 and schedules[99].last_layer_lr == pytest.approx(peak)


def test_unknown_lr_schedule_is_rejected() -> None:
    with pytest.raises(ConfigError, match="optim.lr_schedule"):
        load_config("tiny_cpu", ["optim.lr_schedule=linear"])
