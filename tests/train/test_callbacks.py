"""Trainer callbacks: the hooks run when they say, a time budget stops a run with a checkpoint it resumes from, a
periodic evaluation measures the teacher backbone at the iterations it names."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_trainer import TINY
from torch import nn

from franca.train.callbacks import Callback, PeriodicEvaluation, TimeBudget
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


# ------------------------------------------------------------------------------------------- periodic evaluation
class _Teacher(nn.Module):
    """A teacher with a backbone; ``events`` records the FSDP2-style gathers around the evaluation."""

    def __init__(self, sharded: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
        self.events: list[str] = []
        if sharded:
            self.unshard = lambda: self.events.append("unshard")
            self.reshard = lambda: self.events.append("reshard")


def _fake_trainer(is_main: bool = True, sharded: bool = False) -> SimpleNamespace:
    records: list[dict] = []
    return SimpleNamespace(
        teacher=_Teacher(sharded),
        device=torch.device("cpu"),
        is_main=is_main,
        iteration=0,
        records=records,
        write_record=records.append,
    )


def _drive(callback: Callback, trainer: SimpleNamespace, steps: int, skipped: tuple[int, ...] = ()) -> None:
    """What Trainer.fit does with a callback: start, ``steps`` step ends (those in ``skipped``: all-empty steps)."""
    callback.on_fit_start(trainer)
    for _ in range(steps):
        trainer.iteration += 1
        logs = {"skipped_empty_batch": True} if trainer.iteration in skipped else {"loss": 1.0}
        callback.on_step_end(trainer, logs)
    callback.on_fit_end(trainer, None)


class _Probe:
    """An evaluation that records what it saw and returns the iteration (read from the trainer) as its number."""

    def __init__(self, trainer: SimpleNamespace) -> None:
        self.trainer, self.seen = trainer, []

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        self.seen.append((self.trainer.iteration, backbone.training, torch.is_grad_enabled()))
        self.trainer.teacher.events.append("evaluate")
        torch.rand(3)  # evaluations may draw random numbers (a DataLoader does): training must not notice
        return {"score": float(self.trainer.iteration), "half": self.trainer.iteration / 2}


def test_periodic_evaluation_every_2_of_5_iterations_runs_at_2_4_and_the_end() -> None:
    trainer = _fake_trainer()
    probe = _Probe(trainer)
    trainer.teacher.backbone.train()
    state = torch.get_rng_state()
    _drive(PeriodicEvaluation(2, probe), trainer, steps=5)
    assert probe.seen == [(2, False, False), (4, False, False), (5, False, False)]  # eval mode, no gradients
    assert trainer.teacher.backbone.training  # its mode is back
    assert torch.equal(torch.get_rng_state(), state)  # the evaluations' random draws were undone
    assert [(r["iteration"], r["eval_score"], r["eval_half"]) for r in trainer.records] == [
        (2, 2.0, 1.0),
        (4, 4.0, 2.0),
        (5, 5.0, 2.5),
    ]
    assert all(r["eval_time_s"] >= 0 for r in trainer.records)


def test_periodic_evaluation_does_not_repeat_the_last_iteration_or_evaluate_a_fit_without_steps() -> None:
    trainer = _fake_trainer()
    callback = PeriodicEvaluation(2, _Probe(trainer), name="knn")
    _drive(callback, trainer, steps=4)
    _drive(callback, trainer, steps=0)  # a finished run started again: no step, nothing new to measure
    assert [iteration for iteration, _ in callback.history] == [2, 4]
    assert [list(r) for r in trainer.records] == [["iteration", "knn_score", "knn_half", "knn_time_s"]] * 2


def test_periodic_evaluation_waits_for_a_step_that_ran_and_only_rank_0_writes() -> None:
    trainer = _fake_trainer(is_main=False)
    probe = _Probe(trainer)
    _drive(PeriodicEvaluation(2, probe), trainer, steps=5, skipped=(1, 2))
    # step 2 ran no teacher forward (FSDP2 may not be ready): its evaluation comes after step 3
    assert [seen[0] for seen in probe.seen] == [3, 4, 5]
    assert trainer.records == []  # every rank evaluates, rank 0 writes


def test_periodic_evaluation_gathers_a_sharded_teacher_around_the_call() -> None:
    trainer = _fake_trainer(sharded=True)
    _drive(PeriodicEvaluation(3, _Probe(trainer)), trainer, steps=3)
    assert trainer.teacher.events == ["unshard", "evaluate", "reshard"]


def test_periodic_evaluation_needs_a_positive_period() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        PeriodicEvaluation(0, lambda backbone: {})


def test_periodic_evaluation_in_a_training_sees_the_teacher_and_logs_beside_the_steps(
    tmp_path: Path, image_dir: Path
) -> None:
    def parameter_sum(backbone: nn.Module) -> dict[str, float]:
        return {"sum": float(sum(p.double().sum() for p in backbone.parameters()))}

    extra = ("train.iterations=5", "train.checkpoint_every=5", "train.log_every=2")
    callback = PeriodicEvaluation(2, parameter_sum, name="probe")
    result = train(_config(image_dir, *extra), tmp_path / "run", progress=False, callbacks=[callback])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    probes = [(r["iteration"], r["probe_sum"]) for r in records if "probe_sum" in r]
    assert [iteration for iteration, _ in probes] == [2, 4, 5]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 4, 5]  # the step records are unchanged
    teacher = torch.load(result.checkpoint_path, weights_only=True)["teacher"]
    backbone = [value for key, value in teacher.items() if key.startswith("backbone.")]
    assert probes[-1][1] == pytest.approx(float(sum(v.double().sum() for v in backbone)), rel=1e-12)
