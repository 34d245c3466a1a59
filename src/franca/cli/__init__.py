"""The ``franca`` command line.

Each sub-command lives in its own module ``franca.cli.<name>`` with two functions,
``add_arguments(parser)`` and ``run(args) -> int``. Building the parser imports every one of these modules, so they
import no torch at module level: the library modules that do (models, features, rasa, train, eval) are imported
inside ``run``, when the command runs, and ``franca --help`` stays fast (tests/test_cli_startup.py checks it).
Errors derived from :class:`franca.core.errors.FrancaError` are printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from franca.cli.options import DefaultsHelpFormatter
from franca.core.errors import FrancaError

# The extra that installs each optional package a command may need (pyproject.toml).
EXTRA_OF: dict[str, str] = {
    "omegaconf": "train",
    "sklearn": "eval",
    "scipy": "eval",
    "matplotlib": "report",
    "jinja2": "report",
    "faiss": "faiss",
    "webdataset": "webdataset",
    "tensorboard": "tensorboard",
    "onnx": "onnx",
    "onnxruntime": "onnx",
}

COMMANDS: dict[str, str] = {
    "embed": "turn a folder of images into features with a backbone checkpoint",
    "data": "make data sets (the procedural synthetic data set)",
    "train": "pretrain with the Franca method",
    "checkpoint": "convert training checkpoints between sharded folders and single files",
    "export": "write a backbone as ONNX, a timm state dict, a Hugging Face folder or safetensors",
    "eval": "evaluate a backbone (k-NN, linear probe, segmentation, ...)",
    "rasa": "train a RASA head that removes absolute position from patch features",
    "demo": "pretrain, evaluate and report on the synthetic data set",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="franca", description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"franca.cli.{name}")
        sub = subparsers.add_parser(
            name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter
        )
        sub.set_defaults(_module=name)
        module.add_arguments(sub)
    return parser


class LineHandler(logging.Handler):
    """Writes each record as one line to ``sys.stderr`` or ``sys.stdout`` as they are at the time of the record (test
    capture swaps them), through tqdm (:meth:`franca.core.progress.ProgressBar.write`), so running progress bars stay
    whole. The CLI shows the library's log with it (``franca: message`` on stderr); a command can show one logger's
    records as its own output lines (``stream="stdout"``, ``fmt="%(message)s"``)."""

    def __init__(self, stream: str = "stderr", fmt: str = "franca: %(message)s") -> None:
        super().__init__()
        self.stream_name = stream
        self.setFormatter(logging.Formatter(fmt))

    def emit(self, record: logging.LogRecord) -> None:
        from franca.core.progress import ProgressBar  # tqdm: not imported by `franca --help`

        try:
            stream = getattr(sys, self.stream_name)
            ProgressBar.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # logging's contract: report through handleError, never raise
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """Show the library's ``franca`` log records of ``level`` and above on stderr (once per process)."""
    log = logging.getLogger("franca")
    log.setLevel(level)
    if not any(isinstance(handler, LineHandler) for handler in log.handlers):
        log.addHandler(LineHandler())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
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
    except ModuleNotFoundError as error:
        package = (error.name or "").split(".")[0]
        if package not in EXTRA_OF:
            raise
        extra = EXTRA_OF[package]
        print(
            f"franca {args._module}: error: needs {package}, which the '{extra}' extra installs: "
            f"pip install 'franca[{extra}]' (or 'franca[all]')",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"franca {args._module}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
