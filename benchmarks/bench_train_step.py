"""Franca training-step throughput and MFU: the real step (teacher, student, loss, backward, AdamW, EMA) on random crops.

    python benchmarks/bench_train_step.py [--configs tiny vit_small] [--batch 2] [--steps 3] [--device cpu]
                                          [--dtype fp32] [--compile] [--strategy fsdp] [--small-heads] [--phases]
                                          [--json OUT]

Each preset builds the networks, loss and optimiser exactly as the trainer does (franca.train.ssl_model,
franca.train.optim, franca.train.ema) and times the same step as ``Trainer.train_step`` on pre-built synthetic
batches (random crops, CyclicMask masks from franca.ssl.build_mask_batch), so no data loading is timed. The table
gives the median step time over ``--steps`` steps after ``--warmup`` steps, the throughput, the analytic model FLOPs
of the step (franca.train.flops.franca_step_flops, with the batches' real masked-patch counts), the achieved
FLOP/s, the measured peak matrix-product rate and MFU = achieved / peak. Writes JSON to
benchmarks/out/train_step.json.
``--phases`` also times each phase of the step (schedules, teacher forward, student forward, losses, backward,
clipping, AdamW, EMA; synchronised between phases on CUDA, which removes their overlap) and prints a second table
with the median milliseconds of each.

Presets: ``tiny`` is the tiny_cpu config (32/16 px crops x4, 4096 prototypes); ``vit_small``, ``vit_base`` and
``vit_large`` use the paper's crops (224/98 px x8) and heads (131072 prototypes for the largest level, 2048 hidden,
384 bottleneck; ``--small-heads`` cuts the prototypes to 8192) with the vitb14_in21k (S and B) and vitl14_laion (L)
settings, so ViT-L runs its 0.4 batch-subset stochastic depth.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from common import (
    checked_device,
    machine_info,
    median,
    peak_memory_mib,
    print_table,
    reset_peak_memory,
    synchronize,
    timed,
    write_json,
)

from franca.data.batch import TrainBatch
from franca.ssl import CyclicMask, build_mask_batch
from franca.train.config import TrainConfig, load_config
from franca.train.ema import ema_update_, pair_parameters
from franca.train.flops import franca_step_flops, measure_peak_flops, mfu, num_tokens, vit_config_from_train
from franca.train.optim import apply_schedules, build_optimizer, build_param_groups, clip_grad_norm_per_module
from franca.train.parallel import local_tensor, parallelize
from franca.train.schedules import Schedules
from franca.train.ssl_model import FrancaLoss, build_student_teacher

# preset -> (config preset, overrides); data.path is required by the presets but never read here
PRESETS: dict[str, tuple[str, list[str]]] = {
    "tiny": ("tiny_cpu", []),
    "vit_small": ("vitb14_in21k", ["model.arch=vit_small"]),
    "vit_base": ("vitb14_in21k", []),
    "vit_large": ("vitl14_laion", []),
}
SMALL_HEADS = ["heads.n_prototypes=8192"]
DEFAULT_BATCH = {
    "cpu": {"tiny": 32, "vit_small": 2, "vit_base": 2, "vit_large": 1},
    "cuda": {"tiny": 256, "vit_small": 64, "vit_base": 64, "vit_large": 32},
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
PHASES = ("schedules", "teacher", "student", "losses", "backward", "clip", "adamw", "ema")


class PhaseClock:
    """Accumulates the seconds between successive :meth:`lap` calls under phase names (synchronised on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, list[float]] = {name: [] for name in PHASES}
        self._last = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase].append(now - self._last)
        self._last = now


def preset_config(name: str, small_heads: bool) -> TrainConfig:
    """The TrainConfig of a benchmark preset (``--small-heads`` applies to the paper-sized presets only)."""
    preset, overrides = PRESETS[name]
    overrides = [*overrides, "data.path=unused"]
    if small_heads and name != "tiny":
        overrides += SMALL_HEADS
    return load_config(preset, overrides)


