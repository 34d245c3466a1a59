"""The demo's pre-training runs: config overrides, resumable time-budgeted training, run facts."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from franca.apps.demo.progress import PhaseLog, format_duration
from franca.apps.demo.settings import CUDA_BATCH_SIZE, CUDA_ITERATIONS, PRESET, DemoSettings
from franca.core.errors import CheckpointError, ConfigError
from franca.models.heads import matryoshka_prototype_counts
from franca.models.vision_transformer import ARCHITECTURES
from franca.report import load_metrics_records
from franca.train.callbacks import Callback, TimeBudget
from franca.train.checkpointing import list_checkpoints
from franca.train.config import config_to_dict, load_config
from franca.train.ssl_model import build_student_teacher
from franca.train.trainer import Trainer


@dataclass
class TrainOutcome:
    """What a (possibly resumed, possibly budget-stopped) training run left: where, how far, how long."""

    mode: str
    run_dir: Path
    iteration: int
    iterations: int
    seconds: float
    resumed_from: int
    completed: bool
    stopped_by_budget: bool
    images_per_s: float | None
    config: Any

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts of the run."""
        return {
            "mode": self.mode,
            "run_dir": str(self.run_dir),
            "iteration": self.iteration,
            "iterations": self.iterations,
            "completed": self.completed,
            "stopped_by_time_budget": self.stopped_by_budget,
            "resumed_from_iteration": self.resumed_from,
            "train_seconds_this_invocation": self.seconds,
            "images_per_s": self.images_per_s,
            **dino_plateau(self.run_dir, self.config),
        }


def _round_to(value: float, multiple: int, minimum: int) -> int:
    return max(minimum, int(round(value / multiple)) * multiple)


def training_overrides(
    settings: DemoSettings, data_path: Path, run_dir: Path, device_type: str, mode: str = "slice"
) -> list[str]:
    """Dotlist overrides of the tiny_cpu preset for this demo run (data, size, length, batch, heads mode).

    The schedule lengths (warmups, freezing of the last layer) follow the number of iterations in the preset's
    proportions (:func:`franca.train.config.load_config` scales them); on CUDA the batch and the run are larger.
    """
    preset = load_config(PRESET)
    cuda = device_type == "cuda"
    iterations = settings.iterations or (CUDA_ITERATIONS if cuda else preset.train.iterations)
    batch = settings.batch_size or (CUDA_BATCH_SIZE if cuda else preset.train.batch_size_per_device)
    if iterations < 1 or batch < 1:
        raise ConfigError(f"--iterations and the batch size must be >= 1 (got {iterations} and {batch})")
    patch = preset.model.patch_size
    global_size = _round_to(settings.size, patch, patch)
    local_size = _round_to(settings.size / 2, patch, patch)
    chunk = min(iterations, max(20, math.ceil(iterations / 8)))  # training runs (and checkpoints) in chunks
    overrides = [
        f"data.path={data_path}",
        f"train.output_dir={run_dir}",
        f"train.seed={settings.seed}",
        f"train.iterations={iterations}",
        f"train.batch_size_per_device={batch}",
        f"train.checkpoint_every={chunk}",
        f"train.log_every={max(1, min(preset.train.log_every, iterations // 20 or 1))}",
        f"model.img_size={global_size}",
        f"crops.global_size={global_size}",
        f"crops.local_size={local_size}",
        f"heads.mode={mode}",
    ]
    if cuda:  # the tiny model outruns the CPU pipeline: workers only crop and flip, the GPU does the rest
        overrides.append(f"train.num_workers={max(1, min(8, (os.cpu_count() or 2) - 1))}")
        overrides.append("crops.augment_on_device=true")
    return overrides + list(settings.overrides)


_BOOKKEEPING_KEYS = ("output_dir", "num_workers", "log_every", "keep_last")


def _comparable(config_dict: dict[str, Any]) -> dict[str, Any]:
    train = {k: v for k, v in config_dict["train"].items() if k not in _BOOKKEEPING_KEYS}
    return {**config_dict, "train": train}


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(dict.fromkeys([*old, *new])):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{prefix[:-1]}: {old!r} in the run, {new!r} now"


