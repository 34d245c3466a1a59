"""``franca train --config CONFIG --output-dir DIR [key=value ...]``: Franca pre-training (resumes automatically)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="a preset name (tiny_cpu, vitb14_in21k, vitl14_laion, ...) or a YAML file",
    )
    parser.add_argument(
        "--output-dir", default=None, metavar="DIR", help="run directory (default: train.output_dir)"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.base_lr=1e-3"
    )


def run(args: argparse.Namespace) -> int:
    import time

    from franca.train.config import load_config
    from franca.train.trainer import train

    config = load_config(args.config, args.overrides)
    callbacks = []
    if config.eval.every > 0:  # k-NN of the teacher every eval.every iterations (its folders are read now)
        from franca.apps.monitor import knn_monitor

        callbacks.append(knn_monitor(config))
    start = time.perf_counter()
    result = train(config, args.output_dir, progress=not args.no_progress, callbacks=callbacks)
    from franca.core.distributed import is_main_process

    if not is_main_process():
        return 0
    if result.last_metrics.get("loss") is not None:
        loss = f"final loss {result.last_metrics['loss']:.4f}, "
    else:
        loss = ""
    print(
        f"trained to iteration {result.iteration} in {time.perf_counter() - start:.0f}s ({loss}run: {result.output_dir})\n"
        f"teacher backbone: {result.backbone_path}  (franca.load_backbone)\n"
        f"teacher heads:    {result.heads_path}  (franca.load_heads)"
    )
    return 0
