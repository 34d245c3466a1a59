"""How predictable are the teacher's Sinkhorn-Knopp targets of one view from those of the other view of the same image?

Self-distillation can only learn what one augmented view says about the other. This probe runs the *teacher* of a
training config (at initialisation, or a training checkpoint with ``--checkpoint``) on real multi-crop batches of the
configured data and prints, per Matryoshka level: ``ln K`` (the loss of a uniform student), the entropy ``H(q)`` of
the targets, and the cross-entropy of view-1 targets against the view-2 targets of the same image and of another image
of the batch. When "same image" is not clearly below ``ln K``, a student cannot beat the uniform prediction yet and the
DINO loss sits at ``sum_j ln K_j`` (docs/demo-learning.md)::

    python benchmarks/probe_view_agreement.py --preset tiny_cpu data.path=runs/demo/data/train
    python benchmarks/probe_view_agreement.py data.path=runs/demo/data/train heads.init=official  # the paper's init
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from common import print_table

from franca.ssl.sinkhorn import sinkhorn_knopp
from franca.train.config import load_config
from franca.train.data import build_train_loader
from franca.train.ssl_model import build_student_teacher


def cross_entropy(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over rows of ``-sum_k p log q``."""
    return float(-(p * q.clamp_min(1e-12).log()).sum(-1).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny_cpu")
    parser.add_argument(
        "--checkpoint", help="a training checkpoint (.pt) whose teacher to probe (default: init)"
    )
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--teacher-temp",
        type=float,
        default=None,
        help="teacher temperature of the targets (default: the config's loss.teacher_temp_start)",
    )
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. data.path=DIR")
    args = parser.parse_args(argv)

    config = load_config(args.preset, ["train.num_workers=0", *args.overrides])
    teacher_temp = config.loss.teacher_temp_start if args.teacher_temp is None else args.teacher_temp
    torch.manual_seed(config.train.seed)  # the trainer's initial weights
    _, teacher = build_student_teacher(config)
    if args.checkpoint:
        teacher.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True)["teacher"])
    teacher.eval()
    loader, _ = build_train_loader(config, config.model.patch_size, args.batch_size, 0)
    rows: list[dict] = []
    batches = iter(loader)
    for index in range(args.batches):
        batch = next(batches)
        with torch.no_grad():
            logits = teacher(batch, teacher=True)["cls"]
        size = batch.batch_size
        for level, level_logits in enumerate(logits):
            targets = sinkhorn_knopp(level_logits.float(), teacher_temp, config.loss.sk_iterations)
            first, second = targets[:size], targets[size:]
            rows.append(
                {
                    "batch": index,
                    "level": level,
                    "ln_k": math.log(targets.shape[1]),
                    "entropy": cross_entropy(first, first),
                    "same": cross_entropy(first, second),
                    "other": cross_entropy(first, second.roll(1, dims=0)),
                }
            )
    print_table(
        rows,
        [
            ("batch", "batch", "d"),
            ("level", "level", "d"),
            ("ln_k", "ln K", ".2f"),
            ("entropy", "H(q)", ".2f"),
            ("same", "CE same image", ".2f"),
            ("other", "CE other image", ".2f"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
