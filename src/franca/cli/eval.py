"""``franca eval <protocol>``: evaluate a frozen backbone checkpoint.

Protocols (each a module of :mod:`franca.eval` with ``add_arguments(parser)`` and ``run(args)``):

- ``knn``: weighted k-NN on CLS features (DINOv2 protocol, k = 10/20/100/200, T = 0.07);
- ``sliced-knn``: k-NN on the first m dims and on PCA-truncated features (Matryoshka check, plot);
- ``linear``: linear probe, many (feature set, lr) heads trained jointly, chosen on a held-out split;
- ``logreg``: L-BFGS logistic regression with a C sweep (fine-grained protocol);
- ``hummingbird``: in-context segmentation by patch retrieval;
- ``linear-seg``: linear segmentation head on frozen patch tokens;
- ``overcluster``: K-means overclustering of patch tokens;
- ``pca``: PCA visualisations of patch features.

Every protocol writes ``OUTPUT_DIR/<protocol>.json`` (default ``runs/eval/<protocol>``) and prints a table.
"""

from __future__ import annotations

import argparse
import importlib

PROTOCOLS: dict[str, tuple[str, str]] = {
    "knn": ("franca.eval.knn", "weighted k-NN on CLS features (DINOv2 protocol)"),
    "sliced-knn": ("franca.eval.sliced", "k-NN on Matryoshka slices and PCA-truncated features, with a plot"),
    "linear": ("franca.eval.linear", "linear probe: (feature set, lr) heads trained jointly"),
    "logreg": ("franca.eval.logreg", "logistic regression with a C sweep (fine-grained protocol)"),
    "hummingbird": ("franca.eval.hummingbird", "HummingBird in-context semantic segmentation"),
    "linear-seg": ("franca.eval.linear_seg", "linear semantic segmentation on frozen patch tokens"),
    "overcluster": ("franca.eval.overclustering", "K-means overclustering of patch tokens"),
    "pca": ("franca.eval.pca_maps", "PCA visualisations of patch features"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one sub-command per protocol, each with that protocol's own options."""
    parser.set_defaults(_eval_parser=parser)
    subparsers = parser.add_subparsers(dest="protocol", metavar="PROTOCOL")
    for name, (module_name, help_text) in PROTOCOLS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_eval_module=module_name)
        module.add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    """Run the chosen protocol; returns the exit status (1 and the help text when no protocol was given)."""
    module_name = getattr(args, "_eval_module", None)
    if module_name is None:
        parser = getattr(args, "_eval_parser", None)
        if parser is not None:
            parser.print_help()
        return 1
    importlib.import_module(module_name).run(args)
    return 0
