"""Faults a user meets in a run directory: kills between writes, non-finite streaks, torn logs, full disks, a second
writer, unreadable data, another network in the same folder, a corrupt newest checkpoint. Nothing is lost, and every
refusal is one line."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_trainer import TINY, poison_loss

import franca.train.trainer as trainer_module
from franca.cli import main
from franca.core.errors import CheckpointError
from franca.models.checkpoints import load_backbone
from franca.train.checkpointing import load_checkpoint
from franca.train.config import load_config
from franca.train.trainer import Trainer, TrainingError, train


def _config(image_dir: Path, *extra: str):
    return load_config("tiny_cpu", [*TINY, f"data.path={image_dir}", *extra])


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _export_iterations(run: Path) -> tuple[int, int]:
    from safetensors import safe_open

    with safe_open(str(run / "teacher_backbone.safetensors"), framework="pt") as handle:
        backbone = int(handle.metadata()["iteration"])
    heads = torch.load(run / "teacher_heads.pth", weights_only=True)["iteration"]
    return backbone, heads


def _cli_train(run: Path, image_dir: Path, *extra: str) -> list[str]:
    overrides = [*TINY, f"data.path={image_dir}", *extra]
    return ["train", "--config", "tiny_cpu", "--output-dir", str(run), "--no-progress", *overrides]


def test_exports_follow_the_newest_checkpoint_after_a_kill(
    tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after checkpoint 4 was written and before its exports: the re-run, with nothing left to train, must
    still leave exports of iteration 4 (they held iteration 2)."""
    run = tmp_path / "run"
    extra = ("train.iterations=4", "train.checkpoint_every=2")
    original = trainer_module.export_teacher

    def killed_at_4(run_dir, state, config, iteration):
        if iteration == 4:
            raise KeyboardInterrupt  # the process dies here
        return original(run_dir, state, config, iteration)

    monkeypatch.setattr(trainer_module, "export_teacher", killed_at_4)
    with pytest.raises(KeyboardInterrupt):
        train(_config(image_dir, *extra), run, progress=False)
    monkeypatch.setattr(trainer_module, "export_teacher", original)
    assert _export_iterations(run) == (2, 2) and "checkpoint_00000004.pt" in _checkpoints(run)

    result = train(_config(image_dir, *extra), run, progress=False)
    assert result.iteration == 4
    assert _export_iterations(run) == (4, 4)
    teacher = load_checkpoint(run / "checkpoints" / "checkpoint_00000004.pt")["teacher"]
    exported = load_file(str(run / "teacher_backbone.safetensors"))
    for key, value in exported.items():
        torch.testing.assert_close(value, teacher[f"backbone.{key}"], rtol=0, atol=0, msg=key)