def check_resumable(run_dir: Path, config: Any) -> None:
    """Raise ConfigError when ``run_dir`` holds checkpoints of a run with other settings (it would resume wrongly)."""
    saved = run_dir / "config.yaml"
    if not list_checkpoints(run_dir) or not saved.is_file():
        return
    try:
        old = config_to_dict(load_config(saved))
    except ConfigError as error:
        raise ConfigError(
            f"{saved} cannot be read ({error}); delete {run_dir} to start the run afresh"
        ) from None
    difference = _first_difference(_comparable(old), _comparable(config_to_dict(config)))
    if difference:
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({difference}); use another --output-dir or delete "
            f"{run_dir} to train afresh"
        )


def train_with_budget(
    config: Any, run_dir: Path, budget_s: float, log: PhaseLog, progress: bool = True, mode: str = "slice"
) -> TrainOutcome:
    """Train ``config`` into ``run_dir`` within ``budget_s`` seconds (:class:`~franca.train.callbacks.TimeBudget`).

    The run stops when its next step would end past the budget (the first step always runs), with a checkpoint and
    exported backbone of the iteration reached, so a re-run continues the schedule; a line is logged at every
    checkpoint. A run directory with checkpoints of the same settings is resumed (a finished run is not touched).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    check_resumable(run_dir, config)
    total = config.train.iterations
    checkpoints = list_checkpoints(run_dir)
    start_iteration = checkpoints[-1][0] if checkpoints else 0
    backbone = run_dir / "teacher_backbone.safetensors"
    if start_iteration >= total and backbone.is_file():
        log(f"train[{mode}]: {run_dir} is already trained ({total} iterations); reusing it")
        return _outcome(mode, run_dir, config, start_iteration, start_iteration)
    if start_iteration:
        log(f"train[{mode}]: resuming {run_dir} at iteration {start_iteration}/{total}")
    started = time.perf_counter()
    watchers = [TimeBudget(budget_s), _ChunkLog(log, mode, total)]
    result = Trainer(config, run_dir, progress=progress, callbacks=watchers).fit()
    if result.stopped is not None:
        log(
            f"train[{mode}]: time budget of {format_duration(budget_s)} used up at iteration {result.iteration}/"
            f"{total}; evaluating this checkpoint (the schedule is cut short; re-run the same command to continue "
            "training)"
        )
    seconds = time.perf_counter() - started
    return _outcome(
        mode, run_dir, config, result.iteration, start_iteration, seconds, result.stopped is not None
    )


def _outcome(
    mode: str,
    run_dir: Path,
    config: Any,
    iteration: int,
    resumed_from: int,
    seconds: float = 0.0,
    stopped_by_budget: bool = False,
) -> TrainOutcome:
    """The outcome of a run that reached ``iteration`` (completed when that is its last), with its median rate."""
    total = config.train.iterations
    return TrainOutcome(
        mode,
        run_dir,
        iteration,
        total,
        seconds,
        resumed_from,
        iteration >= total,
        stopped_by_budget,
        _last_rate(run_dir),
        config,
    )


class _ChunkLog(Callback):
    """One line per checkpoint: iteration, loss, images/s, time so far and left."""

    def __init__(self, log: PhaseLog, mode: str, total: int) -> None:
        self.log, self.mode, self.total = log, mode, total
        self.started, self.first, self.last = 0.0, 0, {}

    def on_fit_start(self, trainer: Any) -> None:
        self.started, self.first = time.perf_counter(), trainer.iteration

    def on_log(self, trainer: Any, record: dict[str, Any]) -> None:
        self.last = record

    def on_checkpoint(self, trainer: Any, path: Path | None) -> None:
        iteration, elapsed = trainer.iteration, time.perf_counter() - self.started
        eta = elapsed / max(iteration - self.first, 1) * (self.total - iteration)
        loss, rate = self.last.get("loss"), self.last.get("images_per_s")
        loss_text = f", loss {loss:.3f}" if isinstance(loss, float) and math.isfinite(loss) else ""
        rate_text = f", {rate:.1f} img/s" if isinstance(rate, float) else ""
        left = f", ~{format_duration(eta)} left" if iteration < self.total else ""
        self.log(
            f"train[{self.mode}]: iteration {iteration}/{self.total}{loss_text}{rate_text}, "
            f"{format_duration(elapsed)} so far{left}"
        )


# A final DINO loss within this fraction of its uniform value sum_j ln K_j counts as "still on the plateau".
PLATEAU_FRACTION = 0.02


def uniform_dino_losses(config: Any) -> list[float]:
    """``ln K_j`` per level: the DINO loss of a student that predicts the uniform distribution (any targets)."""
    heads = config.heads
    if heads.mode == "dinov2":
        return [math.log(heads.n_prototypes)]
    embed_dim = config.model.embed_dim or ARCHITECTURES[config.model.arch]["embed_dim"]
    widths = heads.level_widths(embed_dim)
    return [math.log(k) for k in matryoshka_prototype_counts(widths, heads.n_prototypes)]


def dino_plateau(run_dir: Path, config: Any, last: int = 5) -> dict[str, Any]:
    """How far the DINO loss got below its uniform value ``sum_j ln K_j`` (median of the last ``last`` logs).

    A student whose predictions are uniform scores exactly ``sum_j ln K_j`` whatever the targets, so a final loss
    at that value means the run has not started to learn image-level clusters (docs/demo-learning.md).
    """
    uniform = sum(uniform_dino_losses(config))
    path = run_dir / "metrics.jsonl"
    values = [r.get("dino_loss") for r in load_metrics_records(path)] if path.is_file() else []
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)][-last:]
    final = float(np.median(values)) if values else None
    return {
        "uniform_dino_loss": uniform,
        "final_dino_loss": final,
        "dino_nats_below_uniform": None if final is None else uniform - final,
        "dino_on_plateau": None if final is None else uniform - final < PLATEAU_FRACTION * uniform,
    }


def _last_rate(run_dir: Path) -> float | None:
    """Median images/s over the logged steps of a run (None when nothing was logged)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = [r.get("images_per_s") for r in load_metrics_records(path) if r.get("iteration", 0) > 1]
    rates = [float(r) for r in rates if isinstance(r, (int, float)) and math.isfinite(r)]
    return float(np.median(rates)) if rates else None


