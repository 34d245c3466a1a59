"""``franca embed PATH... --checkpoint CKPT --out FILE``: features of a folder, glob or list of images."""

from __future__ import annotations

import argparse
import os
import time

from franca.cli.options import input_size, non_negative_int, output_file, positive_int
from franca.features.files import OUTPUT_SUFFIXES, save_embeddings


def _shown(path: os.PathLike | str) -> str:
    """``path`` for the terminal: bytes that are not UTF-8 as ``\\xff`` escapes, control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="image folders (recursive), globs, list files or images"
    )
    parser.add_argument(
        "--checkpoint", required=True, metavar="CKPT", help="backbone checkpoint (.pth/.pt/.safetensors)"
    )
    parser.add_argument(
        "--out",
        required=True,
        type=output_file(OUTPUT_SUFFIXES),
        metavar="FILE",
        help="output .npy or .safetensors file; the row order goes to <stem>.paths.jsonl beside it",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="input side in pixels, a multiple of the patch size (default: the resolution the checkpoint records)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    parser.add_argument(
        "--tokens",
        default="cls",
        help="comma-separated tokens to write, each under the name given: cls, patch, mean (of the patch tokens), "
        "patch_rasa, or another token of franca.features.tokens (pooled, pooled_rasa, registers)",
    )
    parser.add_argument(
        "--rasa", default=None, metavar="HEAD", help="RASA head file to attach (enables patch_rasa)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument(
        "--runtime",
        choices=("auto", "torch", "onnx"),
        default="auto",
        help="run the checkpoint with PyTorch, or an .onnx file written by `franca export` with onnxruntime on the "
        "CPU (needs the onnx extra); auto (default): onnx for a .onnx checkpoint, torch otherwise",
    )
    parser.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")


def _runtime(args: argparse.Namespace) -> str:
    """The runtime asked for, resolved: ``onnx`` for a .onnx checkpoint under ``auto``; ConfigError for --rasa."""
    from franca.core.errors import ConfigError

    runtime = args.runtime
    if runtime == "auto":
        runtime = "onnx" if str(args.checkpoint).lower().endswith(".onnx") else "torch"
    if runtime == "onnx" and args.rasa:
        raise ConfigError(
            "--rasa cannot be attached to an ONNX graph: export the backbone with its RASA head instead "
            "(franca export --checkpoint CKPT --rasa HEAD --format onnx)"
        )
    return runtime


def run(args: argparse.Namespace) -> int:
    """Embed the images and write the features; torch is imported here, not when the parser is built."""
    import torch

    from franca.core.runtime import resolve_device
    from franca.data.images import list_images
    from franca.features.embed import embed_images
    from franca.models.checkpoints import load_backbone

    start = time.perf_counter()
    tokens = [kind.strip() for kind in args.tokens.split(",") if kind.strip()]
    paths = list_images(args.paths)
    if _runtime(args) == "onnx":
        from franca.models.export import OnnxBackbone

        device, model = resolve_device("cpu"), OnnxBackbone(args.checkpoint, threads=torch.get_num_threads())
    else:
        device, model = resolve_device(args.device), load_backbone(args.checkpoint, rasa=args.rasa)
    result = embed_images(
        model,
        paths,
        size=input_size(args.size, model),
        batch_size=args.batch_size,
        tokens=tokens,
        device=device,
        num_workers=args.num_workers,
    )
    written = save_embeddings(result, args.out)
    shapes = ", ".join(f"{kind} {tuple(value.shape)}" for kind, value in result.features.items())
    print(
        f"embedded {len(result.paths)} of {len(paths)} images ({len(result.skipped)} unreadable, skipped) "
        f"in {time.perf_counter() - start:.1f}s on {device}: {shapes}"
    )
    for path in result.skipped[:10]:
        print(f"  skipped: {_shown(path)}")
    print("wrote " + ", ".join(_shown(p) for p in written))
    return 0
