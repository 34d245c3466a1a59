"""The Franca pre-training loop.

It wires the pieces that live elsewhere: the networks and the loss (:mod:`franca.train.ssl_model`), the input pipeline
(:mod:`franca.train.data`), schedules, parameter groups and EMA (:mod:`franca.train.schedules`, ``optim``, ``ema``)
and the run directory (:mod:`franca.train.checkpointing`). One process or many (``torchrun``); CPU in fp32, CUDA in
bf16 autocast by default.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from franca import distributed as dist_utils
from franca.checkpoints import dcp_load, is_sharded_checkpoint
from franca.errors import FrancaError
from franca.models.meta_init import InitRecorder
from franca.progress import ProgressBar
from franca.train.checkpointing import (
    ShardedCheckpointWriter,
    export_teacher,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    native_teacher_state,
    official_teacher_state,
    remove_stale_temporaries,
    save_checkpoint,
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
from franca.train.ssl_model import FrancaLoss, TrainBatch, build_student_teacher

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


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """Franca pre-training of ``config`` into ``output_dir`` (resumed automatically from its latest checkpoint)."""

    def __init__(
        self, config: TrainConfig, output_dir: str | os.PathLike | None = None, progress: bool = True
    ) -> None:
        self.config = config
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
        self.iteration = 0
        # Between fit(stop_at=...) calls of one Trainer (the demo trains in chunks): the iteration the state in
        # memory was last saved at or loaded from, and the live data iterator with the iteration it yields next, so
        # that the next call neither re-reads the checkpoint it just wrote nor restarts the data workers.
        self._checkpointed_iteration: int | None = None
        self._data_iterator: tuple[int, Any] | None = None
        self.consecutive_nonfinite = 0
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
        """Load the newest checkpoint of the run directory, if any; returns its path."""
        path = latest_checkpoint(self.output_dir)
        if path is None:
            return None
        if is_sharded_checkpoint(path):
            self.load_sharded_checkpoint(path)
        else:
            self.load_state_dict(load_checkpoint(path))
        self._checkpointed_iteration = self.iteration
        return path

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
        with open(self.output_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, start_iteration: int) -> None:
        """Drop the lines a killed run logged after its last checkpoint, so the curve has no duplicates."""
        path = self.output_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [
            line
            for line in path.read_text().splitlines()
            if line and json.loads(line)["iteration"] <= start_iteration
        ]
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def _save(self) -> Path | None:
        """Write the checkpoint of this iteration and the teacher exports (every rank takes part)."""
        path = None
        if self.checkpoint_writer is not None:
            # every rank writes its shards; the exports need the full teacher (gathered on rank 0)
            path = self.checkpoint_writer.save(self.iteration, self.sharded_state_dict())
            teacher = official_teacher_state(full_model_state(self.teacher))
        else:
            state = self.state_dict()  # consolidated on every rank's CPU (a collective under FSDP)
            teacher = state["teacher"]
            if self.is_main:
                path = save_checkpoint(self.output_dir, self.iteration, state, self.config.train.keep_last)
        if self.is_main:
            export_teacher(self.output_dir, teacher, self.teacher.backbone.config, self.iteration)
        dist_utils.barrier()
        self._checkpointed_iteration = self.iteration
        return path

    def _tensorboard(self) -> Any:
        if not self.is_main or not self.config.train.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print(
                "tensorboard is not installed (pip install 'franca[tensorboard]'); logging to metrics.jsonl only"
            )
            return None
        return SummaryWriter(str(self.output_dir / "tensorboard"))

    def _open_run(self) -> None:
        """Prepare the run directory (stale temporaries removed) and resume from its newest checkpoint, unless the
        state in memory already is that checkpoint (a staged run of this Trainer)."""
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temporaries(self.output_dir):
                logger.warning("removed %s, left by an interrupted save", stale)
        dist_utils.barrier()
        resumed = None if self._state_is_latest_checkpoint() else self.resume()
        if self.is_main:
            save_config(self.config, self.output_dir / "config.yaml")
            self._truncate_metrics(self.iteration)
            if resumed is not None:
                print(f"resumed from {resumed} at iteration {self.iteration}")

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

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train until ``train.iterations`` (or until ``stop_at``, for tests and staged runs)."""
        config = self.config
        total = config.train.iterations
        end = total if stop_at is None else min(stop_at, total)
        self._open_run()
        if self._data_iterator is not None and self._data_iterator[0] == self.iteration:
            data_iter = self._data_iterator[1]  # the workers of the previous call, already at this iteration
        else:
            loader, _ = build_train_loader(
                config,
                self.student.backbone.patch_size,
                self.batch_size,
                self.iteration,
                self.rank,
                self.world_size,
            )
            data_iter = iter(loader)
        self._data_iterator = None
        writer = self._tensorboard()
        self.student.train()
        self.teacher.eval()
        last: dict[str, Any] = {}
        checkpoint_path: Path | None = None
        skipped_images = 0
        bar = ProgressBar(
            total=end,
            initial=self.iteration,
            unit="it",
            desc="train",
            disable=not (self.progress and self.is_main),
        )
        window_start, window_images = time.perf_counter(), 0
        try:
            while self.iteration < end:
                step_start = time.perf_counter()
                batch = next(data_iter)
                data_time = time.perf_counter() - step_start
                skipped_images += batch.num_skipped
                if batch.batch_size == 0:
                    logs: dict[str, Any] = {"skipped_empty_batch": True}
                else:
                    logs = self.train_step(batch)
                self.iteration += 1
                window_images += batch.batch_size * self.world_size
                bar.update(1)
                log_now = (
                    self.iteration % config.train.log_every == 0
                    or self.iteration in (1, end)
                    or bool(logs.get("skipped_nonfinite"))
                )
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "iteration": self.iteration,
                        **logs,
                        "images_per_s": window_images / max(elapsed, 1e-9),
                        "data_time_s": data_time,
                        "memory_mb": _memory_mb(self.device),
                        "skipped_images": skipped_images,
                        "epoch": self.iteration / config.train.epoch_length,
                    }
                    window_start, window_images = time.perf_counter(), 0
                    last = record
                    if self.is_main:
                        self._publish_record(record, bar, writer)
                self._stop_on_nonfinite_streak()
                if self.iteration % config.train.checkpoint_every == 0 or self.iteration == end:
                    checkpoint_path = self._save()
            if self.checkpoint_writer is not None:  # publish a checkpoint still written in the background
                self.checkpoint_writer.wait()
            if self.iteration < total:  # a staged run: the next fit() continues with these workers
                self._data_iterator = (self.iteration, data_iter)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return TrainResult(
            output_dir=self.output_dir,
            iteration=self.iteration,
            last_metrics=last,
            backbone_path=self.output_dir / "teacher_backbone.safetensors",
            heads_path=self.output_dir / "teacher_heads.pth",
            checkpoint_path=checkpoint_path,
        )


def train(
    config: TrainConfig,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    stop_at: int | None = None,
) -> TrainResult:
    """Build a :class:`Trainer` and run it (the Python equivalent of ``franca train``)."""
    return Trainer(config, output_dir, progress=progress).fit(stop_at=stop_at)
