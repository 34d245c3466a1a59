"""``franca eval hummingbird``: HummingBird in-context semantic segmentation; writes ``hummingbird.json`` and prints
its metrics."""

from __future__ import annotations

import argparse
from typing import Any

from franca.cli.eval_protocols import common
from franca.cli.options import seed_list
from franca.eval import defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``franca eval hummingbird``."""
    common.add_common_arguments(parser, protocol="hummingbird")
    common.add_segmentation_arguments(parser, train=True)
    common.add_token_argument(parser)
    group = parser.add_argument_group("hummingbird")
    group.add_argument(
        "--k", type=int, default=defaults.HUMMINGBIRD_K, help="nearest neighbours per patch (Franca: 30)"
    )
    group.add_argument(
        "--temperature",
        type=float,
        default=defaults.HUMMINGBIRD_TEMPERATURE,
        help="softmax temperature of cosine (0.02)",
    )
    group.add_argument(
        "--memory-size",
        type=int,
        default=None,
        help="patches kept in the memory bank (default: all, as Franca)",
    )
    group.add_argument(
        "--seeds", type=int, default=1, help="number of seeds averaged when the bank is subsampled"
    )
    group.add_argument(
        "--search", default="auto", choices=list(defaults.SEARCH_CHOICES), help="exact NN search backend"
    )


def settings_of(args: argparse.Namespace) -> Any:
    """The :class:`franca.eval.hummingbird.HummingbirdSettings` of the options (checked when built, before the model
    is read)."""
    from franca.eval.hummingbird import HummingbirdSettings

    return HummingbirdSettings(
        k=args.k,
        temperature=args.temperature,
        memory_size=args.memory_size,
        seeds=tuple(seed_list(args.seed, args.seeds)),
        tokens=args.tokens,
        search=args.search,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model and data, run :func:`franca.eval.hummingbird.evaluate_hummingbird`, write and print."""
    from franca.eval.hummingbird import evaluate_hummingbird

    settings = settings_of(args)
    model, device = common.load_model(args)
    train_dataset, val_dataset = common.segmentation_data(args, train=True)
    result = evaluate_hummingbird(
        model, train_dataset, val_dataset, settings, **common.extraction_options(args, device)
    )
    results = result.to_dict()
    common.add_data_facts(results, args, val_dataset, train_dataset)
    common.finish(results, args, "hummingbird")
    return results
