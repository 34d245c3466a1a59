"""``franca eval pca``: PCA visualisations of patch features; writes the PNG grid and ``pca.json``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from franca.cli.eval_protocols import common
from franca.eval import defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``franca eval pca``."""
    common.add_common_arguments(parser, protocol="pca")
    common.add_token_argument(parser)
    group = parser.add_argument_group("PCA maps")
    group.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="PATH",
        help="images, folders, glob patterns or list files",
    )
    group.add_argument("--max-images", type=int, default=16, help="show at most this many images")
    group.add_argument(
        "--foreground-threshold",
        type=float,
        default=None,
        metavar="X",
        help="keep patches whose min-max normalised first component exceeds X, refit PCA on them (DINOv2 demo)",
    )
    group.add_argument(
        "--invert-foreground", action="store_true", help="foreground is below the threshold instead"
    )
    group.add_argument(
        "--resize-mode", default="resize", choices=["resize", "crop"], help="how images become S x S"
    )
    group.add_argument("--filename", default="pca_maps.png", help="name of the PNG written in --output-dir")


def settings_of(args: argparse.Namespace) -> Any:
    """The :class:`franca.eval.pca_maps.PcaSettings` of the options (checked before the model loads; without
    --size, the size is set to the checkpoint's once it has loaded)."""
    from franca.eval.pca_maps import PcaSettings

    return PcaSettings(
        size=args.size if args.size is not None else PcaSettings.size,
        foreground_threshold=args.foreground_threshold,
        invert_foreground=args.invert_foreground,
        tokens=args.tokens,
        resize_mode=args.resize_mode,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Draw the PCA maps of the images (:func:`franca.eval.pca_maps.evaluate_pca`), write the PNG and ``pca.json``."""
    from franca.data.images import list_images
    from franca.eval.pca_maps import evaluate_pca

    settings = settings_of(args)
    model, device = common.load_model(args)
    settings = dataclasses.replace(settings, size=args.size)
    paths = list_images(args.images)[: max(1, args.max_images)]
    output_dir = (
        Path(args.output_dir) if args.output_dir is not None else defaults.DEFAULT_OUTPUT_ROOT / "pca"
    )
    result = evaluate_pca(
        model, paths, output_dir, settings, filename=args.filename, device=device, batch_size=args.batch_size
    )
    results = result.to_dict()
    common.finish(results, args, "pca", output_dir=output_dir)
    return results
