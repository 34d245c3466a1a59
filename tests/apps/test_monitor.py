"""k-NN monitoring during pre-training: the monitor's score is the DINOv2 k-NN of the CLS features (computed again by
hand here), ``franca train`` writes it to metrics.jsonl without changing the training, two FSDP2 or DDP ranks agree
with one process, and bad folders are one-line errors naming the config key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from franca.apps.monitor import KnnMonitor, evenly_spaced, knn_monitor
from franca.cli import main
from franca.core.errors import ConfigError
from franca.data.augmentations import eval_transform
from franca.data.datasets import ImageFolderDataset
from franca.models.checkpoints import load_backbone
from franca.models.vision_transformer import build_model
from franca.train.config import load_config
from franca.train.trainer import Trainer, train

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
    "optim.warmup_iterations=1",
    "optim.freeze_last_layer_iterations=1",
    "loss.teacher_temp_warmup_iterations=1",
]
CLASSES = ("a", "b", "c", "d", "e", "f")


def _folder(root: Path, per_class: int, seed: int) -> Path:
    """An ImageFolder tree: per class a base colour, each image with its own noise and a bright square."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        base = np.array([40 * index, 255 - 40 * index, 120], dtype=np.int16)
        for image_index in range(per_class):
            image = base + rng.integers(-60, 60, (40, 40, 3))
            top, left = rng.integers(0, 24, 2)
            image[top : top + 12, left : left + 12] = rng.integers(0, 256, 3)
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / name / f"{image_index:02d}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("knn")
    return _folder(root / "train", 4, seed=1), _folder(root / "val", 3, seed=2)


def _monitored(train_dir: Path, val_dir: Path, *extra: str):
    paths = [f"eval.train_path={train_dir}", f"eval.val_path={val_dir}", f"data.path={train_dir}"]
    return load_config("tiny_cpu", [*TINY, "eval.every=2", *paths, *extra])


def _by_hand(backbone: torch.nn.Module, root: Path, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS features [N, D] and labels [N] of the ImageFolder at ``root`` (classes sorted, files sorted), keeping
    ``limit`` evenly spaced images (image i * N // limit), by a plain forward of the backbone."""
    items = [
        (path, label) for label, name in enumerate(CLASSES) for path in sorted((root / name).glob("*.png"))
    ]
    if limit is not None:
        items = [items[i * len(items) // limit] for i in range(limit)]
    transform = eval_transform(32)
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in items])
    with torch.no_grad():
        features = backbone.eval().forward_features(images)["x_norm_clstoken"]
    return features.double(), torch.tensor([label for _, label in items])


def _knn_by_hand(train, train_labels, val, val_labels, k: int, temperature: float) -> tuple[float, float]:
    """DINOv2's weighted k-NN, written out: cosine similarities, the k most similar train images, weights
    softmax(sim / T) over them summed per class; top-5 counts a label among the 5 best classes that got votes."""
    train = train / train.norm(dim=1, keepdim=True)
    val = val / val.norm(dim=1, keepdim=True)
    top1 = top5 = 0
    for row, label in zip(val @ train.T, val_labels.tolist()):
        sims, neighbours = row.topk(k)
        weights = torch.exp(sims / temperature) / torch.exp(sims / temperature).sum()
        scores = [0.0] * len(CLASSES)
        for weight, neighbour in zip(weights.tolist(), neighbours.tolist()):
            scores[int(train_labels[neighbour])] += weight
        ranked = sorted(range(len(CLASSES)), key=lambda c: -scores[c])
        top1 += ranked[0] == label
        top5 += label in ranked[:5] and scores[label] > 0
    return 100.0 * top1 / len(val_labels), 100.0 * top5 / len(val_labels)


def test_the_monitor_scores_the_knn_of_the_cls_features_as_computed_by_hand(folders) -> None:
    train_dir, val_dir = folders
    config = _monitored(train_dir, val_dir, "eval.max_images_per_split=15", "eval.knn_k=3")
    callback = knn_monitor(config)
    assert callback.every == 2 and callback.name == "knn"
    torch.manual_seed(3)
    shape = {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32}
    backbone = build_model("vit_tiny", **shape, layerscale_init=1.0)  # 1e-5 would make every CLS token alike
    backbone.train()
    numbers = callback.evaluate(backbone)
    train, train_labels = _by_hand(backbone, train_dir, 15)  # 24 train images -> 15
    val, val_labels = _by_hand(backbone, val_dir, 15)  # 18 val images -> 15
    top1, top5 = _knn_by_hand(train, train_labels, val, val_labels, k=3, temperature=0.07)
    assert numbers["top1"] == pytest.approx(top1) and numbers["top5"] == pytest.approx(top5)
    assert 0 < top1 < top5 < 100  # a case where neither number is trivial


def test_evenly_spaced_keeps_every_nth_item() -> None:
    data = list(range(10))
    assert list(evenly_spaced(data, 4)) == [0, 2, 5, 7]
    assert evenly_spaced(data, 10) is data and evenly_spaced(data, None) is data


def test_franca_train_writes_knn_records_and_trains_as_without_them(folders, tmp_path: Path, capsys) -> None:
    train_dir, val_dir = folders
    overrides = [*TINY, "eval.every=2", f"eval.train_path={train_dir}", f"eval.val_path={val_dir}"]
    overrides += [f"data.path={train_dir}", "train.iterations=3", "eval.knn_k=5"]
    run = tmp_path / "monitored"
    assert main(["train", "--config", "tiny_cpu", "--output-dir", str(run), "--no-progress", *overrides]) == 0
    assert "iteration 2: knn_top1 " in capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in records if "knn_top1" in r]
    assert [r["iteration"] for r in knn] == [2, 3]  # every 2 iterations, and the end
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3]
    # the last record is the k-NN of the exported teacher; a run without the monitor trains the same teacher
    backbone = load_backbone(run / "teacher_backbone.safetensors")
    splits = [ImageFolderDataset(folder, eval_transform(32)) for folder in (train_dir, val_dir)]
    expected = KnnMonitor(*splits, len(CLASSES), k=5)(backbone)
    assert (knn[-1]["knn_top1"], knn[-1]["knn_top5"]) == pytest.approx((expected["top1"], expected["top5"]))
    plain = train(load_config("tiny_cpu", [*overrides, "eval.every=0"]), tmp_path / "plain", progress=False)
    monitored = torch.load(run / "checkpoints" / "checkpoint_00000003.pt", weights_only=True)["teacher"]
    for key, value in torch.load(plain.checkpoint_path, weights_only=True)["teacher"].items():
        torch.testing.assert_close(monitored[key], value, rtol=0, atol=0, msg=key)


