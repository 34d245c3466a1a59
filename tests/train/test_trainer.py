"""The training loop end to end on a tiny model: learning, exact resume, exports, non-finite handling."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from franca.models.checkpoints import load_backbone
from franca.models.heads import load_heads
from franca.train.config import load_config
from franca.train.trainer import Trainer, TrainingError, train

TINY = [
    "model.embed_dim=64",
    "model.depth=2",
    "model.num_heads=2",
    "model.patch_size=8",
    "model.img_size=32",
    "heads.n_prototypes=128",
    "heads.hidden_dim=64",
    "heads.bottleneck_dim=32",
    "crops.global_size=32",
    "crops.local_size=16",
    "crops.n_local=2",
    "train.batch_size_per_device=8",
    "train.num_workers=0",
    "train.log_every=1",
    "train.epoch_length=4",
    "optim.warmup_iterations=2",
    "optim.freeze_last_layer_iterations=2",
    "loss.teacher_temp_warmup_iterations=2",
]


def _config(image_dir: Path, *extra: str):
    return load_config("tiny_cpu", [*TINY, f"data.path={image_dir}", *extra])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("on_device", [False, True], ids=["cpu-augment", "device-augment"])
def test_resume_continues_exactly(tmp_path: Path, image_dir: Path, on_device: bool) -> None:
    extra = ("train.iterations=6", "train.checkpoint_every=3", f"crops.augment_on_device={on_device}")
    straight = train(_config(image_dir, *extra), tmp_path / "straight", progress=False)
    staged_dir = tmp_path / "staged"
    first = train(_config(image_dir, *extra), staged_dir, progress=False, stop_at=3)
    assert first.iteration == 3
    resumed = train(_config(image_dir, *extra), staged_dir, progress=False)
    assert resumed.iteration == 6
    a = torch.load(straight.checkpoint_path, weights_only=True)
    b = torch.load(resumed.checkpoint_path, weights_only=True)
    for key, value in a["student"].items():
        torch.testing.assert_close(b["student"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in a["teacher"].items():
        torch.testing.assert_close(b["teacher"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    losses_straight = [m["loss"] for m in _metrics(tmp_path / "straight")]
    losses_staged = [m["loss"] for m in _metrics(staged_dir)]
    assert len(losses_staged) == 6
    np.testing.assert_allclose(losses_staged, losses_straight, rtol=1e-5)


def test_chunked_fit_of_one_trainer_matches_a_straight_run_without_reloading(
    tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fit(stop_at=...) chunks of one Trainer (as the demo runs them) train exactly as one fit, and reuse the state in
    memory and the data iterator instead of re-reading the checkpoint and restarting the loader."""
    import franca.train.trainer as trainer_module

    extra = ("train.iterations=6", "train.checkpoint_every=2", "train.num_workers=1")
    straight = train(_config(image_dir, *extra), tmp_path / "straight", progress=False)
    loads, loaders = [], []
    original_load, original_build = trainer_module.load_checkpoint, trainer_module.build_train_loader
    monkeypatch.setattr(
        trainer_module, "load_checkpoint", lambda *a, **k: loads.append(a) or original_load(*a, **k)
    )
    monkeypatch.setattr(
        trainer_module, "build_train_loader", lambda *a, **k: loaders.append(a) or original_build(*a, **k)
    )
    trainer = trainer_module.Trainer(_config(image_dir, *extra), tmp_path / "chunked", progress=False)
    for stop in (2, 4, 6):
        result = trainer.fit(stop_at=stop)
    assert result.iteration == 6 and loads == [] and len(loaders) == 1
    a = torch.load(straight.checkpoint_path, weights_only=True)
    b = torch.load(result.checkpoint_path, weights_only=True)
    for key, value in a["teacher"].items():
        torch.testing.assert_close(b["teacher"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    losses = [m["loss"] for m in _metrics(tmp_path / "chunked")]
    np.testing.assert_allclose(losses, [m["loss"] for m in _metrics(tmp_path / "straight")], rtol=1e-5)
    # A new Trainer on the same folder (a longer schedule) starts from the newest checkpoint on disk.
    other = trainer_module.Trainer(
        _config(image_dir, "train.iterations=8", *extra[1:]), tmp_path / "chunked", False
    )
    other.fit(stop_at=8)
    assert len(loads) == 1 and other.iteration == 8


def test_device_augmentation_gets_uint8_crops_and_trains(
    image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from franca.data.device_augment import DeviceMultiCropAugmentation
    from franca.train.data import build_multicrop, derived_seed

    config = _config(image_dir, "crops.augment_on_device=true", "train.iterations=2")
    crops = build_multicrop(config)(Image.open(image_dir / "img_000.png").convert("RGB"))
    assert all(c.dtype == torch.uint8 for c in [*crops["global_crops"], *crops["local_crops"]])
    assert crops["global_crops"][0].shape == (3, 32, 32) and crops["local_crops"][0].shape == (3, 16, 16)
    # Spy on the device step: once per iteration, on the uint8 batch, with the (seed, rank, iteration) generator.
    calls: list[tuple[torch.dtype, int, torch.dtype]] = []
    original = DeviceMultiCropAugmentation.__call__

    def spy(self, batch, generator):
        out = original(self, batch, generator)
        calls.append((batch.global_crops.dtype, generator.initial_seed(), out.global_crops.dtype))
        return out

    monkeypatch.setattr(DeviceMultiCropAugmentation, "__call__", spy)
    result = train(config, tmp_path / "run", progress=False)
    assert result.iteration == 2 and all(np.isfinite([m["loss"] for m in _metrics(tmp_path / "run")]))
    seed = config.train.seed
    assert calls == [
        (torch.uint8, derived_seed(seed, "device-augment", 0, iteration), torch.float32)
        for iteration in (0, 1)
    ]


def test_metrics_exports_and_run_directory(tmp_path: Path, image_dir: Path) -> None:
    run = tmp_path / "run"
    result = train(_config(image_dir, "train.iterations=3", "train.checkpoint_every=2"), run, progress=False)
    records = _metrics(run)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for key in (
        "loss",
        "dino_loss_level0",
        "dino_loss_level4",
        "ibot_loss_level4",
        "koleo_loss",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "images_per_s",
        "memory_mb",
    ):
        assert key in records[-1], key
    assert records[0]["last_layer_lr"] == 0.0  # prototypes frozen during the first iterations
    assert records[-1]["skipped_images"] >= 0
    assert (run / "config.yaml").exists()
    backbone = load_backbone(result.backbone_path)
    assert backbone.embed_dim == 64 and backbone.n_blocks == 2
    heads = load_heads(result.heads_path)
    assert set(heads) == {"dino_head", "ibot_head"}
    assert heads["dino_head"].prototype_counts == [8, 16, 32, 64, 128]
    # the training checkpoint itself is readable by the official-layout loaders
    assert load_backbone(result.checkpoint_path).embed_dim == 64
    # the exported teacher equals the teacher inside the checkpoint
    state = torch.load(result.checkpoint_path, weights_only=True)["teacher"]
    torch.testing.assert_close(backbone.state_dict()["norm.weight"], state["backbone.norm.weight"])
    assert not list(run.rglob("*.tmp"))


def test_loss_goes_down(tmp_path: Path, image_dir: Path) -> None:
    result = train(
        _config(
            image_dir,
            "train.iterations=24",
            "train.checkpoint_every=100",
            "optim.base_lr=2e-2",
            "optim.warmup_iterations=4",
        ),
        tmp_path / "learn",
        progress=False,
    )
    losses = [m["loss"] for m in _metrics(result.output_dir)]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1


def poison_loss(trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every loss of ``trainer`` NaN from now on."""
    original = trainer.loss_fn.forward

    def poisoned(*args, **kwargs):
        losses = original(*args, **kwargs)
        losses.total = losses.total * float("nan")
        return losses

    monkeypatch.setattr(trainer.loss_fn, "forward", poisoned)


def test_nonfinite_losses_stop_the_run_and_keep_the_checkpoint(
    tmp_path: Path, image_dir: Path, monkeypatch
) -> None:
    run = tmp_path / "nan"
    train(_config(image_dir, "train.iterations=2", "train.checkpoint_every=2"), run, progress=False)
    trainer = Trainer(
        _config(image_dir, "train.iterations=10", "train.max_consecutive_nonfinite=3"), run, progress=False
    )
    poison_loss(trainer, monkeypatch)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    with pytest.raises(TrainingError, match="not finite for 3 steps in a row") as excinfo:
        trainer.fit()
    assert "checkpoint_00000002.pt" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    after = trainer.student.state_dict()
    resumed_state = torch.load(run / "checkpoints" / "checkpoint_00000002.pt", weights_only=True)["student"]
    for key, value in after.items():  # skipped steps never touched the weights
        torch.testing.assert_close(value, resumed_state[key])
        assert key in before
    skipped = [m for m in _metrics(run) if m.get("skipped_nonfinite")]
    assert len(skipped) == 3


def test_killed_run_resumes(tmp_path: Path, image_dir: Path) -> None:
    run = tmp_path / "killed"
    overrides = [*TINY, f"data.path={image_dir}", "train.iterations=400", "train.checkpoint_every=2"]
    command = [
        sys.executable,
        "-m",
        "franca",
        "train",
        "--config",
        "tiny_cpu",
        "--output-dir",
        str(run),
        "--no-progress",
        *overrides,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((run / "checkpoints").glob("checkpoint_*.pt"))) < 2:
            time.sleep(0.2)
    finally:
        process.kill()
        process.wait()
    done = sorted(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("checkpoint_*.pt"))
    assert done, "the run wrote no checkpoint before it was killed"
    trainer = Trainer(
        load_config("tiny_cpu", [*overrides[:-2], "train.iterations=400", "train.checkpoint_every=2"]),
        run,
        progress=False,
    )
    result = trainer.fit(stop_at=done[-1] + 2)
    assert result.iteration == done[-1] + 2
    iterations = [m["iteration"] for m in _metrics(run)]
    assert iterations == list(range(1, result.iteration + 1))  # no duplicated or missing steps
