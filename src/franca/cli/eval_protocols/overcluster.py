"""``franca eval overcluster``: K-means overclustering of patch tokens (Leopart protocol); writes
``overcluster.json`` and prints its metrics."""

from __future__ import annotations

import argparse
from typing import Any

from franca.cli.eval_protocols import common
from franca.cli.options import seed_list
from franca.eval import defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``franca eval overcluster``."""
    common.add_common_arguments(parser, protocol="overcluster")
    common.add_segmentation_arguments(parser, train=False)
    common.add_token_argument(parser)
    group = parser.add_argument_group("overclustering")
    group.add_argument(
        "--clusters", type=int, nargs="+", default=list(defaults.DEFAULT_CLUSTERS), help="values of K"
    )
    group.add_argument("--seeds", type=int, default=5, help="k-means seeds averaged (from --seed on)")
    group.add_argument(
        "--pca-dim",
        type=int,
        default=defaults.DEFAULT_PCA_DIM,
        help="PCA dimensions before k-means (0: no PCA)",
    )
    group.add_argument(
        "--mask-size",
        type=int,
        default=defaults.DEFAULT_MASK_SIZE,
        help="side of the evaluated masks (Leopart: 100)",
    )
    group.add_argument(
        "--matching", default="auto", choices=list(defaults.MATCHING), help="cluster-to-class matching rule"
    )
    group.add_argument("--kmeans-iters", type=int, default=100, help="k-means iterations per restart")
    group.add_argument("--kmeans-redo", type=int, default=5, help="k-means restarts (best objective kept)")
    group.add_argument(
        "--kmeans-backend",
        default="auto",
        choices=list(defaults.KMEANS_BACKENDS),
        help="k-means implementation",
    )


def settings_of(args: argparse.Namespace) -> Any:
    """The :class:`franca.eval.overclustering.OverclusteringSettings` of the options (checked when built, before the
    model is read)."""
    from franca.eval.overclustering import OverclusteringSettings

    return OverclusteringSettings(
        clusters=tuple(args.clusters),
        seeds=tuple(seed_list(args.seed, args.seeds)),
        pca_dim=args.pca_dim or None,
        mask_size=args.mask_size,
        matching=args.matching,
        niter=args.kmeans_iters,
        nredo=args.kmeans_redo,
        backend=args.kmeans_backend,
        tokens=args.tokens,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model and the val data, cluster (:func:`franca.eval.overclustering.evaluate_overclustering`)."""
    from franca.eval.overclustering import evaluate_overclustering

    settings = settings_of(args)
    model, device = common.load_model(args)
    _, val_dataset = common.segmentation_data(args, train=False)
    result = evaluate_overclustering(model, val_dataset, settings, **common.extraction_options(args, device))
    results = result.to_dict()
    common.add_data_facts(results, args, val_dataset)
    common.finish(results, args, "overcluster")
    return results
