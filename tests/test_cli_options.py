"""Options shared by ``franca embed``, every ``franca eval <protocol>`` and ``franca rasa``: bad values stop at parse time.

An output folder that is a file, a batch size below 1 or a negative number of workers must give one argparse error line
naming the option and the value (exit status 2), before any model or data is read, instead of a traceback at the end
of a long run or a DataLoader error.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from franca.cli import main
from franca.cli.eval import PROTOCOLS

# the required options of each command, with values that are never read (the parser stops first)
EVAL_REQUIRED: dict[str, list[str]] = {
    "knn": ["--train", "t", "--val", "v"],
    "sliced-knn": ["--train", "t", "--val", "v"],
    "linear": ["--train", "t", "--val", "v"],
    "logreg": ["--train", "t", "--val", "v"],
    "hummingbird": ["--train", "t", "--val", "v"],
    "linear-seg": ["--train", "t", "--val", "v"],
    "overcluster": ["--val", "v"],
    "pca": ["--images", "i"],
}


def test_every_protocol_is_covered() -> None:
    assert set(EVAL_REQUIRED) == set(PROTOCOLS)


def _commands(tmp_path: Path) -> dict[str, list[str]]:
    """argv of every command that has --batch-size and --num-workers, without those options."""
    checkpoint = str(tmp_path / "missing.safetensors")
    commands = {
        "embed": ["embed", "images", "--checkpoint", checkpoint, "--out", str(tmp_path / "out" / "f.npy")],
        "rasa": [
            "rasa",
            "--checkpoint",
            checkpoint,
            "--data",
            "images",
            "--output-dir",
            str(tmp_path / "rasa"),
        ],
    }
    for protocol, extra in EVAL_REQUIRED.items():
        commands[f"eval {protocol}"] = ["eval", protocol, "--checkpoint", checkpoint, *extra]
    return commands


def _output_dir_commands(tmp_path: Path) -> dict[str, list[str]]:
    """argv of every command with --output-dir, without it."""
    commands = _commands(tmp_path)
    del commands["embed"]
    commands["rasa"] = commands["rasa"][:-2]
    return commands


def _one_argparse_error(capsys, *needles: str) -> str:
    """The single ``error:`` line argparse printed (after its usage); checks that it names every needle."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert err.rstrip().splitlines()[-1] == errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("value", ["0", "-3"])
def test_batch_size_below_one_is_a_parse_error(tmp_path: Path, capsys, value: str) -> None:
    for name, argv in _commands(tmp_path).items():
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--batch-size", value])
        assert exit_info.value.code == 2, name
        line = _one_argparse_error(capsys, "--batch-size", value)
        assert line.startswith(f"franca {name}: error: argument --batch-size:"), line


def test_negative_num_workers_is_a_parse_error(tmp_path: Path, capsys) -> None:
    for name, argv in _commands(tmp_path).items():
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--num-workers", "-1"])
        assert exit_info.value.code == 2, name
        line = _one_argparse_error(capsys, "--num-workers", "-1")
        assert line.startswith(f"franca {name}: error: argument --num-workers:"), line


@pytest.mark.parametrize("option", ["--probe-batch-size", "--train-batch-size"])
def test_protocol_batch_sizes_below_one_are_parse_errors(tmp_path: Path, capsys, option: str) -> None:
    protocol = "linear" if option == "--probe-batch-size" else "linear-seg"
    with pytest.raises(SystemExit) as exit_info:
        main([*_commands(tmp_path)[f"eval {protocol}"], option, "0"])
    assert exit_info.value.code == 2
    _one_argparse_error(capsys, option)


def test_output_dir_that_is_a_file_is_a_parse_error(tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "results.json"
    a_file.write_text("{}")
    for name, argv in _output_dir_commands(tmp_path).items():
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--output-dir", str(a_file)])
        assert exit_info.value.code == 2, name
        _one_argparse_error(capsys, "--output-dir", f"{a_file} is a file; give a folder")
        # a folder below a file cannot be created either
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--output-dir", str(a_file / "sub")])
        assert exit_info.value.code == 2, name
        _one_argparse_error(capsys, "--output-dir", f"{a_file} is a file; give a folder")


@pytest.mark.parametrize(
    "argv", [["demo", "--quick", "--output-dir"], ["data", "synth", "--out"]], ids=["demo", "data-synth"]
)
def test_demo_and_data_output_folders_that_are_files_are_parse_errors(tmp_path: Path, capsys, argv) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, str(a_file)])
    assert exit_info.value.code == 2
    _one_argparse_error(capsys, argv[-1], f"{a_file} is a file; give a folder")


def test_embed_out_that_is_a_folder_or_below_a_file_is_a_parse_error(tmp_path: Path, capsys) -> None:
    argv = _commands(tmp_path)["embed"][:-2]
    folder = tmp_path / "features.npy"
    folder.mkdir()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    cases = {
        str(folder): f"{folder} is a folder; give a file name",
        str(a_file / "f.npy"): f"{a_file} is a file; give a folder",
        str(tmp_path / "features.csv"): "use a .npy or .safetensors file name",
    }
    for value, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", value])
        assert exit_info.value.code == 2, value
        _one_argparse_error(capsys, "--out", message)


def test_good_values_still_parse(tmp_path: Path) -> None:
    from franca.cli import build_parser

    parser = build_parser()
    existing = tmp_path / "existing"
    existing.mkdir()
    for argv in _output_dir_commands(tmp_path).values():
        args = parser.parse_args(
            [*argv, "--output-dir", str(existing), "--batch-size", "1", "--num-workers", "0"]
        )
        assert args.output_dir == str(existing) and args.batch_size == 1 and args.num_workers == 0
    args = parser.parse_args(_commands(tmp_path)["embed"])
    assert args.out == str(tmp_path / "out" / "f.npy") and args.batch_size == 32


def test_every_help_states_the_defaults(capsys) -> None:
    """`--help` names the default of every option that has one (issue: embed --tokens, overcluster --clusters)."""
    import argparse

    from franca.cli import main
    from franca.cli.options import DefaultsHelpFormatter

    for argv, expected in (
        (["embed", "--help"], ["(default: cls)", "(default: 32)"]),
        (["eval", "overcluster", "--help"], ["(default: 100 300)", "(default: 5)"]),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())  # undo the wrapping
        for piece in expected:
            assert piece in text, (argv, piece)
    parser = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--a", type=int, default=3, help="a number")
    parser.add_argument("--b", default=None, help="absent unless given")
    parser.add_argument("--c", action="store_true", help="a switch")
    parser.add_argument("--d", default=7, help="seven (default 7)")
    text = " ".join(parser.format_help().split())
    assert "a number (default: 3)" in text and "absent unless given --c" in text
    assert "a switch --d" in text and "seven (default 7)" in text and "(default: 7)" not in text
