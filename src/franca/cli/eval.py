"""``franca eval <protocol>``: evaluate a frozen backbone checkpoint.

Protocols (each a module of :mod:`franca.cli.eval_protocols` with ``add_arguments(parser)`` and ``run(args)``, which
calls the ``evaluate_<protocol>`` entry of its :mod:`franca.eval` module):

- ``knn``: weighted k-NN on CLS features (DINOv2 protocol, k = 10/20/100/200, T = 0.07);
- ``sliced-knn``: k-NN on the first m dims and on PCA-truncated features (Matryoshka check, plot);
- ``linear``: linear probe, many (feature set, lr) heads trained jointly, chosen on a held-out split;
- ``logreg``: L-BFGS logistic regression with a C sweep (fine-grained protocol);
- ``hummingbird``: in-context segmentation by patch retrieval;
- ``linear-seg``: linear segmentation head on frozen patch tokens;
- ``overcluster``: K-means overclustering of patch tokens;
- ``pca``: PCA visualisations of patch features.

Every protocol writes ``OUTPUT_DIR/<protocol>.json`` (default ``runs/eval/<protocol>``) and prints a table. Building
the parsers imports no torch: a protocol's library module is imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib

from franca.cli.options import DefaultsHelpFormatter

_MODULES = "franca.cli.eval_protocols"

PROTOCOLS: dict[str, tuple[str, str]] = {
    "knn": (f"{_MODULES}.knn", "weighted k-NN on CLS features (DINOv2 protocol)"),
    "sliced-knn": (
        f"{_MODULES}.sliced_knn",
        "k-NN on Matryoshka slices and PCA-truncated features, with a plot",
    ),
    "linear": (f"{_MODULES}.linear", "linear probe: (feature set, lr) heads trained jointly"),
    "logreg": (f"{_MODULES}.logreg", "logistic regression with a C sweep (fine-grained protocol)"),
    "hummingbird": (f"{_MODULES}.hummingbird", "HummingBird in-context semantic segmentation"),
    "linear-seg": (f"{_MODULES}.linear_seg", "linear semantic segmentation on frozen patch tokens"),
    "overcluster": (f"{_MODULES}.overcluster", "K-means overclustering of patch tokens"),
    "pca": (f"{_MODULES}.pca", "PCA visualisations of patch features"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one sub-command per protocol, each with that protocol's own options."""
    parser.set_defaults(_eval_parser=parser)
    subparsers = parser.add_subparsers(dest="protocol", metavar="PROTOCOL")
    for name, (module_name, help_text) in PROTOCOLS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter
        )
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
