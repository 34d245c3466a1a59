"""Tests of franca.data.datasets: ImageFolder, the pre-training data set kinds, WebDataset shards, InfiniteSampler."""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from franca.core.errors import ConfigError, DataError
from franca.data.datasets import (
    ImageFolderDataset,
    InfiniteSampler,
    WebDatasetImages,
    build_unlabeled_dataset,
)
from franca.data.images import ImageFileDataset, SkipCounter, collate_skip_none


def _save(path: Path, value: int = 50) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (5, 3), (value, 0, 0)).save(path)
    return path


def _red(image: Image.Image) -> torch.Tensor:
    """A tiny transform: the red value of the top-left pixel, as a tensor."""
    return torch.tensor(image.getpixel((0, 0))[0])


# ----------------------------------------------------------------------------------------------------- ImageFolder


def _make_tree(root: Path) -> dict[str, list[Path]]:
    tree = {
        "zebra": [_save(root / "zebra" / "z1.png", 1)],
        "apple": [_save(root / "apple" / "sub" / "a2.jpg", 2), _save(root / "apple" / "a1.png", 3)],
        "mango": [_save(root / "mango" / "m.bmp", 4)],
    }
    _save(root / ".cache" / "hidden.png")
    _save(root / "apple" / ".hidden.png")
    return tree


