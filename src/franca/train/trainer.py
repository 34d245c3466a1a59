"""The Franca pre-training loop.

It wires the pieces that live elsewhere: the networks and the loss (:mod:`franca.train.ssl_model`), the input pipeline
(:mod:`franca.train.data`), schedules, parameter groups and EMA (:mod:`franca.train.schedules`, ``optim``, ``ema``)
and the run directory (:mod:`franca.train.checkpointing`). One process or many (``torchrun``); CPU in fp32, CUDA in
bf16 autocast by default.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from franca.core import distributed as dist_utils
from franca.core import metrics_log
from franca.core.errors import CheckpointError, ConfigError, FrancaError
from franca.core.progress import ProgressBar
from franca.data.batch import TrainBatch
from franca.models.files import dcp_load, is_sharded_checkpoint, read_sharded_checkpoint
from franca.models.meta_init import InitRecorder
from franca.train.callbacks import Callback
from franca.train.checkpointing import (
    RunLock,
    ShardedCheckpointWriter,
    export_iterations,
    export_teacher,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    native_teacher_state,
    official_teacher_state,
    remove_stale_temporaries,
    rotate_checkpoints,
    save_checkpoint,
    sharded_checkpoint_shapes,
    use_sharded_checkpoints,
)
from franca.train.config import TrainConfig, config_to_dict, resolve_batch_sizes, save_config
from franca.train.data import build_device_augmentation, build_train_loader, derived_seed
from franca.train.ema import ema_update_, pair_parameters
from franca.train.optim import apply_schedules, build_optimizer, build_param_groups, clip_grad_norm_per_module
from franca.train.parallel import (
    full_model_state,
    full_optimizer_state,
    is_sharded,
    load_full_model_state,
    load_full_optimizer_state,
    load_sharded_model_state,
    load_sharded_optimizer_state,
    local_tensor,
    parallelize,
    sharded_model_state,
    sharded_optimizer_state,
)
from franca.train.schedules import Schedules
from franca.train.ssl_model import FrancaLoss, build_student_teacher

logger = logging.getLogger(__name__)


class TrainingError(FrancaError):
    """Training cannot go on (for example the loss stayed non-finite); the message names the step and checkpoint."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    output_dir: Path
    iteration: int
    last_metrics: dict[str, Any] = field(default_factory=dict)
    backbone_path: Path | None = None
    heads_path: Path | None = None
    checkpoint_path: Path | None = None
    skipped_images: int = 0  # unreadable images skipped by this fit (all ranks)
    stopped: str | None = (
        None  # why a callback ended the fit early (a checkpoint of ``iteration`` was written)
    )


@dataclass
class _Window:
    """Counts of the fit so far and of the images since the last logged record."""

    start: float = field(default_factory=time.perf_counter)
    images: int = 0
    usable_total: int = 0
    skipped_total: int = 0

    def add(self, usable: int, skipped: int) -> None:
        self.images += usable
        self.usable_total += usable
        self.skipped_total += skipped


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``auto`` is bf16 on CUDA and none (fp32) on CPU, where bf16 is ~20x slower."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def init_distributed(backend: str = "auto") -> torch.device:
    """Join the process group described by torchrun's environment (if any) and pick this process's device.

    Under ``torchrun`` a group is formed at every world size, one process included, so that
    ``distributed.strategy`` (DDP or FSDP2 with its mixed-precision policy) applies on one GPU as on many. A process
    group that already exists (created by the caller) is used as it is.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun (or any env:// launcher) sets these, also for a single process
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if (world_size > 1 or launched) and not dist_utils.is_enabled():
        import torch.distributed as dist

        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend)
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rng_state(device: torch.device) -> dict[str, Any]:
    """The model-side random state (stochastic depth). Data randomness is derived from sample positions instead."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def use_meta_init(config: TrainConfig, world_size: int) -> bool:
    """Whether to build the networks on the meta device (``distributed.init_device``; auto: FSDP on several ranks
    without pretrained weights, which are loaded into real tensors during the build)."""
    if config.distributed.init_device == "auto":
        pretrained = config.model.pretrained_backbone or config.model.pretrained_heads
        return config.distributed.strategy == "fsdp" and world_size > 1 and not pretrained
    return config.distributed.init_device == "meta"


