"""``franca eval knn``: weighted k-NN on CLS features (DINOv2 protocol); writes ``knn.json``, prints top-1/top-5."""

from __future__ import annotations

import argparse
from typing import Any

from franca.cli.eval_protocols import common
from franca.eval import defaults
from franca.eval.output import format_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``franca eval knn``."""
    common.add_common_arguments(parser, "knn")
    common.add_classification_data_arguments(parser)
    group = parser.add_argument_group("k-NN")
    group.add_argument(
        "--ks", type=int, nargs="+", default=list(defaults.KNN_KS), help="numbers of neighbours"
    )
    group.add_argument(
        "--temperature", type=float, default=defaults.KNN_TEMPERATURE, help="softmax temperature T"
    )
    common.add_faiss_argument(group)


def settings_of(args: argparse.Namespace) -> Any:
    """The :class:`franca.eval.knn.KnnSettings` of the options (checked when built, before the model is read)."""
    from franca.eval.knn import KnnSettings

    return KnnSettings(
        ks=tuple(args.ks), temperature=args.temperature, use_faiss=common.faiss_option(args.faiss)
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model and the data, run :func:`franca.eval.knn.evaluate_knn`, print the table, write ``knn.json``."""
    from franca.eval.knn import evaluate_knn, knn_table_rows

    settings = settings_of(args)
    model, device = common.load_model(args)
    train, val = common.classification_data(args)
    results = evaluate_knn(model, train, val, settings, **common.extraction_options(args, device)).to_dict()
    print(format_table(knn_table_rows(results), ["k", "top1", "top5"]))
    common.finish(results, args, "knn", table=False)
    return results
