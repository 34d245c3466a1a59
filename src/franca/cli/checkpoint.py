"""``franca checkpoint``: convert training checkpoints between the sharded folder and the single-file format.

    franca checkpoint consolidate RUN/checkpoints/checkpoint_00012500.dcp --out ckpt_12500.pt
    franca checkpoint shard ckpt_12500.pt --out RUN/checkpoints/checkpoint_00012500.dcp

Both forms hold the same state (student, teacher in the official layout, optimizer, counters, random states), and
``franca train`` resumes from either at any world size.
"""

from __future__ import annotations

import argparse

from franca.cli.options import DefaultsHelpFormatter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``consolidate`` and ``shard`` actions as sub-commands of ``parser``."""
    actions = parser.add_subparsers(dest="checkpoint_action", metavar="ACTION")
    consolidate = actions.add_parser(
        "consolidate",
        formatter_class=DefaultsHelpFormatter,
        help="write a sharded checkpoint folder (checkpoint_<iter>.dcp) as one .pt file",
        description="Read every shard of a torch.distributed.checkpoint folder in this process and write the whole "
        "training state as one torch.save file (needs memory for the whole state).",
    )
    consolidate.add_argument("source", help="the checkpoint_<iter>.dcp folder")
    consolidate.add_argument("--out", required=True, help="the .pt file to write (written atomically)")
    shard = actions.add_parser(
        "shard",
        formatter_class=DefaultsHelpFormatter,
        help="write a single-file checkpoint (checkpoint_<iter>.pt) as a sharded checkpoint folder",
        description="Write a single-file training checkpoint as a torch.distributed.checkpoint folder, from which a "
        "run of any world size resumes, each rank reading only its own slices.",
    )
    shard.add_argument("source", help="the checkpoint_<iter>.pt file")
    shard.add_argument("--out", required=True, help="the folder to create (must not exist)")
    parser.set_defaults(_checkpoint_parser=parser)


def run(args: argparse.Namespace) -> int:
    """Run the chosen action; returns the exit status (1 when no action was given)."""
    action = getattr(args, "checkpoint_action", None)
    if action not in ("consolidate", "shard"):
        args._checkpoint_parser.print_help()
        return 1
    from franca.train.checkpointing import consolidate_checkpoint, shard_checkpoint

    convert = consolidate_checkpoint if action == "consolidate" else shard_checkpoint
    out = convert(args.source, args.out)
    print(f"wrote {out}")
    return 0
