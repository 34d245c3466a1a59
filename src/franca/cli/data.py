"""``franca data``: make data sets. ``franca data synth --out DIR`` writes the procedural synthetic shapes data set.

:mod:`franca.data.synth` (numpy and PIL, no torch) is imported with the parser, for its list of styles.
"""

from __future__ import annotations

import argparse
import os
import time

from franca.cli.options import DefaultsHelpFormatter, output_folder
from franca.data.synth import STYLES, generate_synthetic_dataset

DEFAULT_TRAIN_IMAGES = 10000
DEFAULT_VAL_IMAGES = 1000


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``data`` actions (currently ``synth``) as sub-commands of ``parser``."""
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION")
    synth = actions.add_parser(
        "synth",
        formatter_class=DefaultsHelpFormatter,
        help="write the procedural synthetic shapes data set (train/val ImageFolders + segmentation masks)",
        description="Write the procedural synthetic shapes data set: DIR/{train,val}/<class>/<stem>.png images, "
        "DIR/masks/{train,val}/<class>/<stem>.png masks (0 background, class id + 1 objects, 255 ignore), "
        "DIR/classes.json and DIR/README.txt. The same arguments always give the same bytes.",
    )
    synth.add_argument(
        "--out",
        required=True,
        type=output_folder,
        help="output folder (created; must be empty or a previous synth output)",
    )
    synth.add_argument(
        "--num-images", type=int, default=DEFAULT_TRAIN_IMAGES, help="training images (default %(default)s)"
    )
    synth.add_argument(
        "--val-images", type=int, default=DEFAULT_VAL_IMAGES, help="validation images (default %(default)s)"
    )
    synth.add_argument("--size", type=int, default=64, help="image side in pixels (default %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    synth.add_argument(
        "--style",
        choices=sorted(STYLES),
        default="default",
        help="difficulty preset (franca.data.synth.STYLES; default %(default)s)",
    )
    synth.add_argument(
        "--workers",
        type=int,
        default=_default_workers(),
        help="rendering processes (default %(default)s); the output does not depend on it",
    )
    synth.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty folder that is not a previous synth output "
        "(replaces its train/, val/, masks/, classes.json and README.txt)",
    )
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(_data_parser=parser)


def run(args: argparse.Namespace) -> int:
    """Run the chosen ``data`` action; returns the exit status (0 on success, 1 when no action was given)."""
    if getattr(args, "data_action", None) != "synth":
        args._data_parser.print_help()
        return 1
    start = time.perf_counter()
    info = generate_synthetic_dataset(
        args.out,
        num_train=args.num_images,
        num_val=args.val_images,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
        style=STYLES[args.style],
    )
    elapsed = time.perf_counter() - start
    print(
        f"franca data synth: wrote {info.num_train} train + {info.num_val} val images "
        f"({len(info.classes)} classes, {info.size} px, seed {info.seed}, style {args.style}) to {info.root} "
        f"in {elapsed:.1f} s"
    )
    return 0
