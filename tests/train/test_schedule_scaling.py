"""A run length changed on the command line carries the preset's schedule lengths with it, in proportion."""

from __future__ import annotations

import logging

import pytest

from franca.core.errors import ConfigError
from franca.train.config import load_config


def _lengths(config):
    return (
        config.optim.warmup_iterations,
        config.optim.freeze_last_layer_iterations,
        config.loss.teacher_temp_warmup_iterations,
    )


def test_a_short_tiny_cpu_run_scales_its_schedules_with_one_message(caplog):
    preset = load_config("tiny_cpu")
    assert preset.train.iterations == 1800 and _lengths(preset) == (80, 80, 220)
    with caplog.at_level(logging.INFO, logger="franca.train.config"):
        config = load_config("tiny_cpu", ["train.iterations=20"])
    # by hand: 80 * 20 / 1800 = 0.89 -> 1 (at least 1), 80 -> 1, 220 * 20 / 1800 = 2.44 -> 2
    assert _lengths(config) == (1, 1, 2)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and "optim.warmup_iterations 80 -> 1" in messages[0]


def test_a_longer_run_scales_up_and_explicit_lengths_are_kept():
    assert _lengths(load_config("tiny_cpu", ["train.iterations=3600"])) == (160, 160, 440)
    config = load_config("tiny_cpu", ["train.iterations=60", "optim.warmup_iterations=10"])
    # 10 as given; 80 * 60 / 1800 = 2.67 -> 3; 220 * 60 / 1800 = 7.33 -> 7
    assert _lengths(config) == (10, 3, 7)


def test_an_explicit_length_longer_than_the_run_still_fails_naming_the_key():
    with pytest.raises(ConfigError, match="optim.warmup_iterations"):
        load_config("tiny_cpu", ["train.iterations=20", "optim.warmup_iterations=30"])


def test_without_a_new_run_length_nothing_is_scaled():
    assert _lengths(load_config("tiny_cpu", ["optim.base_lr=1e-3"])) == (80, 80, 220)
    assert _lengths(load_config("tiny_cpu", ["train.iterations=1800"])) == (80, 80, 220)