def test_a_nonfinite_streak_never_saves_exports_or_rotates(
    tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "nan"
    extra = ("train.checkpoint_every=1", "train.keep_last=1")
    train(_config(image_dir, "train.iterations=2", *extra), run, progress=False)
    good = load_checkpoint(run / "checkpoints" / "checkpoint_00000002.pt")["teacher"]
    trainer = Trainer(
        _config(image_dir, "train.iterations=10", "train.max_consecutive_nonfinite=3", *extra), run, False
    )
    poison_loss(trainer, monkeypatch)
    with pytest.raises(TrainingError, match="checkpoint_00000002.pt"):
        trainer.fit()
    assert _checkpoints(run) == [
        "checkpoint_00000002.pt"
    ]  # the good one was neither replaced nor rotated away
    assert _export_iterations(run) == (2, 2)
    exported = load_file(str(run / "teacher_backbone.safetensors"))
    torch.testing.assert_close(exported["pos_embed"], good["backbone.pos_embed"], rtol=0, atol=0)


def test_a_checkpoint_due_during_a_streak_is_written_at_the_next_finite_step(
    tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "recover"
    trainer = Trainer(
        _config(image_dir, "train.iterations=4", "train.checkpoint_every=2", "train.keep_last=0"), run, False
    )
    original = trainer.loss_fn.forward
    calls = []

    def nan_at_step_2(*args, **kwargs):  # the second step's loss is not finite, the others are
        losses = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            losses.total = losses.total * float("nan")
        return losses

    monkeypatch.setattr(trainer.loss_fn, "forward", nan_at_step_2)
    trainer.fit()
    assert _checkpoints(run) == ["checkpoint_00000003.pt", "checkpoint_00000004.pt"]


def test_a_torn_last_line_of_metrics_is_repaired(tmp_path: Path, image_dir: Path) -> None:
    run = tmp_path / "torn"
    train(_config(image_dir, "train.iterations=2", "train.checkpoint_every=2"), run, progress=False)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"iteration": 3, "loss": 1.2')  # the disk filled up in the middle of a line
    train(_config(image_dir, "train.iterations=4", "train.checkpoint_every=2"), run, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]


class _FullDisk:
    """Replaces ``open`` for files written under ``folder``: they accept ``capacity`` bytes, then fail with ENOSPC,
    as a file on a full disk does (the partial bytes stay on disk)."""

    def __init__(self, folder: Path, capacity: int = 4096) -> None:
        self.folder, self.capacity, self.real_open = str(folder), capacity, builtins.open

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = self.real_open(file, mode, *args, **kwargs)
        if "w" not in mode or not os.fspath(file).startswith(self.folder):
            return handle
        capacity, real_write = self.capacity, handle.write

        def write(data):
            nonlocal capacity
            if len(data) > capacity:
                real_write(data[:capacity])
                capacity = 0
                raise OSError(errno.ENOSPC, "No space left on device")
            capacity -= len(data)
            return real_write(data)

        handle.write = write
        return handle


@pytest.mark.parametrize("checkpoint_format", ["single", "sharded"])
def test_a_full_disk_is_one_line_and_loses_nothing(
    tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys, checkpoint_format: str
) -> None:
    run = tmp_path / "full"
    extra = ("train.iterations=4", "train.checkpoint_every=2", f"train.checkpoint_format={checkpoint_format}")
    train(_config(image_dir, *extra), run, progress=False, stop_at=2)
    saved = _checkpoints(run)
    full_disk = _FullDisk(run / "checkpoints")
    monkeypatch.setattr(builtins, "open", full_disk)
    monkeypatch.setattr(
        io, "open", full_disk
    )  # what pathlib (and so torch.distributed.checkpoint) opens with
    assert main(_cli_train(run, image_dir, *extra)) == 2
    monkeypatch.undo()
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("franca train: error: ") and str(run / "checkpoints") in message
    assert "no space left" in message and "needed" in message
    assert _checkpoints(run) == saved  # the partial temporary is gone, the previous checkpoint stays
    assert not [p for p in (run / "checkpoints").rglob("*") if p.name.endswith(".tmp")]
    result = train(
        _config(image_dir, *extra), run, progress=False
    )  # space freed: the run resumes and finishes
    assert result.iteration == 4 and len(_checkpoints(run)) == 2


def test_stale_temporaries_are_removed_and_keep_last_is_exact_after_a_kill(
    tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "stale"
    extra = ("train.iterations=3", "train.checkpoint_every=1", "train.keep_last=2")
    monkeypatch.setattr(
        "franca.train.checkpointing.rotate_checkpoints", lambda *a, **k: None
    )  # killed before it
    train(_config(image_dir, *extra), run, progress=False)
    monkeypatch.undo()
    assert len(_checkpoints(run)) == 3
    stale = [
        run / "checkpoints" / ".checkpoint_00000004.pt.tmp",
        run / ".teacher_heads.pth.tmp",
        run / "teacher_backbone.safetensors.tmp",
        run / ".metrics.jsonl.tmp",
    ]
    for path in stale:
        path.write_bytes(b"partial")
    train(_config(image_dir, *extra), run, progress=False)
    assert _checkpoints(run) == ["checkpoint_00000002.pt", "checkpoint_00000003.pt"]
    assert not any(path.exists() for path in stale)


def test_a_second_writer_of_a_run_directory_is_refused(tmp_path: Path, image_dir: Path, capsys) -> None:
    """Another process holds the run directory (a relaunch while an orphaned run still trains): one line."""
    run = tmp_path / "busy"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_cli_train(run, image_dir, "train.iterations=2")) == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"pid {holder.pid}" in message and "another franca process" in message
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()  # killed: the operating system releases its lock
        holder.wait()
    assert main(_cli_train(run, image_dir, "train.iterations=2")) == 0


HOLD_LOCK = """
import sys, time
from franca.train.checkpointing import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_the_lock_is_not_inherited_by_data_workers(tmp_path: Path, image_dir: Path) -> None:
    """A staged run keeps its data workers alive between fit() calls; they must not keep the directory locked."""
    run = tmp_path / "workers"
    extra = ("train.iterations=4", "train.checkpoint_every=2", "train.num_workers=1")
    first = Trainer(_config(image_dir, *extra), run, progress=False)
    first.fit(stop_at=2)  # its worker process lives on
    probe = subprocess.run([sys.executable, "-c", TRY_LOCK, str(run)], capture_output=True, text=True)
    assert probe.stdout.strip() == "free", probe.stderr


TRY_LOCK = """
import sys
from franca.train.checkpointing import RunLock
RunLock(sys.argv[1]).acquire()
print("free")
"""


def _broken_folder(root: Path, good: int, broken: int) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"good_{i}.png")
    for i in range(broken):
        (root / f"broken_{i}.png").write_bytes(b"\x89PNG not an image")
    return root


def test_a_folder_without_one_readable_image_stops_with_one_line(tmp_path: Path) -> None:
    data = _broken_folder(tmp_path / "broken", good=0, broken=5)
    with pytest.raises(TrainingError, match="no readable image") as caught:
        train(_config(data, "train.iterations=3"), tmp_path / "run", progress=False)
    assert "\n" not in str(caught.value)
    assert not list((tmp_path / "run").glob("checkpoints/*"))


def test_skipped_images_are_counted(tmp_path: Path) -> None:
    data = _broken_folder(tmp_path / "half", good=4, broken=4)
    result = train(_config(data, "train.iterations=3", "train.checkpoint_every=3"), tmp_path / "run", False)
    assert result.skipped_images > 0
    assert result.skipped_images == result.last_metrics["skipped_images"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.embed_dim=32", "model.embed_dim=64 in the run but 32 now"),
        ("heads.n_prototypes=64", "heads.n_prototypes=128 in the run but 64 now"),
    ],
)
def test_another_network_in_the_same_run_directory_is_one_line(
    tmp_path: Path, image_dir: Path, capsys, override: str, expected: str
) -> None:
    run = tmp_path / "run"
    train(_config(image_dir, "train.iterations=2", "train.checkpoint_every=2"), run, progress=False)
    assert main(_cli_train(run, image_dir, "train.iterations=4", override)) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in message and "another output directory" in message


def test_a_corrupt_newest_checkpoint_names_the_previous_one(tmp_path: Path, image_dir: Path) -> None:
    run = tmp_path / "corrupt"
    extra = ("train.iterations=4", "train.checkpoint_every=2")
    train(_config(image_dir, *extra), run, progress=False)
    newest = run / "checkpoints" / "checkpoint_00000004.pt"
    newest.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as caught:
        train(_config(image_dir, "train.iterations=6", "train.checkpoint_every=2"), run, progress=False)
    message = str(caught.value)
    assert "checkpoint_00000002.pt is intact" in message and "move checkpoint_00000004.pt" in message
    assert "weights_only" not in message and "\n" not in message
    torch.save({"iteration": 4, "config": {}}, newest)  # a valid file without the training state
    with pytest.raises(CheckpointError, match="not a training checkpoint.*'student'"):
        train(_config(image_dir, "train.iterations=6", "train.checkpoint_every=2"), run, progress=False)
    newest.unlink()  # as the message says: the run goes on from the previous checkpoint
    result = train(_config(image_dir, "train.iterations=6", "train.checkpoint_every=2"), run, progress=False)
    assert result.iteration == 6


def test_an_output_directory_that_is_a_file_is_one_line(tmp_path: Path, image_dir: Path, capsys) -> None:
    path = tmp_path / "file"
    path.write_text("not a folder")
    assert main(_cli_train(path, image_dir, "train.iterations=2")) == 2
    assert "is a file" in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_exported_backbone_of_a_recovered_run_loads(tmp_path: Path, image_dir: Path) -> None:
    """The exports a resumed run refreshes are complete files that load_backbone reads (with the recorded iteration)."""
    run = tmp_path / "reload"
    train(_config(image_dir, "train.iterations=2", "train.checkpoint_every=2"), run, progress=False)
    (run / "teacher_heads.pth").unlink()  # an export lost to a kill
    train(_config(image_dir, "train.iterations=2", "train.checkpoint_every=2"), run, progress=False)
    assert _export_iterations(run) == (2, 2)
    assert load_backbone(run / "teacher_backbone.safetensors").embed_dim == 64


def test_a_corrupt_newest_sharded_checkpoint_names_the_previous_one(tmp_path: Path, image_dir: Path) -> None:
    run = tmp_path / "corrupt_dcp"
    extra = ("train.iterations=4", "train.checkpoint_every=2", "train.checkpoint_format=sharded")
    train(_config(image_dir, *extra), run, progress=False)
    shard = next((run / "checkpoints" / "checkpoint_00000004.dcp").glob("*.distcp"))
    shard.write_bytes(os.urandom(shard.stat().st_size))
    with pytest.raises(
        CheckpointError
    ) as caught:  # torch's CheckpointException is a BaseException: one line too
        train(_config(image_dir, *extra[1:], "train.iterations=6"), run, progress=False)
    message = str(caught.value)
    assert "checkpoint_00000002.dcp is intact" in message and "\n" not in message
    assert "CheckpointException" not in message  # the reason is the shard's own error, not DCP's wrapper
