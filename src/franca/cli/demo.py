"""``franca demo``: synthetic data, a tiny Franca pre-training, evaluation against random init, an HTML report.

The work is done by :func:`franca.apps.demo.run_demo`; this module only maps the options onto
:class:`franca.apps.demo.DemoSettings`, shows the demo's phase lines (log records of the ``franca.demo`` logger) on
stdout as they come, and prints the closing summary. Heavy imports happen inside :func:`run` so that
``franca --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from franca.cli import LineHandler

DEFAULT_OUTPUT = "runs/demo"
DEFAULT_QUICK_OUTPUT = "runs/demo_quick"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``franca demo``."""
    from franca.cli.options import output_folder
    from franca.data.synth import STYLES

    parser.add_argument(
        "--output-dir",
        default=None,
        type=output_folder,
        metavar="DIR",
        help=f"where the run, report.html and metrics.json go (default {DEFAULT_OUTPUT}; "
        f"{DEFAULT_QUICK_OUTPUT} with --quick)",
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="synthetic data set folder: reused when complete, generated otherwise (default OUTPUT_DIR/data)",
    )
    parser.add_argument("--num-images", type=int, default=None, help="training images (default 10000)")
    parser.add_argument("--val-images", type=int, default=None, help="validation images (default 1000)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default %(default)s)")
    parser.add_argument(
        "--style",
        default="textured-large",
        choices=sorted(STYLES),
        help="difficulty of the synthetic data set (default %(default)s; see `franca data synth --help`)",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="pre-training iterations (default: the tiny_cpu preset's on CPU, 2500 on CUDA)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="pre-training batch (default: the tiny_cpu preset's on CPU, 128 on CUDA)",
    )
    parser.add_argument(
        "--time-budget-min",
        type=float,
        default=10.0,
        help="pre-train for at most this many minutes (default %(default)s): training stops with a checkpoint "
        "before its next step would pass the budget, and a re-run continues an unfinished run",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also the head-mode study: slice, project, tied and the DINOv2 single-head baseline, each trained to "
        "the end for --seeds seeds at equal iterations and at equal wall time, compared seed by seed; writes "
        "<output-dir>/ablation/report.html (resumable: a re-run trains and scores only what is missing)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="--ablation: training seeds per head mode (--seed, --seed + 1, ...)",
    )
    parser.add_argument(
        "--ablation-budgets",
        nargs="+",
        choices=("iterations", "time"),
        default=["iterations", "time"],
        help="--ablation: compare the modes at equal iterations, at equal wall time (a cheaper step trains "
        "longer), or both",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a look in well under a minute on 2 CPU cores (~35 s once the data exist): 2000/500 images, 60 "
        "iterations, lighter evaluation (numbers are not the demo's)",
    )
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="do not train: evaluate and report the run(s) already in OUTPUT_DIR as they are",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (default %(default)s)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes for data generation and loading (default: CPUs, <= 4)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (phase lines stay)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="extra training config overrides applied after the demo's own, e.g. optim.base_lr=1e-3",
    )


@contextlib.contextmanager
def _phase_lines_on_stdout() -> Iterator[None]:
    """While the demo runs, its ``[demo 1m23s] ...`` lines go to stdout as they are (not as ``franca: ...``
    records on stderr); the logger is restored afterwards."""
    from franca.apps.demo.progress import LOGGER_NAME

    logger = logging.getLogger(LOGGER_NAME)
    handler = LineHandler(stream="stdout", fmt="%(message)s")
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def run(args: argparse.Namespace) -> int:
    """Build the settings from ``args`` and run the demo; returns 0."""
    from franca.apps.demo import DemoSettings, apply_quick, run_demo, summary_text
    from franca.core.errors import ConfigError

    for name in ("num_images", "val_images", "iterations", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1 (got {args.seeds})")
    if args.time_budget_min <= 0:
        raise ConfigError(f"--time-budget-min must be > 0 (got {args.time_budget_min})")
    explicit = {
        name for name in ("num_images", "val_images", "iterations") if getattr(args, name) is not None
    }
    output = args.output_dir or (DEFAULT_QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT)
    settings = DemoSettings(
        output_dir=Path(output),
        data_dir=Path(args.data) if args.data else None,
        num_images=args.num_images or 10000,
        val_images=args.val_images or 1000,
        size=args.size,
        style=args.style,
        iterations=args.iterations,
        batch_size=args.batch_size,
        time_budget_min=args.time_budget_min,
        ablation=args.ablation,
        seeds=args.seeds,
        ablation_budgets=tuple(dict.fromkeys(args.ablation_budgets)),
        device=args.device,
        quick=args.quick,
        eval_only=args.eval_only,
        seed=args.seed,
        overrides=list(args.overrides),
        workers=args.workers,
        progress=not args.no_progress,
    )
    with _phase_lines_on_stdout():
        metrics = run_demo(apply_quick(settings, explicit))
    print(summary_text(metrics))
    return 0