def _gathered_rng_states(device: torch.device) -> dict[str, dict[str, Any]]:
    """Every rank's :func:`_rng_state`, keyed ``rank<r>`` (a collective; each rank gets them all)."""
    state = _rng_state(device)
    if not dist_utils.is_enabled() or dist_utils.get_world_size() == 1:
        return {f"rank{dist_utils.get_rank()}": state}
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist_utils.get_world_size()
    dist.all_gather_object(gathered, state)
    return {f"rank{rank}": rank_state for rank, rank_state in enumerate(gathered)}


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"model.arch": ..., "heads.n_prototypes": ...}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """Franca pre-training of ``config`` into ``output_dir`` (resumed automatically from its latest checkpoint)."""

    def __init__(
        self,
        config: TrainConfig,
        output_dir: str | os.PathLike | None = None,
        progress: bool = True,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.config = config
        self.callbacks = list(callbacks)
        self._stop_reason: str | None = None
        self.output_dir = Path(output_dir or config.train.output_dir)
        self.progress = progress
        self.device = init_distributed(config.distributed.backend)
        self.rank, self.world_size = dist_utils.get_rank(), dist_utils.get_world_size()
        self.is_main = self.rank == 0
        self.autocast_dtype = resolve_precision(config.train.precision, self.device)
        self.batch_size, self.global_batch_size = resolve_batch_sizes(config.train, self.world_size)

        torch.manual_seed(config.train.seed)  # the same initial weights on every rank
        meta_init = None
        self.built_on_meta = use_meta_init(config, self.world_size)
        if self.built_on_meta:  # shapes only; each rank materialises its shards below
            with InitRecorder() as meta_init, torch.device("meta"):
                self.student, self.teacher = build_student_teacher(config)
            meta_init.bind(self.student)
        else:
            self.student, self.teacher = build_student_teacher(config)
            self.student.to(self.device)
            self.teacher.to(self.device)
        self.loss_fn = FrancaLoss(
            config, self.student.dino_head.prototype_counts, self.student.ibot_head.prototype_counts
        ).to(self.device)
        self.student_forward = parallelize(
            self.student,
            self.teacher,
            config.distributed.strategy,
            self.device,
            self.autocast_dtype,
            reshard_after_forward=config.distributed.fsdp_reshard_after_forward,
            activation_checkpointing=config.train.activation_checkpointing,
            compile_blocks=config.train.compile,
            meta_init=meta_init,
        )
        self.param_groups = build_param_groups(
            self.student.parts(),
            patch_embed_lr_mult=config.optim.patch_embed_lr_mult,
            layerwise_decay=config.optim.layerwise_decay,
            n_blocks=self.student.backbone.n_blocks,
        )
        self.optimizer = build_optimizer(self.param_groups, config.optim.adamw_betas, self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None
        self.schedules = Schedules.from_config(config, self.world_size)
        teacher_params, student_params = pair_parameters(self.teacher, self.student)
        self.ema_pairs = (
            [local_tensor(p) for p in teacher_params],
            [local_tensor(p) for p in student_params],
        )
        self.checkpoint_writer = (
            ShardedCheckpointWriter(self.output_dir, config.train.keep_last, config.train.checkpoint_async)
            if use_sharded_checkpoints(config.train.checkpoint_format, is_sharded(self.student))
            else None
        )
        self.device_augment = build_device_augmentation(config) if config.crops.augment_on_device else None
        self.run_lock = RunLock(self.output_dir)  # taken by rank 0 while fit() runs
        self.iteration = 0
        # Between fit(stop_at=...) calls of one Trainer (the demo trains in chunks): the iteration the state in
        # memory was last saved at or loaded from, and the live data iterator with the iteration it yields next, so
        # that the next call neither re-reads the checkpoint it just wrote nor restarts the data workers.
        self._checkpointed_iteration: int | None = None
        self._data_iterator: tuple[int, Any] | None = None
        self.consecutive_nonfinite = 0
        self._save_pending = False  # a checkpoint that was due while the loss was not finite
        self.last_checkpoint: Path | None = (
            None  # the newest checkpoint this Trainer wrote (rank 0 knows its path)
        )
        # seed the per-rank model randomness (stochastic depth) differently on each rank
        torch.manual_seed(config.train.seed + 1 + self.rank)

    # ------------------------------------------------------------------ setup
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The full training state with consolidated tensors (a collective under FSDP: call it on every rank)."""
        return {
            "iteration": self.iteration,
            "student": full_model_state(self.student),
            "teacher": official_teacher_state(full_model_state(self.teacher)),
            "loss": {k: v.detach().cpu() for k, v in self.loss_fn.state_dict().items()},
            "optimizer": full_optimizer_state(self.student, self.optimizer),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng_per_rank": _gathered_rng_states(self.device),
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "world_size": self.world_size,
            "config": config_to_dict(self.config),
        }

    def sharded_state_dict(self, with_rng: bool = True) -> dict[str, Any]:
        """The training state with this rank's shards (DTensors under FSDP), laid out like :meth:`state_dict`.

        What ``torch.distributed.checkpoint`` saves (every rank its shards) and loads in place (resharding to this
        world size). Each rank's random state goes under its own key; ``with_rng=False`` leaves them out (a resume
        on another world size, where they do not apply).
        """
        state: dict[str, Any] = {
            "iteration": self.iteration,
            "student": sharded_model_state(self.student),
            "teacher": official_teacher_state(sharded_model_state(self.teacher)),
            "loss": dict(self.loss_fn.state_dict()),
            "optimizer": sharded_optimizer_state(self.student, self.optimizer),
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "world_size": self.world_size,
            "config": config_to_dict(self.config),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if with_rng:
            state["rng_per_rank"] = {f"rank{self.rank}": _rng_state(self.device)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, whatever the world size and strategy it was saved with."""
        load_full_model_state(self.student, state["student"])
        load_full_model_state(self.teacher, native_teacher_state(state["teacher"]))
        self.loss_fn.load_state_dict(state.get("loss", {}))  # a consolidated folder has no entry when empty
        load_full_optimizer_state(self.student, self.optimizer, state["optimizer"])
        self._restore_counters_and_rng(state)

    def _restore_counters_and_rng(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        rng = state.get("rng_per_rank", {}).get(f"rank{self.rank}", state.get("rng"))  # "rng": older files
        if rng is not None and int(state.get("world_size", 1)) == self.world_size:
            _set_rng_state(rng, self.device)
        else:  # another world size: the data order stays exact, the model randomness is re-seeded per rank
            torch.manual_seed(self.config.train.seed + 1 + self.rank + 1000 * self.iteration)

    def load_sharded_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a sharded checkpoint folder in place: each rank reads only the slices it holds (any world size)."""
        info: dict[str, Any] = {"iteration": 0, "world_size": 0}
        dcp_load(info, path)  # the saved world size decides whether the per-rank random states apply
        state = self.sharded_state_dict(with_rng=int(info["world_size"]) == self.world_size)
        state.pop("config")
        dcp_load(state, path)
        load_sharded_model_state(self.student, state["student"])
        load_sharded_model_state(self.teacher, native_teacher_state(state["teacher"]))
        self.loss_fn.load_state_dict(state["loss"])
        load_sharded_optimizer_state(self.student, self.optimizer, state["optimizer"])
        self._restore_counters_and_rng(state)

    def resume(self) -> Path | None:
        """Load the newest checkpoint of the run directory, if any; returns its path.

        Refuses (one line) a checkpoint of another network than the config's, and a checkpoint that cannot be read,
        naming the previous checkpoint that a resume could use instead.
        """
        path = latest_checkpoint(self.output_dir)
        if path is None:
            return None
        try:
            if is_sharded_checkpoint(path):
                saved = read_sharded_checkpoint(path, keys=("config",)).get("config")
                self._check_same_network(path, sharded_checkpoint_shapes(path, "student"), saved)
                self.load_sharded_checkpoint(path)
            else:
                state = load_checkpoint(path)
                shapes = {key: tuple(value.shape) for key, value in state["student"].items()}
                self._check_same_network(path, shapes, state.get("config"))
                self.load_state_dict(state)
        except CheckpointError as error:
            raise CheckpointError(f"{error}{self._previous_checkpoint_hint(path)}") from None
        self._checkpointed_iteration = self.iteration
        return path

    def _previous_checkpoint_hint(self, broken: Path) -> str:
        older = [path for _, path in list_checkpoints(self.output_dir) if path != broken]
        if not older:
            return "; no older checkpoint exists: start again in a new output directory"
        return (
            f"; the previous checkpoint {older[-1].name} is intact: move {broken.name} out of "
            f"{broken.parent} and run the same command again to resume from it"
        )

    def _check_same_network(
        self, path: Path, saved_shapes: dict[str, tuple[int, ...]], saved_config: dict[str, Any] | None
    ) -> None:
        """Raise ConfigError when the checkpoint's student tensors do not fit this config's networks, naming the
        model/heads keys whose values differ from the run's."""
        current = {key: tuple(value.shape) for key, value in sharded_model_state(self.student).items()}
        mismatched = sorted(set(current) ^ set(saved_shapes)) or sorted(
            key for key in current if current[key] != saved_shapes[key]
        )
        if not mismatched:
            return
        before = _flatten(saved_config or {})
        now = _flatten(config_to_dict(self.config))
        keys = [
            f"{key}={before[key]} in the run but {now[key]} now"
            for key in sorted(now)
            if key.startswith(("model.", "heads."))
            and "pretrained" not in key
            and before.get(key, now[key]) != now[key]
        ]
        tensor = mismatched[0]
        what = "; ".join(keys) or (
            f"tensor {tensor} is {saved_shapes.get(tensor, 'absent')} in the checkpoint, {current.get(tensor, 'absent')} now"
        )
        raise ConfigError(
            f"{self.output_dir} holds a run of another network ({what}; checkpoint {path.name}): give the run's "
            "values to continue it, or another output directory to start a new run (with "
            f"model.pretrained_backbone={self.output_dir / 'teacher_backbone.safetensors'} to start from its weights)"
        )

    def _state_is_latest_checkpoint(self) -> bool:
        """Whether the state in memory is the newest checkpoint on disk (this Trainer wrote or loaded it)."""
        checkpoints = list_checkpoints(self.output_dir)
        return bool(checkpoints) and checkpoints[-1][0] == self._checkpointed_iteration == self.iteration

    # ------------------------------------------------------------------ one step
    def forward_backward(self, batch: TrainBatch) -> tuple[dict[str, Any], bool]:
        """Teacher and student forward, the losses, and (when finite on every rank) the backward pass.

        Returns the logs and whether gradients were computed; a non-finite loss on any rank skips the backward
        everywhere, so that ranks never disagree about taking a step.
        """
        schedule = self.schedules[self.iteration]
        batch = batch.to(self.device)
        if self.device_augment is not None and batch.global_crops.dtype == torch.uint8:
            # one generator per (rank, iteration): the same crops after a resume, different ones on each rank
            generator = torch.Generator(self.device)
            generator.manual_seed(
                derived_seed(self.config.train.seed, "device-augment", self.rank, self.iteration)
            )
            batch = self.device_augment(batch, generator)
        with torch.no_grad(), self.autocast():
            teacher_out = self.teacher(batch, teacher=True)
        with self.autocast():
            student_out = self.student_forward(batch)
        losses = self.loss_fn(student_out, teacher_out, batch, schedule.teacher_temp)
        finite = torch.isfinite(losses.total.detach()).float()
        dist_utils.all_reduce_sum(finite)
        logs: dict[str, Any] = {
            "lr": schedule.lr,
            "wd": schedule.weight_decay,
            "momentum": schedule.teacher_momentum,
            "teacher_temp": schedule.teacher_temp,
            "last_layer_lr": schedule.last_layer_lr,
            "masked_patches": int(batch.masked_indices.numel()),
            **losses.log_values(),
        }
        if int(finite.item()) != self.world_size:
            return logs, False
        if self.scaler is not None:
            self.scaler.scale(losses.total).backward()
        else:
            losses.total.backward()
        return logs, True

    def train_step(self, batch: TrainBatch) -> dict[str, Any]:
        """One iteration: forward and backward, per-module clipping, the optimizer step and the teacher EMA."""
        schedule = self.schedules[self.iteration]
        apply_schedules(self.optimizer, schedule.lr, schedule.weight_decay, schedule.last_layer_lr)
        logs, ok = self.forward_backward(batch)
        if not ok:
            self.optimizer.zero_grad(set_to_none=True)
            self.consecutive_nonfinite += 1
            logs["skipped_nonfinite"] = True
            return logs
        self.consecutive_nonfinite = 0
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norms = clip_grad_norm_per_module(self.student.parts(), self.config.optim.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            ema_update_(self.ema_pairs[0], self.ema_pairs[1], schedule.teacher_momentum)
        logs.update({f"grad_norm_{name}": value for name, value in norms.items()})
        return logs

    # ------------------------------------------------------------------ loop
    def _write_metrics(self, record: dict[str, Any]) -> None:
        """Append one record to the run's ``metrics.jsonl`` (format: :mod:`franca.core.metrics_log`)."""
        metrics_log.append_record(self.output_dir / "metrics.jsonl", record)

    def _truncate_metrics(self, start_iteration: int) -> None:
        """Drop the lines a killed run logged after its last checkpoint, so the curve has no duplicates, and the
        torn lines (a full disk or power loss cut a write short), so that every later run can read the file."""
        metrics_log.truncate_records(self.output_dir / "metrics.jsonl", start_iteration)

    def _save(self) -> Path | None:
        """Write the checkpoint of this iteration and the teacher exports (every rank takes part; a failure on any
        rank, such as a full disk, raises on every rank)."""
        path = None
        if self.checkpoint_writer is not None:
            # every rank writes its shards; the exports need the full teacher (gathered on rank 0)
            path = self.checkpoint_writer.save(self.iteration, self.sharded_state_dict())
            teacher = official_teacher_state(full_model_state(self.teacher))
        else:
            state = self.state_dict()  # consolidated on every rank's CPU (a collective under FSDP)
            teacher = state["teacher"]
            path = dist_utils.run_on_main(
                lambda: save_checkpoint(self.output_dir, self.iteration, state, self.config.train.keep_last)
            )
        self._export(teacher)
        self._checkpointed_iteration = self.iteration
        return path

    def _export(self, teacher: dict[str, torch.Tensor]) -> None:
        """Write the teacher backbone and heads of this iteration (rank 0; raises on every rank when it fails)."""
        dist_utils.run_on_main(
            lambda: export_teacher(self.output_dir, teacher, self.teacher.backbone.config, self.iteration)
        )

    def _refresh_stale_exports(self) -> None:
        """Re-export the teacher when the exports lag the checkpoint the state came from (a run killed between its
        last checkpoint and the exports), so that a run reporting itself done always leaves matching exports."""
        recorded = dist_utils.broadcast_object(export_iterations(self.output_dir) if self.is_main else None)
        if recorded == (self.iteration, self.iteration):
            return
        self._export(official_teacher_state(full_model_state(self.teacher)))
        logger.warning(
            "re-exported the teacher of iteration %d (the exports held iterations %s)",
            self.iteration,
            recorded,
        )

    def _tensorboard(self) -> Any:
        if not self.is_main or not self.config.train.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning(
                "tensorboard is not installed (pip install 'franca[tensorboard]'); logging to metrics.jsonl only"
            )
            return None
        return SummaryWriter(str(self.output_dir / "tensorboard"))

    def _open_run(self) -> None:
        """Take the run directory (lock, stale temporaries removed, ``keep_last`` exact) and resume from its newest
        checkpoint, unless the state in memory already is that checkpoint (a staged run of this Trainer)."""
        dist_utils.run_on_main(self._take_run_directory)
        resumed = None if self._state_is_latest_checkpoint() else self.resume()
        if resumed is not None:
            self._refresh_stale_exports()
        if self.is_main:
            save_config(self.config, self.output_dir / "config.yaml")
            self._truncate_metrics(self.iteration)
            if resumed is not None:
                logger.info("resumed from %s at iteration %d", resumed, self.iteration)

    def _take_run_directory(self) -> None:
        """Rank 0: create and lock the run directory, then tidy what killed runs left in it."""
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ConfigError(f"{self.output_dir}: the output directory is a file; give a folder")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.run_lock.acquire()
        for stale in remove_stale_temporaries(self.output_dir):
            logger.warning("removed %s, left by an interrupted save", stale)
        rotate_checkpoints(
            self.output_dir, self.config.train.keep_last
        )  # a kill between a save and its rotation

    def _publish_record(self, record: dict[str, Any], bar: ProgressBar, writer: Any) -> None:
        """One logged step: a metrics.jsonl line, the progress bar's postfix, TensorBoard scalars (rank 0)."""
        self._write_metrics(record)
        bar.set_postfix(
            loss=f"{record.get('loss', float('nan')):.3f}",
            lr=f"{record.get('lr', 0.0):.2e}",
            ips=f"{record['images_per_s']:.1f}",
        )
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    writer.add_scalar(f"train/{key}", value, self.iteration)

    def _stop_on_nonfinite_streak(self) -> None:
        if self.consecutive_nonfinite >= self.config.train.max_consecutive_nonfinite:
            good = latest_checkpoint(self.output_dir)
            raise TrainingError(
                f"the loss was not finite for {self.consecutive_nonfinite} steps in a row (last at iteration "
                f"{self.iteration}); stopped. Last good checkpoint: {good or 'none yet'}. Lower optim.base_lr "
                "or raise train.batch_size_per_device"
            )

    def _agree_on_batch(self, batch: TrainBatch) -> tuple[int, int, bool]:
        """(usable images, skipped images) of this step over all ranks, and whether every rank can step: a rank
        whose images were all unreadable has an empty batch, and then no rank steps (they would wait for it)."""
        counts = [batch.batch_size, batch.num_skipped, int(batch.batch_size == 0)]
        if self.world_size > 1:
            summed = dist_utils.all_reduce_sum(torch.tensor(counts, dtype=torch.float64, device=self.device))
            counts = [int(value) for value in summed.tolist()]
        return counts[0], counts[1], counts[2] == 0

    def _no_usable_image(self, skipped: int) -> TrainingError:
        return TrainingError(
            f"no readable image in data.path {self.config.data.path}: all {skipped} images read so far were "
            "unreadable and skipped (see the warnings above); fix or replace the files, or point data.path elsewhere"
        )

    def _save_if_due(self, due: bool) -> bool:
        """Save when due (or postponed), unless the latest step was non-finite: a checkpoint, its export and the
        ``keep_last`` rotation then wait for a finite step, so that the newest checkpoint is always a good one.
        Returns whether a checkpoint was written (its path, on the ranks that know it: ``self.last_checkpoint``)."""
        self._save_pending = self._save_pending or due
        if not self._save_pending or self.consecutive_nonfinite:
            return False
        self._save_pending = False
        self.last_checkpoint = self._save()
        return True

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train until ``train.iterations`` (or until ``stop_at``, for tests and staged runs)."""
        end = self.config.train.iterations if stop_at is None else min(stop_at, self.config.train.iterations)
        try:
            self._open_run()
            return self._train_until(end)
        finally:
            self.run_lock.release()

    def _data_stream(self) -> Any:
        """The data iterator at ``self.iteration``: the previous fit's workers when they are there, else new ones."""
        if self._data_iterator is not None and self._data_iterator[0] == self.iteration:
            data_iter = self._data_iterator[1]
        else:
            patch_size = self.student.backbone.patch_size
            loader, _ = build_train_loader(
                self.config, patch_size, self.batch_size, self.iteration, self.rank, self.world_size
            )
            data_iter = iter(loader)
        self._data_iterator = None
        return data_iter

    def request_stop(self, reason: str) -> None:
        """End the current fit after this step, with a checkpoint of it (for callbacks such as a time budget)."""
        self._stop_reason = self._stop_reason or reason

    def write_record(self, record: dict[str, Any]) -> None:
        """Append ``record`` (with an int ``iteration``) to ``metrics.jsonl`` on rank 0, beside the step records: for
        callbacks that measure something of their own (:class:`franca.train.callbacks.PeriodicEvaluation`)."""
        if self.is_main:
            self._write_metrics(record)

    def _stop_agreed(self) -> bool:
        """Whether any rank's callbacks asked to stop (the ranks must stop at the same step)."""
        flag = self._stop_reason is not None
        if self.world_size > 1 and self.callbacks:
            flag = bool(dist_utils.all_reduce_sum(torch.tensor([float(flag)], device=self.device)).item())
            self._stop_reason = self._stop_reason or ("stopped by another rank" if flag else None)
        return flag

    def _record(self, logs: dict[str, Any], window: _Window, data_time: float) -> dict[str, Any]:
        """The metrics.jsonl record of the step just done (images/s over the window since the last record)."""
        elapsed = time.perf_counter() - window.start
        record = {
            "iteration": self.iteration,
            **logs,
            "images_per_s": window.images / max(elapsed, 1e-9),
            "data_time_s": data_time,
            "memory_mb": _memory_mb(self.device),
            "skipped_images": window.skipped_total,
            "epoch": self.iteration / self.config.train.epoch_length,
        }
        window.start, window.images = time.perf_counter(), 0
        return record

    def _train_until(self, end: int) -> TrainResult:
        config = self.config
        data_iter = self._data_stream()
        writer = self._tensorboard()
        self.student.train()
        self.teacher.eval()
        last: dict[str, Any] = {}
        checkpoint_path: Path | None = None
        window = _Window()
        self._save_pending, self._stop_reason = False, None
        for callback in self.callbacks:
            callback.on_fit_start(self)
        bar = ProgressBar(
            total=end,
            initial=self.iteration,
            unit="it",
            desc="train",
            disable=not (self.progress and self.is_main),
        )
        try:
            while self.iteration < end:
                step_start = time.perf_counter()
                batch = next(data_iter)
                data_time = time.perf_counter() - step_start
                usable, skipped, can_step = self._agree_on_batch(batch)
                window.add(usable, skipped)
                if not window.usable_total:
                    raise self._no_usable_image(window.skipped_total)
                logs: dict[str, Any] = self.train_step(batch) if can_step else {"skipped_empty_batch": True}
                self.iteration += 1
                bar.update(1)
                for callback in self.callbacks:
                    callback.on_step_end(self, logs)
                if (
                    self.iteration % config.train.log_every == 0
                    or self.iteration in (1, end)
                    or "skipped_nonfinite" in logs
                ):
                    last = self._record(logs, window, data_time)
                    for callback in self.callbacks:
                        callback.on_log(self, last)
                    if self.is_main:
                        self._publish_record(last, bar, writer)
                self._stop_on_nonfinite_streak()
                stop = self._stop_agreed()
                due = self.iteration % config.train.checkpoint_every == 0 or self.iteration == end or stop
                if self._save_if_due(due):
                    checkpoint_path = self.last_checkpoint
                    for callback in self.callbacks:
                        callback.on_checkpoint(self, self.last_checkpoint)
                if stop:
                    break
            if self.checkpoint_writer is not None:  # publish a checkpoint still written in the background
                self.checkpoint_writer.wait()
            if self.iteration < config.train.iterations and self._stop_reason is None:
                self._data_iterator = (
                    self.iteration,
                    data_iter,
                )  # a staged run: the next fit() goes on with them
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        self._report_end(window.skipped_total)
        result = TrainResult(
            output_dir=self.output_dir,
            iteration=self.iteration,
            last_metrics=last,
            backbone_path=self.output_dir / "teacher_backbone.safetensors",
            heads_path=self.output_dir / "teacher_heads.pth",
            checkpoint_path=checkpoint_path,
            skipped_images=window.skipped_total,
            stopped=self._stop_reason,
        )
        for callback in self.callbacks:
            callback.on_fit_end(self, result)
        return result

    def _report_end(self, skipped_images: int) -> None:
        """Say what a finished fit left out: unreadable images, and a last checkpoint held back by a non-finite loss."""
        if not self.is_main:
            return
        if skipped_images:
            logger.warning(
                "%d unreadable images were skipped (counted in metrics.jsonl as skipped_images)",
                skipped_images,
            )
        if self._save_pending:
            logger.warning(
                "the loss of the last step (iteration %d) was not finite, so it was not saved; the newest "
                "checkpoint is %s",
                self.iteration,
                latest_checkpoint(self.output_dir) or "none",
            )


def train(
    config: TrainConfig,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    stop_at: int | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Build a :class:`Trainer` and run it (the Python equivalent of ``franca train``)."""
    return Trainer(config, output_dir, progress=progress, callbacks=callbacks).fit(stop_at=stop_at)
