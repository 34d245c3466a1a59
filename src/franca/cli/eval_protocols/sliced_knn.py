"""``franca eval sliced-knn``: k-NN on Matryoshka slices and PCA-truncated CLS features; writes ``sliced-knn.json``
and ``sliced-knn.png``, prints top-1 per width."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from franca.cli.eval_protocols import common
from franca.eval import defaults
from franca.eval.output import format_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``franca eval sliced-knn``."""
    common.add_common_arguments(parser, "sliced-knn")
    common.add_classification_data_arguments(parser)
    group = parser.add_argument_group("sliced k-NN")
    group.add_argument(
        "--dims", type=int, nargs="+", default=None, help="feature widths m (default d/16 ... d)"
    )
    group.add_argument(
        "--ks", type=int, nargs="+", default=list(defaults.SLICED_KS), help="numbers of neighbours"
    )
    group.add_argument(
        "--temperature", type=float, default=defaults.KNN_TEMPERATURE, help="softmax temperature T"
    )
    group.add_argument("--no-pca", action="store_true", help="skip the PCA-truncated baseline")
    group.add_argument(
        "--plot", default=None, metavar="PNG", help="plot path (default OUTPUT_DIR/sliced-knn.png)"
    )
    group.add_argument(
        "--name", default=None, help="model name in the plot legend (default the checkpoint stem)"
    )
    common.add_faiss_argument(group)


def settings_of(args: argparse.Namespace) -> Any:
    """The :class:`franca.eval.sliced.SlicedSettings` of the options (checked when built, before the model is
    read)."""
    from franca.eval.sliced import SlicedSettings

    return SlicedSettings(
        dims=tuple(args.dims) if args.dims else None,
        ks=tuple(args.ks),
        temperature=args.temperature,
        pca=not args.no_pca,
        use_faiss=common.faiss_option(args.faiss),
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`franca.eval.sliced.evaluate_sliced_knn`, draw the plot, print the table, write the JSON."""
    from franca.eval.sliced import evaluate_sliced_knn, plot_sliced, sliced_table_rows

    settings = settings_of(args)
    model, device = common.load_model(args)
    train, val = common.classification_data(args)
    result = evaluate_sliced_knn(model, train, val, settings, **common.extraction_options(args, device))
    results = result.to_dict()
    output_dir = Path(args.output_dir) if args.output_dir else defaults.DEFAULT_OUTPUT_ROOT / "sliced-knn"
    plot_path = Path(args.plot) if args.plot else output_dir / "sliced-knn.png"
    name = args.name or Path(args.checkpoint).stem
    results["plot"] = str(plot_sliced([(name, results)], plot_path))
    print(format_table(sliced_table_rows(results), None))
    common.finish(results, args, "sliced-knn", table=False, output_dir=output_dir)
    return results