def test_a_missing_eval_train_path_is_one_line(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    args = ["train", "--config", "tiny_cpu", "--output-dir", str(run), "--no-progress", *TINY]
    assert main([*args, f"data.path={tmp_path}", "eval.every=5", f"eval.val_path={tmp_path}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith(
        "franca train: error: config key 'eval.train_path' is required when eval.every"
    )
    assert not run.exists()


def test_bad_folders_name_their_config_key(folders, tmp_path: Path) -> None:
    train_dir, val_dir = folders
    (tmp_path / "empty").mkdir()
    (tmp_path / "other" / "z").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "other" / "z" / "0.png")
    cases = {
        (tmp_path / "nowhere", val_dir): "config key 'eval.train_path': .*nowhere is not a folder",
        (train_dir, tmp_path / "empty"): "config key 'eval.val_path': .*empty has no class folders",
        (train_dir, tmp_path / "other"): "config key 'eval.val_path' has other class folders",
    }
    for (train_path, val_path), message in cases.items():
        with pytest.raises(ConfigError, match=message):
            knn_monitor(_monitored(train_path, val_path))


# ------------------------------------------------------------------------------------------- two ranks
def _two_rank_worker(rank: int, init_file: str, out_dir: str, train_dir: str, val_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        histories = {}
        for strategy in ("fsdp", "ddp"):
            extra = (f"distributed.strategy={strategy}", "train.iterations=2", "eval.every=1")
            config = _monitored(Path(train_dir), Path(val_dir), *extra)
            callback = knn_monitor(config)
            Trainer(config, Path(out_dir) / strategy, progress=False, callbacks=[callback]).fit()
            histories[strategy] = callback.history
        torch.save(histories, Path(out_dir) / f"history{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_fsdp_or_ddp_ranks_measure_what_one_process_measures(folders, tmp_path: Path) -> None:
    train_dir, val_dir = folders
    args = (str(tmp_path / "init"), str(tmp_path), str(train_dir), str(val_dir))
    mp.spawn(_two_rank_worker, args=args, nprocs=2, join=True)
    histories = [torch.load(tmp_path / f"history{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert histories[0] == histories[1]  # every rank evaluated, the same numbers
    train_set = ImageFolderDataset(train_dir, eval_transform(32))
    val_set = ImageFolderDataset(val_dir, eval_transform(32))
    for strategy in ("fsdp", "ddp"):
        assert [iteration for iteration, _ in histories[0][strategy]] == [1, 2]
        records = [
            json.loads(line) for line in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["iteration"] for r in records if "knn_top1" in r] == [1, 2]  # written once, by rank 0
        backbone = load_backbone(tmp_path / strategy / "teacher_backbone.safetensors")
        expected = KnnMonitor(train_set, val_set, len(CLASSES))(backbone)
        assert histories[0][strategy][-1][1] == pytest.approx(expected)
