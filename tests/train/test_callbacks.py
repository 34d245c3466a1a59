"""Trainer callbacks: the hooks run when they say, a time budget stops a run with a checkpoint it resumes from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_trainer import TINY

from franca.train.callbacks import Callback, TimeBudget
from franca.train.config import load_config
from franca.train.trainer import train


def _config(image_dir: Path, *extra: str):
    return load_config("tiny_cpu", [*TINY, f"data.path={image_dir}", *extra])


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_fit_start(self, trainer) -> None:
        self.events.append(("start", trainer.iteration))

    def on_step_end(self, trainer, logs) -> None:
        self.events.append(("step", trainer.iteration, "loss" in logs))

    def on_log(self, trainer, record) -> None:
        record["watched"] = record["iteration"] * 10  # a callback's value goes into metrics.jsonl
        self.events.append(("log", record["iteration"]))

    def on_checkpoint(self, trainer, path) -> None:
        self.events.append(("checkpoint", trainer.iteration, path.name))

    def on_fit_end(self, trainer, result) -> None:
        self.events.append(("end", result.iteration, result.stopped))


def test_hooks_run_in_order(tmp_path: Path, image_dir: Path) -> None:
    recorder = Recorder()
    extra = ("train.iterations=4", "train.checkpoint_every=2", "train.log_every=2")
    train(_config(image_dir, *extra), tmp_path / "run", progress=False, callbacks=[recorder])
    assert recorder.events == [
        ("start", 0),
        ("step", 1, True),
        ("log", 1),  # the first iteration is always logged
        ("step", 2, True),
        ("log", 2),
        ("checkpoint", 2, "checkpoint_00000002.pt"),
        ("step", 3, True),
        ("step", 4, True),
        ("log", 4),
        ("checkpoint", 4, "checkpoint_00000004.pt"),
        ("end", 4, None),
    ]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["watched"] for r in records] == [10, 20, 40]


class FakeClock:
    """Each reading advances one second: the budget reads it once at the start and once per step."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_a_time_budget_stops_with_a_checkpoint_that_resumes_exactly(tmp_path: Path, image_dir: Path) -> None:
    extra = ("train.iterations=6", "train.checkpoint_every=100")
    straight = train(_config(image_dir, *extra), tmp_path / "straight", progress=False)
    # after step k, elapsed = k s and the next step is predicted to end at k + 1 s: past 3.5 s first at k = 3
    budget = TimeBudget(3.5, clock=FakeClock())
    stopped = train(_config(image_dir, *extra), tmp_path / "budget", progress=False, callbacks=[budget])
    assert stopped.iteration == 3 and "time budget" in stopped.stopped
    assert (tmp_path / "budget" / "checkpoints" / "checkpoint_00000003.pt").is_file()
    resumed = train(_config(image_dir, *extra), tmp_path / "budget", progress=False)
    assert resumed.iteration == 6 and resumed.stopped is None
    a = torch.load(straight.checkpoint_path, weights_only=True)["teacher"]
    b = torch.load(resumed.checkpoint_path, weights_only=True)["teacher"]
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_time_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        TimeBudget(0)
