"""Where a Franca training step's time goes, kernel by kernel: ``torch.profiler`` over a few steps of a preset.

    python benchmarks/profile_train_step.py [--config vit_large] [--batch 32] [--steps 2] [--device cuda]
                                            [--rows 30] [--json OUT]

Builds the same step as ``bench_train_step.py`` (its :class:`StepRunner`, bf16 autocast on CUDA), runs ``--warmup``
untimed steps, then profiles ``--steps`` steps and prints two tables: the operators with the most device time (CUDA)
or CPU time, and the attention kernels chosen (any kernel whose name says flash, efficient, cudnn or attention). The
JSON holds the same rows. What it answers: which attention backend runs, how much of the step the head matmuls,
Sinkhorn-Knopp, AdamW and the EMA take, and whether the host waits on the device (``cudaStreamSynchronize``,
``aten::item``, ``aten::_local_scalar_dense``).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from bench_train_step import DEFAULT_BATCH, PRESETS, StepRunner, preset_config, synthetic_batches
from common import checked_device, machine_info, print_table, write_json

ATTENTION_WORDS = ("flash", "efficient", "cudnn", "attention", "fmha")
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item", "aten::_local_scalar_dense")


def _row(event: Any, on_cuda: bool, steps: int) -> dict[str, Any]:
    device_us = getattr(event, "device_time_total", None)
    if device_us is None:  # torch < 2.4 names it cuda_time_total
        device_us = getattr(event, "cuda_time_total", 0.0)
    return {
        "name": event.key[:90],
        "calls_per_step": event.count / steps,
        "device_ms_per_step": device_us / 1000 / steps if on_cuda else 0.0,
        "cpu_ms_per_step": event.cpu_time_total / 1000 / steps,
    }


def profile(runner: StepRunner, batches: list, steps: int, on_cuda: bool) -> list[dict[str, Any]]:
    """Profile ``steps`` steps; one row per operator or kernel name, sorted by device (CUDA) or CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with torch_profile(activities=activities) as prof:
        for index in range(steps):
            runner.step(batches[index % len(batches)])
        if on_cuda:
            torch.cuda.synchronize()
    rows = [_row(event, on_cuda, steps) for event in prof.key_averages()]
    key = "device_ms_per_step" if on_cuda else "cpu_ms_per_step"
    return sorted(rows, key=lambda row: row[key], reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(PRESETS), default="vit_large")
    parser.add_argument(
        "--batch", type=int, default=None, help="images per step (default: bench_train_step's)"
    )
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--rows", type=int, default=30, help="rows of the operator table (default %(default)s)"
    )
    parser.add_argument("--json", default="benchmarks/out/profile_train_step.json")
    args = parser.parse_args()

    device = checked_device(args.device)
    on_cuda = device.type == "cuda"
    batch = args.batch or DEFAULT_BATCH[device.type][args.config]
    config = preset_config(args.config, small_heads=False)
    runner = StepRunner(config, device, torch.bfloat16 if on_cuda else None)
    batches = synthetic_batches(config, batch, device, count=2)
    for index in range(args.warmup):
        runner.step(batches[index % len(batches)])
    rows = profile(runner, batches, args.steps, on_cuda)
    time_key = "device_ms_per_step" if on_cuda else "cpu_ms_per_step"
    columns = [
        ("name", "operator / kernel", ""),
        ("calls_per_step", "calls/step", ".1f"),
        ("device_ms_per_step", "device ms/step", ".2f"),
        ("cpu_ms_per_step", "CPU ms/step", ".2f"),
    ]
    print(f"{args.config}, batch {batch}, {device}, {args.steps} profiled steps, sorted by {time_key}")
    print_table(rows[: args.rows], columns)
    attention = [row for row in rows if any(word in row["name"].lower() for word in ATTENTION_WORDS)]
    waits = [row for row in rows if any(word in row["name"] for word in HOST_WAITS)]
    print("attention kernels and operators:")
    print_table(attention[:12], columns)
    print("host synchronisations:")
    print_table(waits, columns)
    write_json(
        args.json,
        {
            "machine": machine_info(device),
            "config": args.config,
            "batch": batch,
            "steps": args.steps,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
