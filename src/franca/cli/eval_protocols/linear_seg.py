"""``franca eval linear-seg``: linear semantic segmentation on frozen patch tokens; writes ``linear-seg.json`` (and
the head with --save-head) and prints its metrics."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from franca.cli.eval_protocols import common
from franca.cli.options import positive_int
from franca.eval import defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``franca eval linear-seg``."""
    common.add_common_arguments(parser, protocol="linear-seg")
    common.add_segmentation_arguments(parser, train=True)
    common.add_token_argument(parser)
    group = parser.add_argument_group("linear segmentation head")
    group.add_argument("--epochs", type=int, default=10, help="passes over the precomputed train features")
    group.add_argument(
        "--train-batch-size", type=positive_int, default=16, help="images per head training step"
    )
    group.add_argument(
        "--optimizer", default="adamw", choices=list(defaults.SEG_OPTIMIZERS), help="adamw (default) or sgd"
    )
    group.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3)")
    group.add_argument(
        "--weight-decay", type=float, default=None, help="weight decay (default: 1e-4 adamw, 5e-4 sgd)"
    )
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    group.add_argument(
        "--n-last-blocks", type=int, default=1, help="concatenate the patch tokens of this many last blocks"
    )
    group.add_argument(
        "--save-head", action="store_true", help="also save the trained head as DIR/linear_seg_head.pt"
    )


def settings_of(args: argparse.Namespace) -> Any:
    """The :class:`franca.eval.linear_seg.LinearSegSettings` of the options (checked when built, before the model is
    read)."""
    from franca.eval.linear_seg import LinearSegSettings

    return LinearSegSettings(
        epochs=args.epochs,
        batch_size=args.train_batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        n_last_blocks=args.n_last_blocks,
        tokens=args.tokens,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate the head (:func:`franca.eval.linear_seg.evaluate_linear_segmentation`), write and print."""
    import torch

    from franca.eval.linear_seg import evaluate_linear_segmentation

    settings = settings_of(args)
    model, device = common.load_model(args)
    train_dataset, val_dataset = common.segmentation_data(args, train=True)
    result = evaluate_linear_segmentation(
        model, train_dataset, val_dataset, settings, **common.extraction_options(args, device)
    )
    results = result.to_dict()
    common.add_data_facts(results, args, val_dataset, train_dataset)
    path = common.finish(results, args, "linear-seg")
    if args.save_head:
        head_path = Path(path).parent / "linear_seg_head.pt"
        torch.save({k: v.cpu() for k, v in result.head.state_dict().items()}, head_path)
        results["head_path"] = str(head_path)
    return results
