"""Options and run glue shared by the ``franca eval <protocol>`` commands.

Defining options imports no torch; the glue functions (:func:`load_model`, :func:`classification_data`,
:func:`segmentation_data`, :func:`finish`) import the library when a protocol runs.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from franca.cli.options import input_size, non_negative_int, output_folder, positive_int
from franca.eval import defaults
from franca.eval.output import format_table

FAISS_CHOICES = ("auto", "yes", "no")


# --------------------------------------------------------------------------------------------------- options
def add_common_arguments(parser: argparse.ArgumentParser, protocol: str | None = None) -> None:
    """Add the options every protocol shares: --checkpoint, --rasa, --output-dir, --size, --batch-size, ...

    ``protocol`` only sets the shown default of --output-dir (``runs/eval/<protocol>``); without it the default is
    resolved by :func:`franca.eval.common.write_results` from the result name.
    """
    default_dir = str(defaults.DEFAULT_OUTPUT_ROOT / protocol) if protocol else None
    group = parser.add_argument_group("model and run")
    group.add_argument(
        "--checkpoint", required=True, metavar="CKPT", help="backbone checkpoint (.pth/.pt/.safetensors)"
    )
    group.add_argument(
        "--rasa",
        default=None,
        metavar="HEAD",
        help="attach a RASA head (file with the head or a folded DxD matrix) to the patch features; "
        "'checkpoint' uses the rasa_head.* tensors stored in --checkpoint",
    )
    group.add_argument(
        "--output-dir",
        type=output_folder,
        default=default_dir,
        metavar="DIR",
        help=f"where to write the JSON results (default: {default_dir or 'runs/eval/<protocol>'})",
    )
    group.add_argument(
        "--size",
        type=int,
        default=None,
        help="input side in pixels, a multiple of the patch size (default: the resolution the checkpoint records, "
        "e.g. 518 for the released Franca files, 32 for the demo's model)",
    )
    group.add_argument(
        "--batch-size", type=positive_int, default=defaults.EXTRACT_BATCH_SIZE, help="images per forward pass"
    )
    group.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    group.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    group.add_argument("--seed", type=int, default=0, help="seed of every random choice of the protocol")


def add_classification_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--train and --val ImageFolder roots (class subfolders), shared by the classification protocols."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--train", required=True, metavar="DIR", help="train ImageFolder root (one subfolder per class)"
    )
    group.add_argument(
        "--val", required=True, metavar="DIR", help="val ImageFolder root with the same class subfolders"
    )


def add_faiss_argument(group: argparse._ArgumentGroup) -> None:
    """The --faiss choice of the k-NN protocols (see :func:`faiss_option`)."""
    group.add_argument(
        "--faiss",
        choices=FAISS_CHOICES,
        default="auto",
        help="exact search with faiss (auto: when installed)",
    )


def faiss_option(value: str) -> bool | str:
    """Map the --faiss choice to knn_classify's ``use_faiss``."""
    return {"auto": "auto", "yes": True, "no": False}[value]


def add_segmentation_arguments(parser: argparse.ArgumentParser, train: bool = True) -> None:
    """Options naming the segmentation data, shared by the dense protocols (``--train`` only when ``train``)."""
    group = parser.add_argument_group("segmentation data")
    if train:
        group.add_argument("--train", required=True, metavar="DIR", help="train data set root")
        group.add_argument("--train-split", default="train", help="train split name (VOC: e.g. trainaug)")
    group.add_argument("--val", required=True, metavar="DIR", help="validation data set root")
    group.add_argument("--val-split", default="val", help="validation split name")
    group.add_argument(
        "--layout", default="auto", choices=list(defaults.LAYOUTS), help="data set layout (default: detect)"
    )
    group.add_argument(
        "--resize-mode",
        default="resize",
        choices=list(defaults.RESIZE_MODES),
        help="resize: image and mask to SIZE x SIZE (default); crop: shorter side to SIZE, then centre crop",
    )
    group.add_argument("--num-classes", type=int, default=None, help="number of classes (default: inferred)")
    group.add_argument(
        "--ignore-background",
        action="store_true",
        help="treat label 0 as ignore and shift the other labels down",
    )
    group.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="use at most this many images of each split: a seeded uniform sample (seed 0, the same for every "
        "model), in listed order (default: all)",
    )