def synthetic_batches(
    config: TrainConfig, batch_size: int, device: torch.device, count: int, seed: int = 0
) -> list[TrainBatch]:
    """``count`` multi-crop batches of random crops with real CyclicMask masks, already on ``device``."""
    crops, masking = config.crops, config.masking
    grid = crops.global_size // config.model.patch_size
    mask_generator = CyclicMask(grid, grid, min_aspect=masking.min_aspect, roll=masking.roll)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        masks = build_mask_batch(
            2 * batch_size, mask_generator, masking.probability, tuple(masking.ratio_min_max), generator
        )
        n_local = crops.n_local * batch_size
        local = (
            torch.randn(n_local, 3, crops.local_size, crops.local_size, device=device) if n_local else None
        )
        batch = TrainBatch(
            global_crops=torch.randn(2 * batch_size, 3, crops.global_size, crops.global_size, device=device),
            local_crops=local,
            masks=masks.masks,
            masked_indices=masks.masked_indices,
            masked_weights=masks.masked_weights,
            batch_size=batch_size,
        )
        batches.append(batch.to(device))
    return batches


@dataclass
class StepRunner:
    """The trainer's step for one process (``Trainer.train_step`` without data loader, checkpoints or logging)."""

    config: TrainConfig
    device: torch.device
    autocast_dtype: torch.dtype | None
    compiled: bool = False
    strategy: str = (
        "ddp"  # "fsdp": FSDP2 in a one-process group, with the trainer's bf16 mixed-precision policy
    )

    def __post_init__(self) -> None:
        # train.compile as the trainer reads it: the blocks here, the loss's cross-entropy kernels in FrancaLoss
        self.config = config = replace(self.config, train=replace(self.config.train, compile=self.compiled))
        torch.manual_seed(config.train.seed)
        self.student, self.teacher = build_student_teacher(config)
        self.student.to(self.device).train()
        self.teacher.to(self.device).eval()
        # as the trainer: "ddp" in one process is no wrapper; "fsdp" shards over the one-process group
        self.student_forward = parallelize(
            self.student,
            self.teacher,
            self.strategy,
            self.device,
            self.autocast_dtype,
            reshard_after_forward=config.distributed.fsdp_reshard_after_forward,
            activation_checkpointing=config.train.activation_checkpointing,
            compile_blocks=self.compiled,
        )
        self.loss_fn = FrancaLoss(
            config, self.student.dino_head.prototype_counts, self.student.ibot_head.prototype_counts
        ).to(self.device)
        groups = build_param_groups(
            self.student.parts(),
            patch_embed_lr_mult=config.optim.patch_embed_lr_mult,
            layerwise_decay=config.optim.layerwise_decay,
            n_blocks=self.student.backbone.n_blocks,
        )
        self.optimizer = build_optimizer(groups, config.optim.adamw_betas, self.device.type)
        teacher_params, student_params = pair_parameters(self.teacher, self.student)
        self.ema_pairs = (
            [local_tensor(p) for p in teacher_params],
            [local_tensor(p) for p in student_params],
        )
        # an iteration past the prototype freeze, so that every parameter is updated
        self.schedule = Schedules.from_config(config)[config.optim.freeze_last_layer_iterations]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The trainer's autocast: none for fp32, ``torch.autocast`` to the chosen dtype otherwise."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def step(self, batch: TrainBatch, clock: PhaseClock | None = None) -> None:
        """Teacher forward, student forward, loss, backward, per-module clip, AdamW step, EMA update.

        With a ``clock``, the time of each phase is recorded under the names of :data:`PHASES`.
        """
        lap = clock.lap if clock is not None else lambda phase: None
        if clock is not None:
            clock.start()
        schedule = self.schedule
        apply_schedules(self.optimizer, schedule.lr, schedule.weight_decay, schedule.last_layer_lr)
        lap("schedules")
        with torch.no_grad(), self.autocast():
            teacher_out = self.teacher(batch, teacher=True)
        lap("teacher")
        with self.autocast():
            student_out = self.student_forward(batch)
        lap("student")
        losses = self.loss_fn(student_out, teacher_out, batch, schedule.teacher_temp)
        lap("losses")
        losses.total.backward()
        lap("backward")
        clip_grad_norm_per_module(self.student.parts(), self.config.optim.clip_grad)
        lap("clip")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lap("adamw")
        with torch.no_grad():
            ema_update_(self.ema_pairs[0], self.ema_pairs[1], schedule.teacher_momentum)
        lap("ema")