def existing_run(run_dir: Path, log: PhaseLog, mode: str = "slice") -> TrainOutcome:
    """The run in ``run_dir`` as it is (``--eval-only``): its own config.yaml and exported backbone, no training."""
    config_path, backbone = run_dir / "config.yaml", run_dir / "teacher_backbone.safetensors"
    checkpoints = list_checkpoints(run_dir)
    if not (config_path.is_file() and backbone.is_file() and checkpoints):
        raise CheckpointError(
            f"--eval-only: {run_dir} holds no trained run (config.yaml, checkpoints/, teacher_backbone.safetensors); "
            "run the demo without --eval-only first"
        )
    config = load_config(config_path)
    iteration, total = checkpoints[-1][0], config.train.iterations
    log(f"train[{mode}]: --eval-only: evaluating {run_dir} as it is (iteration {iteration}/{total})")
    return _outcome(mode, run_dir, config, iteration, iteration)


def obtain_run(
    settings: DemoSettings, config: Any, run_dir: Path, log: PhaseLog, mode: str = "slice"
) -> TrainOutcome:
    """Train (or resume) ``config`` in ``run_dir`` within the time budget, or take the run as it is (eval-only)."""
    if settings.eval_only:
        return existing_run(run_dir, log, mode)
    return train_with_budget(config, run_dir, settings.time_budget_min * 60.0, log, settings.progress, mode)


def random_init_backbone(config: Any) -> nn.Module:
    """The backbone at the run's initial weights, built exactly as the trainer builds it (seed, then the pair)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        _, teacher = build_student_teacher(config)
    backbone = teacher.backbone
    backbone.requires_grad_(False)
    return backbone.eval()
