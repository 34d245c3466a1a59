"""Sharded (torch.distributed.checkpoint) training checkpoints in one process: exact resume, atomic publication,
keep_last, stale temporaries, and the conversions to and from the single-file format (Python and CLI)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

# the tiny model of the trainer's tests (pytest puts this folder on sys.path: tests/ has no __init__.py); the images
# are conftest.py's image_dir
from test_trainer import TINY

from franca.cli import main as cli_main
from franca.core.errors import CheckpointError
from franca.models.checkpoints import load_backbone
from franca.models.files import is_sharded_checkpoint
from franca.train.checkpointing import (
    consolidate_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    shard_checkpoint,
)
from franca.train.config import load_config
from franca.train.trainer import Trainer, train

RUN = [
    "model.drop_path_rate=0.2",  # stochastic depth: the resumed random state matters
    "train.iterations=6",
    "train.checkpoint_every=2",
    "train.keep_last=2",
]


@pytest.fixture(scope="module")
def straight(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 6-iteration run in one go with single-file checkpoints: the reference every resume must reproduce."""
    run = tmp_path_factory.mktemp("straight")
    result = train(_config(image_dir, "train.checkpoint_format=single"), run, progress=False)
    return load_checkpoint(result.checkpoint_path)


def _config(image_dir: Path, *extra: str):
    return load_config("tiny_cpu", [*TINY, *RUN, f"data.path={image_dir}", *extra])


def _assert_same_state(got: dict, expected: dict) -> None:
    assert got["iteration"] == expected["iteration"]
    for part in ("student", "teacher"):
        assert got[part].keys() == expected[part].keys()
        for key, value in expected[part].items():
            torch.testing.assert_close(got[part][key], value, rtol=1e-5, atol=1e-6, msg=f"{part} {key}")
    moments = expected["optimizer"]["state"]
    for name, entry in moments.items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                got["optimizer"]["state"][name][key], entry[key], rtol=1e-4, atol=1e-8, msg=name
            )


@pytest.mark.parametrize("asynchronous", [False, True], ids=["blocking", "async"])
def test_sharded_run_resumes_exactly(
    tmp_path: Path, image_dir: Path, straight: dict, asynchronous: bool
) -> None:
    config = _config(image_dir, "train.checkpoint_format=sharded", f"train.checkpoint_async={asynchronous}")
    first = Trainer(config, tmp_path / "run", progress=False)
    assert first.fit(stop_at=4).iteration == 4
    # published before fit() returns, even when written in the background
    assert [path.name for _, path in list_checkpoints(tmp_path / "run")] == [
        "checkpoint_00000002.dcp",
        "checkpoint_00000004.dcp",
    ]
    resumed = Trainer(
        config, tmp_path / "run", progress=False
    ).fit()  # a new process's view: reads the folder
    assert resumed.iteration == 6
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["checkpoint_00000004.dcp", "checkpoint_00000006.dcp"]  # keep_last=2, nothing else left
    assert is_sharded_checkpoint(resumed.checkpoint_path)
    _assert_same_state(load_checkpoint(resumed.checkpoint_path), straight)
    # the exports stay single files that load_backbone reads, equal to the checkpoint's teacher
    backbone = load_backbone(tmp_path / "run" / "teacher_backbone.safetensors")
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, straight["teacher"][f"backbone.{key}"], rtol=1e-5, atol=1e-6)


def test_incomplete_folders_are_never_resumed_from(tmp_path: Path, image_dir: Path, straight: dict) -> None:
    config = _config(image_dir, "train.checkpoint_format=sharded")
    run = tmp_path / "run"
    Trainer(config, run, progress=False).fit(stop_at=4)
    folder = run / "checkpoints"
    # a save killed before its rename (hidden temporary) and a folder whose metadata was never written
    shutil.copytree(folder / "checkpoint_00000004.dcp", folder / ".checkpoint_00000006.dcp.tmp")
    shutil.copytree(folder / "checkpoint_00000004.dcp", folder / "checkpoint_00000005.dcp")
    (folder / "checkpoint_00000005.dcp" / ".metadata").unlink()
    assert latest_checkpoint(run).name == "checkpoint_00000004.dcp"
    result = Trainer(config, run, progress=False).fit()
    assert result.iteration == 6
    assert not (folder / ".checkpoint_00000006.dcp.tmp").exists()  # stale temporaries are removed on start
    _assert_same_state(load_checkpoint(result.checkpoint_path), straight)


def test_consolidate_and_shard_round_trip(tmp_path: Path, image_dir: Path, straight: dict) -> None:
    run = tmp_path / "run"
    Trainer(_config(image_dir, "train.checkpoint_format=sharded"), run, progress=False).fit(stop_at=4)
    sharded = run / "checkpoints" / "checkpoint_00000004.dcp"
    single = tmp_path / "ckpt4.pt"
    assert cli_main(["checkpoint", "consolidate", str(sharded), "--out", str(single)]) == 0
    state = torch.load(single, weights_only=True)  # an ordinary single-file checkpoint
    assert state["iteration"] == 4 and "rng_per_rank" in state
    # a single-file run resumes from the consolidated file and ends where the straight run ended
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    shutil.copy(single, other / "checkpoints" / "checkpoint_00000004.pt")
    result = Trainer(_config(image_dir, "train.checkpoint_format=single"), other, progress=False).fit()
    _assert_same_state(load_checkpoint(result.checkpoint_path), straight)
    # and back: the folder made from the file holds the same state, and load_backbone reads its teacher
    back = shard_checkpoint(single, tmp_path / "back.dcp")
    assert is_sharded_checkpoint(back)
    _assert_same_state(load_checkpoint(back), state)
    for key, value in load_backbone(back).state_dict().items():
        torch.testing.assert_close(value, state["teacher"][f"backbone.{key}"])
    with pytest.raises(CheckpointError, match="already exists"):
        shard_checkpoint(single, back)
    assert consolidate_checkpoint(back, tmp_path / "again.pt").is_file()