def join_one_process_group(device: torch.device) -> None:
    """A process group of this process alone (what ``torchrun --nproc_per_node 1`` gives the trainer), so that
    ``strategy="fsdp"`` shards over it; a group that exists (under torchrun) is kept."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _can_compile() -> bool:
    return hasattr(torch.nn.Module, "compile")  # torch >= 2.2


def run_preset(name: str, args: argparse.Namespace, device: torch.device, dtype_name: str) -> dict[str, Any]:
    """Time one preset; returns its table row (with an ``error`` entry when it could not run).

    The peak rate is measured right before the timed steps, so that both see the same machine load (the CPU
    machines are shared and noisy).
    """
    config = preset_config(name, args.small_heads)
    batch_size = args.batch or DEFAULT_BATCH[device.type][name]
    row: dict[str, Any] = {
        "config": name,
        "device": device.type,
        "dtype": dtype_name,
        "strategy": args.strategy,
        "batch": batch_size,
        "prototypes": config.heads.n_prototypes,
        "crops": f"{config.crops.global_size}/{config.crops.local_size}x{config.crops.n_local}",
    }
    compiled = args.compile and _can_compile()
    if args.compile and not compiled:
        print(f"[{name}] this torch has no nn.Module.compile: running eagerly")
    batches = synthetic_batches(config, batch_size, device, count=min(args.warmup + args.steps, 4))
    try:
        runner = StepRunner(config, device, DTYPES[dtype_name], compiled, args.strategy)
        reset_peak_memory(device)
        try:
            for index in range(args.warmup):
                runner.step(batches[index % len(batches)])
        except Exception as error:  # a compiler that cannot build here: fall back to eager, say so
            if not compiled or isinstance(error, torch.cuda.OutOfMemoryError):
                raise
            print(
                f"[{name}] torch.compile failed ({type(error).__name__}: {str(error)[:120]}); running eagerly"
            )
            compiled = False
            del runner
            runner = StepRunner(config, device, DTYPES[dtype_name], False, args.strategy)
            reset_peak_memory(device)
            for index in range(args.warmup):
                runner.step(batches[index % len(batches)])
        peak = measure_peak_flops(device, DTYPES[dtype_name] or torch.float32)
        times, masked = [], []
        for index in range(args.steps):
            batch = batches[(args.warmup + index) % len(batches)]
            times.append(timed(lambda batch=batch: runner.step(batch), device))
            masked.append(int(batch.masked_indices.numel()))
        row["peak_memory_mib"] = peak_memory_mib(device)
        if args.phases:  # separate steps: the phase clock's synchronisations must not touch the timings above
            clock = PhaseClock(device)
            for index in range(args.steps):
                runner.step(batches[(args.warmup + index) % len(batches)], clock)
            row["phase_ms"] = {phase: 1000 * median(values) for phase, values in clock.seconds.items()}
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
        print(f"[{name}] out of GPU memory at batch {batch_size}; lower --batch")
        return row
    finally:
        runner = None  # free the networks before the next preset
        if device.type == "cuda":
            torch.cuda.empty_cache()
    step_s = median(times)
    flops = franca_step_flops(config, batch_size, masked_patches=sum(masked) / len(masked))
    vit = vit_config_from_train(config)
    tokens = 2 * batch_size * num_tokens(vit, config.crops.global_size) + (
        config.crops.n_local * batch_size * num_tokens(vit, config.crops.local_size)
    )
    row.update(
        {
            "compiled": compiled,
            "step_s": step_s,
            "step_s_all": times,
            "images_per_s": batch_size / step_s,
            "tokens_per_s": tokens / step_s,
            "step_tflop": flops["total"] / 1e12,
            "achieved_tflops": flops["total"] / step_s / 1e12,
            "peak_tflops": peak / 1e12,
            "mfu_percent": 100 * mfu(flops["total"], step_s, peak),
            "flops": flops,
        }
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=sorted(PRESETS),
        default=None,
        help="presets to run (default: tiny on CPU, all four on CUDA)",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="images per step (default: per preset and device)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 10 on CUDA)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps first (default: 1 on CPU, 3 on CUDA, 5 with --compile)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="autocast dtype (default: bf16 on CUDA, fp32 on CPU, where bf16 is ~20x slower)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="train.compile: every block and the loss kernels"
    )
    parser.add_argument(
        "--strategy",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="ddp: no wrapper in one process (autocast casts the fp32 weights at every use); fsdp: FSDP2 over a "
        "one-process group as `torchrun --nproc_per_node 1 franca train` runs it (bf16 weight copies once per step)",
    )
    parser.add_argument(
        "--small-heads", action="store_true", help="8192 prototypes instead of 131072 (S/B/L)"
    )
    parser.add_argument(
        "--phases", action="store_true", help="also time each phase of the step (a second table, ms)"
    )
    parser.add_argument("--json", default="benchmarks/out/train_step.json")
    args = parser.parse_args()  # fmt: skip

    device = checked_device(args.device)
    on_cuda = device.type == "cuda"
    dtype_name = args.dtype or ("bf16" if on_cuda else "fp32")
    args.steps = args.steps or (10 if on_cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if args.compile else 3 if on_cuda else 1)
    configs = args.configs or (list(PRESETS) if on_cuda else ["tiny"])
    if args.steps < 1 or args.warmup < 1:
        sys.exit("--steps and --warmup must be at least 1")
    if args.strategy == "fsdp":
        join_one_process_group(device)

    print(f"{device}, {dtype_name}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = []
    for name in configs:
        row = run_preset(name, args, device, dtype_name)
        rows.append(row)
        if "error" not in row:
            print(
                f"[{name}] batch {row['batch']}: {row['step_s']:.3f} s/step, peak {row['peak_tflops']:.4f} "
                f"TFLOP/s, MFU {row['mfu_percent']:.1f} %"
            )
    columns = [
        ("config", "config", ""),
        ("device", "device", ""),
        ("dtype", "dtype", ""),
        ("strategy", "strategy", ""),
        ("batch", "batch", "d"),
        ("images_per_s", "images/s", ".2f"),
        ("tokens_per_s", "tokens/s", ".0f"),
        ("step_tflop", "step TFLOP", ".4f"),
        ("achieved_tflops", "TFLOP/s", ".4f"),
        ("peak_tflops", "peak TFLOP/s", ".4f"),
        ("mfu_percent", "MFU %", ".1f"),
        ("peak_memory_mib", "peak MiB", ".0f"),
    ]
    print_table(rows, columns)
    if args.phases:
        phase_rows = [
            {
                "config": row["config"],
                "batch": row["batch"],
                **row["phase_ms"],
                "total": sum(row["phase_ms"].values()),
            }
            for row in rows
            if "phase_ms" in row
        ]
        phase_columns = [("config", "config", ""), ("batch", "batch", "d")]
        phase_columns += [(phase, f"{phase} ms", ".1f") for phase in (*PHASES, "total")]
        print_table(phase_rows, phase_columns)
    write_json(
        args.json,
        {
            "machine": machine_info(device),
            "peak_dtype": dtype_name,
            "settings": {"steps": args.steps, "warmup": args.warmup, "compile": args.compile,
                         "strategy": args.strategy,
                         "small_heads": args.small_heads, "phases": args.phases},
            "rows": rows,
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
