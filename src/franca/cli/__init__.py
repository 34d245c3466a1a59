"""The ``franca`` command line.

Each sub-command lives in its own module ``franca.cli.<name>`` with two functions,
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their command runs so that
``franca --help`` stays fast. Errors derived from :class:`franca.errors.FrancaError` are printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from franca.errors import FrancaError

COMMANDS: dict[str, str] = {
    "embed": "turn a folder of images into features with a backbone checkpoint",
    "data": "make data sets (the procedural synthetic data set)",
    "train": "pretrain with the Franca method",
    "checkpoint": "convert training checkpoints between sharded folders and single files",
    "eval": "evaluate a backbone (k-NN, linear probe, segmentation, ...)",
    "rasa": "train a RASA head that removes absolute position from patch features",
    "demo": "pretrain, evaluate and report on the synthetic data set",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="franca", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"franca.cli.{name}")
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=name)
        module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 1
    module = importlib.import_module(f"franca.cli.{args._module}")
    try:
        return int(module.run(args) or 0)
    except FrancaError as error:
        print(f"franca {args._module}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"franca {args._module}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