def add_token_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--tokens`` option: which patch features the dense protocols use."""
    parser.add_argument(
        "--tokens",
        default="auto",
        choices=list(defaults.TOKEN_CHOICES),
        help="patch features: final-norm patch tokens (patch), RASA tokens (rasa), or auto (RASA when --rasa is given)",
    )


# --------------------------------------------------------------------------------------------------- run glue
def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """Seed everything with --seed, then load --checkpoint (with --rasa) on --device, checking --size: (model,
    device)."""
    from franca.core.runtime import seed_everything
    from franca.eval.common import load_model as load_eval_model

    seed_everything(args.seed)
    model, device = load_eval_model(args.checkpoint, rasa=args.rasa, device=args.device, size=args.size)
    if args.size is None:
        args.size = input_size(None, model)
        logging.getLogger(__name__).info(
            "evaluating at %d px, the resolution the checkpoint records (--size to change)", args.size
        )
    return model, device


def classification_data(args: argparse.Namespace) -> tuple[Any, Any]:
    """The --train and --val ImageFolder data sets at --size (:func:`franca.eval.common.classification_datasets`)."""
    from franca.eval.common import classification_datasets

    return classification_datasets(args.train, args.val, args.size)


def extraction_options(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """The feature-extraction keywords of an image-level ``evaluate_<protocol>``: --batch-size, --num-workers and
    the model's ``device``."""
    return {"batch_size": args.batch_size, "num_workers": args.num_workers, "device": device}


def segmentation_data(args: argparse.Namespace, train: bool = True) -> tuple[Any, Any]:
    """(train data set or None, val data set) from the options of :func:`add_segmentation_arguments`."""
    from franca.eval.segmentation_data import build_segmentation_datasets

    return build_segmentation_datasets(
        args.val,
        args.train if train else None,
        train_split=args.train_split if train else "train",
        val_split=args.val_split,
        layout=args.layout,
        size=args.size,
        resize_mode=args.resize_mode,
        num_classes=args.num_classes,
        ignore_background=args.ignore_background,
        max_samples=args.max_images,
    )


def add_data_facts(results: dict[str, Any], args: argparse.Namespace, val: Any, train: Any = None) -> None:
    """Record the data sets (``train_data``, ``val_data``) and --size in a dense protocol's results."""
    if train is not None:
        results["train_data"] = train.describe()
    results["val_data"] = val.describe()
    results["size"] = args.size


def print_metrics(name: str, checkpoint: str | None, results: dict[str, Any]) -> None:
    """Print ``name (checkpoint)`` and a table of every scalar of ``results`` (nested keys joined by ``/``)."""
    from franca.eval.common import flatten_scalars

    scalars = flatten_scalars(results)
    if scalars:
        rows = [{"metric": key, "value": value} for key, value in scalars.items()]
        print(f"{name} ({checkpoint or 'model'})")
        print(format_table(rows, ["metric", "value"]))


def finish(
    results: dict[str, Any],
    args: argparse.Namespace,
    name: str,
    table: bool = True,
    output_dir: str | Path | None = None,
) -> Path:
    """Write ``<name>.json`` to ``output_dir`` (default --output-dir), print the metric table (unless ``table`` is
    False) and the file's path; returns the path."""
    from franca.eval.common import write_results

    path = write_results(results, output_dir if output_dir is not None else args.output_dir, name, args)
    if table:
        print_metrics(name, args.checkpoint, results)
    print(f"{name}: results written to {path}")
    return path