def test_image_folder_labels_follow_sorted_class_names(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    dataset = ImageFolderDataset(tmp_path, transform=_red)
    assert dataset.classes == ["apple", "mango", "zebra"]
    assert dataset.class_to_idx == {"apple": 0, "mango": 1, "zebra": 2}
    names = [(path.relative_to(tmp_path).as_posix(), label) for path, label in dataset.samples]
    assert names == [("apple/a1.png", 0), ("apple/sub/a2.jpg", 0), ("mango/m.bmp", 1), ("zebra/z1.png", 2)]
    assert dataset.targets == [0, 0, 1, 2]
    assert len(dataset) == 4
    image, label = dataset[3]
    assert label == 2 and int(image) == 1


def test_image_folder_skips_and_counts_unreadable(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    (tmp_path / "mango" / "broken.png").write_bytes(b"\x89PNG broken")
    dataset = ImageFolderDataset(tmp_path, transform=_red)
    loader = DataLoader(dataset, batch_size=5, collate_fn=collate_skip_none)
    counter = SkipCounter()
    with pytest.warns(UserWarning, match="broken.png"):
        batches = list(loader)
    for batch in batches:
        counter.update(batch)
    assert (counter.num_loaded, counter.num_skipped) == (4, 1)
    assert batches[0].targets.tolist() == [0, 0, 1, 2]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing"):
        ImageFolderDataset(tmp_path / "missing")
    flat = tmp_path / "flat"
    _save(flat / "loose.png")
    with pytest.raises(DataError, match=r"has no class folders; expected ROOT/<class>/<image>"):
        ImageFolderDataset(flat)
    empty_classes = tmp_path / "empty_classes"
    (empty_classes / "a").mkdir(parents=True)
    (empty_classes / "b").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(empty_classes)
    _save(empty_classes / "b" / "x.png")
    with pytest.warns(UserWarning, match="1 class folder"):
        partly = ImageFolderDataset(empty_classes)
    assert partly.classes == ["a", "b"] and partly.targets == [1]


# ------------------------------------------------------------------------------------------ build_unlabeled_dataset


def test_build_unlabeled_folder_imagefolder_and_filelist(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    _make_tree(tree)
    loose = _save(tree / "loose.png", 9)
    folder = build_unlabeled_dataset(tree)
    assert isinstance(folder, ImageFileDataset) and len(folder) == 5
    assert folder[4][1] == 4  # unlabeled: the target is the index
    assert Path(os.path.abspath(loose)) in folder.paths

    imagefolder = build_unlabeled_dataset(tree, kind="imagefolder", transform=_red)
    assert len(imagefolder) == 4  # images at the root are not in a class folder
    assert [target for _, target in (imagefolder[i] for i in range(4))] == [0, 1, 2, 3]

    listing = tmp_path / "list.txt"
    listing.write_text("tree/zebra/z1.png\ntree/mango/m.bmp\n")
    for kind in ("auto", "filelist"):
        filelist = build_unlabeled_dataset(listing, kind=kind, transform=_red)
        assert [int(filelist[i][0]) for i in range(len(filelist))] == [1, 4]


def test_build_unlabeled_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown data set kind"):
        build_unlabeled_dataset(tmp_path, kind="parquet")
    with pytest.raises(DataError, match="does not exist"):
        build_unlabeled_dataset(tmp_path / "absent.txt", kind="filelist")
    with pytest.raises(DataError, match="no images found"):
        build_unlabeled_dataset(tmp_path)
    with pytest.raises(DataError, match=r"shard-000000\.tar does not exist"):
        build_unlabeled_dataset(str(tmp_path / "shard-{000000..000001}.tar"))


# ----------------------------------------------------------------------------------------------------- WebDataset


def _png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for extension, payload in fields.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _make_shards(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_shard(
        folder / "shard-000000.tar",
        [
            ("s00", {"png": _png_bytes(10), "cls": b"3"}),
            ("s01", {"jpg": b"definitely not a jpeg", "cls": b"1"}),
            ("s02", {"png": _png_bytes(20), "cls": b"0"}),
        ],
    )
    _write_shard(
        folder / "shard-000001.tar",
        [
            ("s10", {"png": _png_bytes(30)}),
            ("s11", {"txt": b"caption only"}),
            ("s12", {"png": _png_bytes(40)}),
        ],
    )


@pytest.mark.filterwarnings("ignore:skipping")
def test_webdataset_round_trip_skips_and_counts_corrupt_samples(tmp_path: Path) -> None:
    _make_shards(tmp_path / "shards")
    brace = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    for spec in (brace, tmp_path / "shards"):
        dataset = build_unlabeled_dataset(spec, transform=_red)
        assert isinstance(dataset, WebDatasetImages) and len(dataset.shards) == 2
        items = list(dataset)
        assert len(items) == 6
        kept = [(int(image), target) for image, target in (item for item in items if item is not None)]
        assert kept == [(10, 3), (20, 0), (30, -1), (40, -1)]
        assert dataset.num_failed == 2

    dataset = build_unlabeled_dataset(brace, kind="webdataset", transform=_red)
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate_skip_none)
    counter = SkipCounter()
    seen = []
    for batch in loader:
        if counter.update(batch):
            seen.extend(batch.inputs.tolist())
    assert (counter.num_loaded, counter.num_skipped) == (4, 2)
    assert seen == [10, 20, 30, 40]


@pytest.mark.filterwarnings("ignore:skipping")
def test_webdataset_splits_shards_across_workers(tmp_path: Path) -> None:
    _make_shards(tmp_path)
    dataset = WebDatasetImages(sorted(tmp_path.glob("*.tar")), transform=_red)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_skip_none)
    counter = SkipCounter()
    seen = []
    for batch in loader:
        if counter.update(batch):
            seen.extend(batch.inputs.tolist())
    assert sorted(seen) == [10, 20, 30, 40]  # every image once: each worker read its own shard
    assert counter.num_skipped == 2


# -------------------------------------------------------------------------------------------------- InfiniteSampler


def _take(sampler: InfiniteSampler, count: int) -> list[int]:
    return list(itertools.islice(iter(sampler), count))


def test_infinite_sampler_epochs_are_permutations_that_differ() -> None:
    n = 50
    stream = _take(InfiniteSampler(n, seed=3), 3 * n)
    epochs = [stream[i * n : (i + 1) * n] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != list(range(n))
    assert _take(InfiniteSampler(n, seed=3), 3 * n) == stream  # deterministic
    assert _take(InfiniteSampler(n, seed=4), n) != epochs[0]
    assert _take(InfiniteSampler(n, seed=3 + 2**32), n) != epochs[0]  # high seed bits matter too
    assert _take(InfiniteSampler(7, shuffle=False), 16) == [*range(7), *range(7), 0, 1]


@pytest.mark.parametrize(("n", "world_size"), [(12, 2), (10, 3), (5, 2)])
def test_infinite_sampler_ranks_stride_the_global_stream(n: int, world_size: int) -> None:
    global_stream = _take(InfiniteSampler(n, seed=1), 6 * n)
    per_rank = [
        _take(InfiniteSampler(n, seed=1, rank=r, world_size=world_size), 2 * n) for r in range(world_size)
    ]
    for rank, stream in enumerate(per_rank):
        assert stream == global_stream[rank::world_size][: 2 * n]
    if n % world_size == 0:  # then each epoch is split exactly: the ranks' shares are disjoint and cover it
        share = n // world_size
        firsts = [set(stream[:share]) for stream in per_rank]
        assert set().union(*firsts) == set(range(n))
        assert sum(len(s) for s in firsts) == n


@pytest.mark.parametrize(("start", "world_size"), [(0, 1), (7, 1), (23, 1), (24, 2), (40, 4), (13, 2)])
def test_infinite_sampler_start_index_resumes_the_same_stream(start: int, world_size: int) -> None:
    n = 11
    uninterrupted = [
        _take(InfiniteSampler(n, seed=9, rank=r, world_size=world_size), 60) for r in range(world_size)
    ]
    global_stream = _take(InfiniteSampler(n, seed=9), 200)
    for rank in range(world_size):
        resumed = _take(InfiniteSampler(n, seed=9, rank=rank, world_size=world_size, start_index=start), 20)
        assert resumed == global_stream[start + rank :: world_size][:20]
        if start % world_size == 0:
            consumed_per_rank = start // world_size
            assert resumed == uninterrupted[rank][consumed_per_rank : consumed_per_rank + 20]


def test_infinite_sampler_feeds_a_dataloader_and_validates_arguments() -> None:
    data = torch.arange(100, 110)
    sampler = InfiniteSampler(10, seed=0)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    batches = list(itertools.islice(iter(loader), 5))
    flat = torch.cat(batches).tolist()
    assert sorted(flat[:10]) == list(range(100, 110))
    assert flat == [100 + i for i in _take(sampler, 20)]
    with pytest.raises(DataError):
        InfiniteSampler(0)
    with pytest.raises(ConfigError):
        InfiniteSampler(5, rank=2, world_size=2)
    with pytest.raises(ConfigError):
        InfiniteSampler(5, start_index=-1)


def test_np_is_only_used_for_fixtures() -> None:
    # guard against accidental global RNG dependence: the sampler ignores numpy's and torch's global seeds
    np.random.seed(0)
    torch.manual_seed(0)
    first = _take(InfiniteSampler(20, seed=5), 20)
    np.random.seed(1)
    torch.manual_seed(1)
    assert _take(InfiniteSampler(20, seed=5), 20) == first


def test_data_package_imports_stay_light() -> None:
    code = (
        "import sys, franca.data\n"
        "franca.data.list_images, franca.data.InfiniteSampler, franca.data.build_unlabeled_dataset\n"
        "heavy = [name for name in ('torchvision', 'webdataset') if name in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
