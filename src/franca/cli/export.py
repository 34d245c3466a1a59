"""``franca export --checkpoint CKPT --format onnx|timm|hf|safetensors --out PATH``: a backbone for other tools.

    franca export --checkpoint franca_vitb14_In21K.pth --format onnx --out franca_vitb14.onnx
    franca export --checkpoint franca_vitb14_In21K.pth --format timm --out franca_vitb14_timm.safetensors
    franca export --checkpoint franca_vitb14_In21K.pth --format hf --out franca_vitb14_hf/ --img-size 224
    franca export --checkpoint dinov2_hf_folder/ --format safetensors --out dinov2.safetensors

The command prints the file written and the line that loads it in the target library.
"""

from __future__ import annotations

import argparse
import re

from franca.cli.options import positive_int

# franca.models.export.FORMATS, spelled out so that building the parser imports no torch (a test keeps them equal)
FORMATS = ("onnx", "timm", "hf", "safetensors")
_SIZE = re.compile(r"^(\d+)(?:x(\d+))?$")


def image_size(text: str) -> int | tuple[int, int]:
    """argparse type of ``--img-size``: ``518`` (square) or ``HEIGHTxWIDTH`` (``518x392``), in pixels."""
    match = _SIZE.match(text.strip().lower())
    if not match or int(match.group(1)) < 1 or (match.group(2) and int(match.group(2)) < 1):
        raise argparse.ArgumentTypeError(f"{text!r}: give a side in pixels (518) or HEIGHTxWIDTH (518x392)")
    height = int(match.group(1))
    return (height, int(match.group(2))) if match.group(2) else height


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="CKPT",
        help="backbone checkpoint: .pth/.pt/.safetensors (franca, official, timm) or a transformers model folder",
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="onnx: forward_features graph (dynamic batch and size); timm: state dict for timm.create_model; hf: "
        "transformers model folder; safetensors: franca's own export",
    )
    parser.add_argument(
        "--out", required=True, metavar="PATH", help=".onnx or .safetensors file, or (hf) a folder to write"
    )
    parser.add_argument(
        "--rasa", default=None, metavar="HEAD", help="RASA head to attach (onnx and safetensors keep it)"
    )
    parser.add_argument(
        "--img-size",
        type=image_size,
        default=None,
        metavar="SIZE",
        help="timm/hf: the input size (518 or HEIGHTxWIDTH) whose positions are stored, when the library resizes "
        "positions otherwise than the model (default: the model's grid)",
    )
    parser.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default 17)")


def _usage(result, shown: str) -> str:  # noqa: ANN001 - an Export (franca.models.export), imported at run time
    """The line that loads what was written in its own library."""
    if result.format == "onnx":
        return (
            f"onnxruntime.InferenceSession({shown!r}) (opset {result.details['opset']}; outputs "
            f"{', '.join(result.details['outputs'])}), or franca.models.export.OnnxBackbone({shown!r})"
        )
    if result.format == "timm":
        kwargs = ", ".join(f"{key}={value!r}" for key, value in result.details["kwargs"].items())
        return (
            f"timm.create_model({result.details['model']!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={shown!r}), {kwargs})"
        )
    if result.format == "hf":
        return f"transformers.AutoModel.from_pretrained({shown!r})  # {result.details['architecture']}"
    return f"franca.load_backbone({shown!r})"


def run(args: argparse.Namespace) -> int:
    """Load the backbone, write it in the chosen format and say how to load it; torch is imported here only."""
    from franca.core.errors import ConfigError
    from franca.models.checkpoints import load_backbone
    from franca.models.export import ONNX_OPSET, export_backbone

    if args.rasa and args.format in ("timm", "hf"):
        raise ConfigError(
            f"--rasa: the {args.format} format has no place for a RASA head; use onnx or safetensors"
        )
    if args.img_size is not None and args.format not in ("timm", "hf"):
        raise ConfigError(
            f"--img-size applies to --format timm or hf; {args.format} exports take every input size"
        )
    if args.opset is not None and args.format != "onnx":
        raise ConfigError("--opset applies to --format onnx only")
    model = load_backbone(args.checkpoint, rasa=args.rasa)
    result = export_backbone(
        model, args.out, args.format, img_size=args.img_size, opset=args.opset or ONNX_OPSET
    )
    print(f"wrote {result.path} ({args.format})")
    data = result.path.with_name(result.path.name + ".data")
    if args.format == "onnx" and data.is_file():
        print(f"and its weights in {data} (past protobuf's 2 GB limit): keep the two files together")
    print(f"load it with: {_usage(result, str(result.path))}")
    if result.exact_size is not None:
        height, width = result.exact_size
        print(
            f"note: {args.format} resizes positions otherwise than this model; the features are franca's exactly at "
            f"{height}x{width} px (choose the size with --img-size)"
        )
    return 0
