"""Training-checkpoint save and load on N gloo ranks: one consolidated file against sharded (DCP) folders.

    python benchmarks/bench_checkpoint.py [--config vitl14_laion] [--ranks 2] [--small-heads] [--dir /tmp/ckpt]
                                          [--json OUT]

Every rank builds the preset's student, teacher, loss and AdamW exactly as ``franca train`` does with
``distributed.strategy=fsdp`` (FSDP2 over gloo on the CPU), takes one optimizer step so that the AdamW moments
exist, and then, for each format, times what the trainer does at a checkpoint and at a resume:

- ``single``: ``Trainer.state_dict()`` (every shard gathered into rank 0's memory) and one ``torch.save`` by rank 0;
  resume: every rank reads the whole file and loads its part.
- ``sharded``: ``ShardedCheckpointWriter.save`` (each rank writes its own shards in parallel), also with
  ``train.checkpoint_async=true`` (the time until training could go on, and until the folder is published);
  resume: ``Trainer.load_sharded_checkpoint`` (each rank reads only its slices).

Each operation runs in fresh processes (so that no earlier operation's memory counts). The table gives the wall time,
the bytes on disk, rank 0's resident memory before the operation (model, shards, optimizer), and the extra peak
resident memory of rank 0 and of the other ranks during it (Linux VmHWM, reset before it, minus the memory before;
the pages of a memory-mapped checkpoint file that a rank reads count too). Export of the teacher is
the same for both formats and is not timed. Memory: the single format needs the whole state (~9 GB for ViT-L with
the paper heads) in rank 0's memory to save and in every rank's to resume; ``--small-heads`` (8192 prototypes)
fits small machines.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import _vm_hwm_mib, machine_info, print_table, reset_peak_memory, resident_mib, write_json

from franca.train.checkpointing import ShardedCheckpointWriter, load_checkpoint, save_checkpoint
from franca.train.config import load_config
from franca.train.trainer import Trainer

CPU = torch.device("cpu")


def _measure(name: str, fn: Any, folder: Path) -> dict[str, Any]:
    """Run ``fn`` on every rank between barriers: the wall time, the bytes in ``folder``, and per rank the resident
    memory before (the model, shards and optimizer) and the peak during the operation."""
    dist.barrier()
    before = resident_mib()
    reset_peak_memory(CPU)
    start = time.perf_counter()
    extra = fn() or {}
    dist.barrier()
    seconds = time.perf_counter() - start
    memory: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(memory, (before, _vm_hwm_mib()))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
    others = [peak - base for base, peak in memory[1:]]
    return {"operation": name, "seconds": seconds, "gb_written": size / 1e9, "rank0_before_mib": memory[0][0],
            "rank0_extra_mib": memory[0][1] - memory[0][0], "other_extra_mib": max(others, default=None),
            **extra}  # fmt: skip


def _one_step(trainer: Trainer) -> None:
    """Gradients of ones and one AdamW step, so the optimizer holds its two moments per parameter."""
    for parameter in trainer.student.parameters():
        parameter.grad = torch.ones_like(parameter)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def _operation(name: str, trainer: Trainer, root: Path) -> tuple[Any, Path]:
    """The function that performs operation ``name`` on every rank, and the folder whose bytes it writes or reads."""
    single = root / "single"
    sharded = root / "sharded"
    if name == "save, single file":

        def save_single() -> None:
            state = trainer.state_dict()
            if trainer.rank == 0:
                save_checkpoint(single, 1, state, keep_last=0)

        return save_single, single
    if name == "resume, single file":
        path = single / "checkpoints" / "checkpoint_00000001.pt"
        return lambda: trainer.load_state_dict(load_checkpoint(path)), single
    if name == "resume, sharded":
        path = sharded / "checkpoints" / "checkpoint_00000001.dcp"
        return lambda: trainer.load_sharded_checkpoint(path), sharded
    asynchronous = name.endswith("(async)")
    folder = root / "async" if asynchronous else sharded
    writer = ShardedCheckpointWriter(folder, keep_last=0, asynchronous=asynchronous)

    def save_sharded() -> dict[str, float]:
        start = time.perf_counter()
        writer.save(1, trainer.sharded_state_dict())
        blocking = time.perf_counter() - start
        writer.wait()
        return {"blocking_s": blocking}

    return save_sharded, folder


OPERATIONS = (
    "save, single file",
    "resume, single file",
    "save, sharded",
    "resume, sharded",
    "save, sharded (async)",
)


def _worker(
    rank: int, world_size: int, args: argparse.Namespace, init_file: str, out: str, name: str
) -> None:
    """One operation in fresh processes, so that no earlier operation's memory is counted in its peak."""
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    overrides = ["data.path=unused", "distributed.strategy=fsdp", "train.checkpoint_format=sharded",
                 f"distributed.init_device={args.init_device}"]  # fmt: skip
    if args.small_heads:
        overrides.append("heads.n_prototypes=8192")
    config = load_config(args.config, overrides)
    root = Path(args.dir)
    reset_peak_memory(CPU)
    start = time.perf_counter()
    trainer = Trainer(config, root / "run", progress=False)
    startup = {"seconds": time.perf_counter() - start, "peak_mib": _vm_hwm_mib()}
    row = None
    if name != "start-up":
        _one_step(trainer)
        fn, folder = _operation(name, trainer, root)
        row = _measure(name, fn, folder)
    startups: list[Any] = [None] * world_size
    dist.all_gather_object(startups, startup)
    if rank == 0:
        torch.save({"row": row, "startup": startups}, out)
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vitl14_laion", help="training preset (default %(default)s)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--small-heads", action="store_true", help="8192 prototypes instead of the paper's")
    parser.add_argument(
        "--dir", default=None, help="where to write the checkpoints (default: a temporary folder)"
    )
    parser.add_argument(
        "--init-device",
        choices=("cpu", "meta"),
        default="cpu",
        help="distributed.init_device of the runs (default %(default)s)",
    )
    parser.add_argument(
        "--startup-only", action="store_true", help="only build the networks (start-up time and peak memory)"
    )
    parser.add_argument("--json", default="benchmarks/out/checkpoint.json")
    args = parser.parse_args()
    rows, startup = [], None
    with tempfile.TemporaryDirectory() as scratch:
        args.dir = args.dir or scratch
        for index, name in enumerate(("start-up",) if args.startup_only else OPERATIONS):
            out = str(Path(scratch) / f"result{index}.pt")
            init = str(Path(scratch) / f"init{index}")
            mp.spawn(_worker, args=(args.ranks, args, init, out, name), nprocs=args.ranks)
            result = torch.load(out, weights_only=False)
            if result["row"] is not None:
                rows.append(result["row"])
            startup = startup or result["startup"]
    result = {"rows": rows, "startup": startup}
    heads = " (8192 prototypes)" if args.small_heads else ""
    print(f"{args.config}{heads}, {args.ranks} gloo ranks, FSDP2, networks built on {args.init_device}")
    for rank, startup in enumerate(result["startup"]):
        print(f"rank {rank} start-up: {startup['seconds']:.1f} s, peak RSS {startup['peak_mib']:.0f} MiB")
    columns = [
        ("operation", "operation", ""),
        ("seconds", "wall s", ".2f"),
        ("blocking_s", "blocks training s", ".2f"),
        ("gb_written", "GB on disk", ".2f"),
        ("rank0_before_mib", "rank 0 resident before MiB", ".0f"),
        ("rank0_extra_mib", "rank 0 extra peak MiB", ".0f"),
        ("other_extra_mib", "other ranks' extra peak MiB", ".0f"),
    ]
    if result["rows"]:
        print_table(result["rows"], columns)
    write_json(args.json, {"machine": machine_info(), "settings": vars(args), **result})


if __name__ == "__main__":
    main()
