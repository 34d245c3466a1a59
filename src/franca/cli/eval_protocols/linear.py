"""``franca eval linear``: linear probe, (feature set, lr) heads trained jointly and one chosen on a held-out split;
writes ``linear.json``, prints one row per head and the chosen one."""

from __future__ import annotations

import argparse
from typing import Any

from franca.cli.eval_protocols import common
from franca.cli.options import positive_int
from franca.eval import defaults
from franca.eval.output import format_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``franca eval linear``."""
    common.add_common_arguments(parser, "linear")
    common.add_classification_data_arguments(parser)
    group = parser.add_argument_group("linear probe")
    group.add_argument(
        "--features",
        nargs="+",
        default=list(defaults.LINEAR_FEATURE_SETS),
        metavar="SET",
        help="feature sets: cls<n> or cls<n>+avgpool (default: %(default)s)",
    )
    group.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=list(defaults.DINOV2_LRS),
        help="base learning rates (x batch/256)",
    )
    group.add_argument(
        "--epochs", type=int, default=defaults.LINEAR_EPOCHS, help="passes over the training part"
    )
    group.add_argument(
        "--probe-batch-size",
        type=positive_int,
        default=defaults.LINEAR_BATCH_SIZE,
        help="batch size of the linear heads",
    )
    group.add_argument(
        "--holdout",
        type=float,
        default=defaults.HOLDOUT_FRACTION,
        help="fraction of train held out to choose the head (0: choose on val)",
    )
    group.add_argument(
        "--augment",
        action="store_true",
        help="re-run the backbone on RandomResizedCrop+flip train images every epoch (DINOv2; slower)",
    )


def settings_of(args: argparse.Namespace) -> Any:
    """The :class:`franca.eval.linear.LinearSettings` of the options (checked when built: a bad feature set stops
    before the model is read)."""
    from franca.eval.linear import LinearSettings

    return LinearSettings(
        feature_sets=tuple(args.features),
        learning_rates=tuple(args.lrs),
        epochs=args.epochs,
        batch_size=args.probe_batch_size,
        holdout_fraction=args.holdout,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train the heads, choose one on the held-out split, report val (:func:`franca.eval.linear.evaluate_linear`)."""
    from franca.eval.linear import augmented_train_dataset, evaluate_linear, linear_table_rows

    settings = settings_of(args)
    model, device = common.load_model(args)
    train, val = common.classification_data(args)
    augment_dataset = augmented_train_dataset(args.train, args.size) if args.augment else None
    result = evaluate_linear(
        model,
        train,
        val,
        settings,
        augment_dataset=augment_dataset,
        **common.extraction_options(args, device),
    )
    results = result.to_dict()
    print(format_table(linear_table_rows(results)))
    best = results["best"]
    print(
        f"chosen: {best['feature_set']} lr {best['lr']:g} (on {results['selected_on']}): "
        f"val top-1 {results['top1']:.2f}  top-5 {results['top5']:.2f}"
    )
    common.finish(results, args, "linear", table=False)
    return results
