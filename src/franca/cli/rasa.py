"""``franca rasa --checkpoint CKPT --data PATH... --output-dir DIR``: train a RASA head on a frozen backbone.

Writes ``DIR/rasa_head.pth`` (the official head layout), ``DIR/rasa_metrics.json`` (position R^2/MSE before and after
each removal step) and ``DIR/backbone_rasa.safetensors`` (the backbone with the folded RASA matrix attached, so that
``franca.load_backbone`` gives ``x_norm_patchtokens_rasa``).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

from franca.cli.options import input_size, non_negative_int, output_folder, positive_int
from franca.core.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, metavar="CKPT", help="backbone checkpoint (.pth/.pt/.safetensors)"
    )
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="PATH",
        help="image folders (recursive), globs, list files or images",
    )
    parser.add_argument(
        "--output-dir",
        required=True,
        type=output_folder,
        metavar="DIR",
        help="folder for the head, metrics and backbone",
    )
    parser.add_argument(
        "--iterations", type=positive_int, default=8, help="removal steps to train (paper: 8; releases: 9-10)"
    )
    parser.add_argument("--epochs", type=positive_int, default=5, help="epochs per iteration (paper: 5)")
    parser.add_argument(
        "--lr", type=float, default=2e-3, help="AdamW learning rate, cosine to 0 (paper: 2e-3)"
    )
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (paper: 0)")
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="crop side in pixels, a multiple of the patch size (default: the model's)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per step (paper: 128)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument(
        "--max-images", type=positive_int, default=None, help="use a random subset of at most N images"
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.1,
        help="fraction of the images kept out of training to measure the position metrics on (0: measure on the "
        "training features)",
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="re-augment and re-extract features every epoch (the paper's recipe; slower) instead of extracting one "
        "augmented view per image once",
    )
    parser.add_argument(
        "--orthogonal-steps",
        action="store_true",
        help="make each removal plane orthogonal to the earlier ones so that every step removes linear position "
        "information (not the official method, whose steps after the first only shrink it)",
    )
    parser.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the subset, split, augmentation and initialisation"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _split(
    paths: list[Path], holdout: float, max_images: int | None, seed: int
) -> tuple[list[Path], list[Path]]:
    """A seeded random subset of ``max_images`` paths, split into (training, held-out) lists in their listed order."""
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    if max_images is not None:
        order = order[:max_images]
    held = 0
    if holdout > 0 and len(order) >= 2:
        held = min(len(order) - 1, max(1, round(len(order) * holdout)))
    return [paths[i] for i in sorted(order[held:])], [paths[i] for i in sorted(order[:held])]


def _table(result: Any) -> str:
    """Per-iteration position metrics as an aligned text table."""
    header = f"{'step':>6} {'train loss':>11} {'pred R^2':>9} {'pred MSE':>10} {'pos R^2 left':>13} {'pos MSE left':>13}"
    lines = [header, "-" * len(header)]
    base = result.baseline
    lines.append(
        f"{'before':>6} {'':>11} {'':>9} {'':>10} {base['linear_r2']:>13.4f} {base['linear_mse']:>13.6f}"
    )
    for entry in result.metrics:
        lines.append(
            f"{entry['iteration']:>6d} {entry['train_loss']:>11.6f} {entry['predictor_r2']:>9.4f} "
            f"{entry['predictor_mse']:>10.6f} {entry['linear_r2']:>13.4f} {entry['linear_mse']:>13.6f}"
        )
    return "\n".join(lines)


def _plan(args: argparse.Namespace, images: tuple[int, int], size: int, patch_size: int, device: Any) -> str:
    """The line that says what the run will do, before it starts."""
    grid = size // patch_size
    return (
        f"RASA on {args.checkpoint}: {images[0]} training images, {images[1]} held out, "
        f"{size} px ({grid}x{grid} patches), {args.iterations} iterations x "
        f"{args.epochs} epochs, lr {args.lr:g}, batch {args.batch_size}, "
        f"{'features re-extracted every epoch' if args.no_cache else 'features cached'}, on {device}"
    )


def _recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`franca.rasa.train_rasa` given by the options."""
    return {
        "iterations": args.iterations,
        "epochs_per_iteration": args.epochs,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "cache_features": not args.no_cache,
        "orthogonal_steps": args.orthogonal_steps,
        "seed": args.seed,
        "progress": not args.quiet,
    }


def _results_text(result: Any) -> str:
    """The position metrics table, and the number of unreadable images when there were some."""
    text = (
        f"\nposition metrics on the {result.settings['metrics_on']} (R^2 left: closed-form linear fit, 2-fold CV)\n"
        + _table(result)
    )
    if result.settings.get("skipped_images"):
        text += f"\nskipped {result.settings['skipped_images']} unreadable images"
    return text


def _closing_text(checkpoint: str, files: Any, had_rasa: bool, seconds: float) -> str:
    """What was written and how to load it (with a note when the checkpoint's own RASA matrix was replaced)."""
    note = (
        f"note: the RASA matrix that came with {checkpoint} was replaced by the new one\n" if had_rasa else ""
    )
    return (
        f"{note}\nwrote {files.head}, {files.metrics} and {files.backbone} in {seconds:.1f}s\n"
        "load it with:\n"
        f'  model = franca.load_backbone("{files.backbone}")\n'
        f'  or: model = franca.load_backbone("{checkpoint}", rasa="{files.head}")\n'
        '  model.forward_features(images)["x_norm_patchtokens_rasa"]  # patch tokens without absolute position'
    )


def run(args: argparse.Namespace) -> int:
    """Train the head and write its files; torch is imported here, not when the parser is built."""
    from franca.core.runtime import resolve_device
    from franca.data.images import list_images
    from franca.models.checkpoints import load_backbone
    from franca.rasa import rasa_loaders, save_rasa_outputs, train_rasa

    start = time.perf_counter()
    if not 0 <= args.holdout < 1:
        raise ConfigError(f"--holdout {args.holdout}: give a fraction in [0, 1)")
    device = resolve_device(args.device)
    model = load_backbone(args.checkpoint)
    had_rasa = model.rasa is not None
    model.set_rasa(None)
    size = input_size(args.size, model)
    train_paths, heldout_paths = _split(list_images(args.data), args.holdout, args.max_images, args.seed)
    loader, eval_loader = rasa_loaders(
        train_paths, heldout_paths, size, args.batch_size, args.num_workers, args.seed, device.type == "cuda"
    )
    print(_plan(args, (len(train_paths), len(heldout_paths)), size, model.patch_size, device))
    result = train_rasa(model, loader, eval_data=eval_loader, device=device, **_recipe(args))
    print(_results_text(result))
    settings = {
        "checkpoint": str(args.checkpoint),
        "data": [str(item) for item in args.data],
        "size": size,
        "train_images": len(train_paths),
        "heldout_images": len(heldout_paths),
        "seed": args.seed,
        "device": str(device),
    }
    files = save_rasa_outputs(result, model, args.output_dir, settings, source=args.checkpoint)
    print(_closing_text(args.checkpoint, files, had_rasa, time.perf_counter() - start))
    return 0
