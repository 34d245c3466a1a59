"""Two gloo ranks (torch.multiprocessing.spawn): DDP and FSDP2 steps equal the single-process step on the doubled
batch, and a run saved on 2 ranks resumes on 2 ranks exactly and on 1 rank on the same loss curve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from franca.data.batch import TrainBatch
from franca.train.config import load_config
from franca.train.parallel import full_model_state
from franca.train.trainer import Trainer

WORLD_SIZE = 2
PER_RANK = 4
TINY = [
    "model.embed_dim=64",
    "model.depth=2",
    "model.num_heads=2",
    "model.patch_size=8",
    "model.img_size=32",
    "heads.n_prototypes=64",
    "heads.hidden_dim=32",
    "heads.bottleneck_dim=16",
    "crops.global_size=32",
    "crops.local_size=16",
    "crops.n_local=2",
    "train.num_workers=0",
    "train.log_every=1",
    "optim.warmup_iterations=1",
    "optim.freeze_last_layer_iterations=0",
    "loss.teacher_temp_warmup_iterations=1",
    # the paper's head init and teacher temperatures (tiny_cpu's demo recipe uses fan_in and 0.01): the tolerances
    # below were measured with these small logits
    "heads.init=official",
    "loss.teacher_temp_start=0.04",
    "loss.teacher_temp=0.07",
    "train.iterations=4",
]


def _full_batch(n_images: int) -> dict[str, torch.Tensor]:
    """Per-image crops and masks, deterministic, with some masked patches in both views."""
    generator = torch.Generator().manual_seed(123)
    masks = torch.rand(n_images, 2, 16, generator=generator) < 0.3
    masks[:, 1] = False
    masks[::2, 1] = torch.rand(len(masks[::2, 1]), 16, generator=generator) < 0.5
    return {
        "global": torch.randn(n_images, 2, 3, 32, 32, generator=generator),
        "local": torch.randn(n_images, 2, 3, 16, 16, generator=generator),
        "masks": masks,
    }


def _batch(data: dict[str, torch.Tensor], images: slice) -> TrainBatch:
    """The view-major TrainBatch layout of the given images (what the collate builds)."""
    global_crops = torch.cat([data["global"][images, v] for v in range(2)])
    local_crops = torch.cat([data["local"][images, v] for v in range(2)])
    masks = torch.cat([data["masks"][images, v] for v in range(2)])
    counts = masks.sum(dim=1, keepdim=True).clamp(min=1).expand_as(masks)
    return TrainBatch(
        global_crops=global_crops,
        local_crops=local_crops,
        masks=masks,
        masked_indices=masks.flatten().nonzero().flatten(),
        masked_weights=(1.0 / counts.float()).flatten()[masks.flatten()],
        batch_size=global_crops.shape[0] // 2,
    )


def _step_config(strategy: str, batch: int):
    return load_config(
        "tiny_cpu",
        [
            *TINY,
            f"distributed.strategy={strategy}",
            f"train.batch_size_per_device={batch}",
            "loss.koleo_weight=0.0",
            "optim.warmup_iterations=0",
            "optim.base_lr=0.05",
        ],  # KoLeo is per rank, as the official code: not batch-size invariant
    )


def _init(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) gradient, on CPU."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().cpu()


def _step_worker(rank: int, init_file: str, out_dir: str) -> None:
    _init(rank, init_file)
    try:
        data = _full_batch(WORLD_SIZE * PER_RANK)
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results = {}
        for strategy in ("ddp", "fsdp"):
            trainer = Trainer(_step_config(strategy, PER_RANK), Path(out_dir) / strategy, progress=False)
            trainer.forward_backward(_batch(data, mine))
            grads = {
                name: _full(p.grad) for name, p in trainer.student.named_parameters() if p.grad is not None
            }
            trainer.optimizer.zero_grad(set_to_none=True)
            logs = trainer.train_step(_batch(data, mine))
            results[strategy] = {
                "grads": grads,
                "student": full_model_state(trainer.student),
                "teacher": full_model_state(trainer.teacher),
                "loss": logs["loss"],
            }
        if rank == 0:
            torch.save(results, Path(out_dir) / "steps.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp_steps_equal_the_single_process_step(tmp_path: Path) -> None:
    mp.spawn(_step_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = torch.load(tmp_path / "steps.pt", weights_only=True)
    reference = Trainer(_step_config("ddp", WORLD_SIZE * PER_RANK), tmp_path / "single", progress=False)
    full = _batch(_full_batch(WORLD_SIZE * PER_RANK), slice(None))
    reference.forward_backward(full)
    expected_grads = {
        n: p.grad.clone() for n, p in reference.student.named_parameters() if p.grad is not None
    }
    assert len(expected_grads) > 50 and all(float(g.abs().max()) > 0 for g in expected_grads.values())
    reference.optimizer.zero_grad(set_to_none=True)
    initial = {k: v.clone() for k, v in reference.student.state_dict().items()}
    reference.train_step(full)
    expected_student, expected_teacher = reference.student.state_dict(), reference.teacher.state_dict()
    lr = reference.schedules[0].lr
    part_scale = {}
    for name, grad in expected_grads.items():
        part = name.split(".")[0]
        part_scale[part] = max(part_scale.get(part, 0.0), float(grad.abs().max()))
    for strategy in ("ddp", "fsdp"):
        # the gradients (averaged over ranks) are the single-process gradients of the doubled batch
        assert results[strategy]["grads"].keys() == expected_grads.keys()
        # Tolerance relative to the largest gradient of the same module: some iBOT-head biases have gradients that are
        # sums of nearly cancelling terms. Merely permuting the images of the single-process batch moves them by up
        # to 0.3% of that scale (measured), while a wrong normalisation or a missing collective moves them by O(1).
        for name, grad in expected_grads.items():
            torch.testing.assert_close(
                results[strategy]["grads"][name],
                grad,
                rtol=1e-3,
                atol=1e-2 * part_scale[name.split(".")[0]],
                msg=f"{strategy} gradient of {name}",
            )
        # after the AdamW step and the EMA. Adam's first step is lr * g / (|g| + eps) with eps = 1e-8: ~lr * sign(g)
        # where |g| >> eps, but where |g| is comparable to eps a rounding-level change of g moves it by a sizeable
        # fraction of lr (measured: a bias gradient of -2.9e-9 in one process and -6.7e-9 over two ranks, 0.3 % of
        # its module's scale, moved that entry's update by 0.18 lr). Entries with |g| > 100 eps must agree to 0.1 lr;
        # the others only within Adam's bound on the step (|update| <= lr in both runs).
        for key, value in expected_student.items():
            assert float((value - initial[key]).abs().max()) <= 1.01 * lr + 1e-6  # Adam's first step is ~lr
            diff = (results[strategy]["student"][key] - value).abs()
            stable = (
                expected_grads[key].abs() > 1e-6 if key in expected_grads else torch.ones_like(diff).bool()
            )
            if stable.any():
                assert float(diff[stable].amax()) <= 0.1 * lr, f"{strategy} student {key}"
            assert float(diff.max()) <= 2.02 * lr, f"{strategy} student {key}"
        for key, value in expected_teacher.items():
            torch.testing.assert_close(
                results[strategy]["teacher"][key],
                value,
                rtol=0,
                atol=0.1 * lr,
                msg=f"{strategy} teacher {key}",
            )


def _images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(24):
        image = np.zeros((36, 36, 3), dtype=np.uint8) + rng.integers(0, 80, 3, dtype=np.uint8)
        top, left = rng.integers(0, 18, 2)
        image[top : top + 16, left : left + 16] = rng.integers(100, 256, 3, dtype=np.uint8)
        Image.fromarray(image).save(root / f"{i:02d}.png")
    return root


def _run_config(images: Path, strategy: str, *extra: str):
    return load_config(
        "tiny_cpu",
        [
            *TINY,
            f"data.path={images}",
            f"distributed.strategy={strategy}",
            "train.global_batch_size=8",
            "train.checkpoint_every=2",
            *extra,
        ],
    )


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _resume_worker(
    rank: int, init_file: str, out_dir: str, strategy: str, asynchronous: bool, resume_strategy: str
) -> None:
    _init(rank, init_file)
    try:
        images = Path(out_dir) / "images"
        saving = _run_config(images, strategy, f"train.checkpoint_async={asynchronous}")
        Trainer(saving, Path(out_dir) / "straight", progress=False).fit()
        Trainer(saving, Path(out_dir) / "staged", progress=False).fit(stop_at=2)
        dist.barrier()
        if rank == 0:
            shutil.copytree(Path(out_dir) / "staged", Path(out_dir) / "staged_single")
        dist.barrier()
        resumed = Trainer(_run_config(images, resume_strategy), Path(out_dir) / "staged", progress=False)
        resumed.fit()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("strategy", "asynchronous", "resume_strategy"),
    [("fsdp", False, "fsdp"), ("fsdp", True, "ddp")],
    ids=["fsdp-fsdp", "fsdp-async-ddp"],
)
def test_save_on_two_ranks_resume_on_two_and_on_one(
    tmp_path: Path, strategy: str, asynchronous: bool, resume_strategy: str
) -> None:
    _images(tmp_path / "images")
    mp.spawn(
        _resume_worker,
        args=(str(tmp_path / "init"), str(tmp_path), strategy, asynchronous, resume_strategy),
        nprocs=WORLD_SIZE,
        join=True,
    )
    # FSDP runs write sharded checkpoint folders, one shard file per rank
    folder = tmp_path / "staged_single" / "checkpoints" / "checkpoint_00000002.dcp"
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".distcp") == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    straight, staged = _losses(tmp_path / "straight"), _losses(tmp_path / "staged")
    assert len(straight) == len(staged) == 4
    # resumed on 2 ranks (the same strategy, or DDP from the FSDP shards): the same curve
    np.testing.assert_allclose(staged, straight, rtol=1e-5 if resume_strategy == strategy else 1e-4)
    single = Trainer(_run_config(tmp_path / "images", strategy), tmp_path / "staged_single", progress=False)
    assert single.world_size == 1
    result = single.fit()
    assert result.iteration == 4
    resumed_on_one = _losses(tmp_path / "staged_single")
    assert resumed_on_one[:2] == straight[:2]
    # one rank sees the same images at each step; only the masks and KoLeo's per-rank neighbours differ
    np.testing.assert_allclose(resumed_on_one[2:], straight[2:], rtol=0.05)


def _meta_worker(rank: int, init_file: str, out_dir: str) -> None:
    _init(rank, init_file)
    try:
        states = {}
        for init_device in ("cpu", "meta"):
            config = _step_config("fsdp", PER_RANK)
            config.distributed.init_device = init_device
            trainer = Trainer(config, Path(out_dir) / init_device, progress=False)
            assert trainer.built_on_meta == (init_device == "meta")
            built_on_meta = trainer.student.backbone.pos_embed.to_local().device.type
            mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            logs = trainer.train_step(_batch(_full_batch(WORLD_SIZE * PER_RANK), mine))
            states[init_device] = {
                "student": full_model_state(trainer.student),
                "teacher": full_model_state(trainer.teacher),
                "loss": logs["loss"],
                "device": built_on_meta,
            }
        if rank == 0:
            torch.save(states, Path(out_dir) / "meta.pt")
    finally:
        dist.destroy_process_group()


def test_meta_device_start_gives_the_cpu_build_weights_on_two_fsdp_ranks(tmp_path: Path) -> None:
    """Each rank materialises only its shards, with the weights of the ordinary CPU build: equal after a step."""
    mp.spawn(_meta_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    states = torch.load(tmp_path / "meta.pt", weights_only=True)
    off, on = states["cpu"], states["meta"]
    assert on["device"] == "cpu" and on["loss"] == off["loss"]
    for part in ("student", "teacher"):
        assert on[part].keys() == off[part].keys()
        for key, value in off[part].items():
            assert torch.equal(on[part][key], value), f"{part} {key}"


def _empty_batch_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Rank 1's images of step 2 are all unreadable (an empty batch); rank 0's are fine."""
    import datetime

    import franca.train.trainer as trainer_module

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),  # a rank left waiting fails the test instead of hanging it
    )
    original = trainer_module.build_train_loader

    def loader_with_an_empty_batch(*args, **kwargs):
        loader, sampler = original(*args, **kwargs)

        class Stream:
            def __iter__(self):
                for step, batch in enumerate(loader):
                    if rank == 1 and step == 1:
                        batch = TrainBatch(
                            torch.empty(0),
                            None,
                            torch.empty(0),
                            torch.empty(0),
                            torch.empty(0),
                            0,
                            batch.batch_size,
                        )
                    yield batch

        return Stream(), sampler

    trainer_module.build_train_loader = loader_with_an_empty_batch
    try:
        images = Path(out_dir) / "images"
        result = Trainer(_run_config(images, "ddp", "train.iterations=3"), Path(out_dir) / "run", False).fit()
        assert result.iteration == 3
    finally:
        dist.destroy_process_group()


def test_an_empty_batch_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    """A rank whose whole batch was unreadable must not leave the others waiting in the step's collectives."""
    _images(tmp_path / "images")
    mp.spawn(_empty_batch_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert records[1].get("skipped_empty_batch") and "loss" in records[0] and "loss" in records[2]
    assert records[1]["skipped_images"] == 4  # rank 1's four images of step 2, counted over the ranks
