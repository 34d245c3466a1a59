"""Data sets for pre-training and evaluation, and the resumable infinite sampler.

- :class:`ImageFolderDataset`: ``ROOT/<class>/<...>/<image>`` with labels from the sorted class folder names;
- :func:`build_unlabeled_dataset`: the pre-training data set from a folder, an ImageFolder tree, a list file or
  WebDataset tar shards;
- :class:`WebDatasetImages`: an iterable data set over tar shards (needs the optional ``webdataset`` package);
- :class:`InfiniteSampler`: an endless, rank-strided stream of epoch permutations whose position is plain arithmetic, so
  a resumed run continues the exact same data order.

Every data set here yields ``(image, target)`` or ``None`` for an unreadable image; use
:func:`franca.data.images.collate_skip_none` as the DataLoader's ``collate_fn`` to drop and count those.

How the trainer shards the data across ranks and DataLoader workers:

- map-style data sets (folder, imagefolder, filelist): sample indices with one :class:`InfiniteSampler` per rank,
  ``InfiniteSampler(len(dataset), seed=seed, rank=rank, world_size=world_size, start_index=consumed)`` where
  ``consumed = iteration * batch_size_per_rank * world_size`` on resume. The sampler runs in the main process, so the
  workers need nothing else;
- WebDataset shards: :class:`WebDatasetImages` splits the shard list itself, first by rank
  (``webdataset.split_by_node``, from ``torch.distributed`` or the RANK / WORLD_SIZE variables) then by DataLoader worker
  (``webdataset.split_by_worker``). Each rank x worker must receive at least one shard, so use at least
  ``world_size * num_workers`` shards (ideally many more, of similar size); the trainer iterates it epoch after epoch.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Sampler

from franca.core.errors import ConfigError, DataError
from franca.data.images import (
    IMAGE_EXTENSIONS,
    ImageFileDataset,
    UnreadableImageError,
    _walk_images,
    decode_image,
    is_image_file,
    list_images,
)

__all__ = [
    "DATASET_KINDS",
    "ImageFolderDataset",
    "InfiniteSampler",
    "WebDatasetImages",
    "build_unlabeled_dataset",
]

#: Values accepted by :func:`build_unlabeled_dataset` for ``kind``.
DATASET_KINDS = ("auto", "folder", "imagefolder", "filelist", "webdataset")

_BRACE_RANGE = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


class ImageFolderDataset(ImageFileDataset):
    """Labelled images in the torchvision ImageFolder layout, ``ROOT/<class>/<any sub-folders>/<image>``.

    ``classes`` are the sorted names of the (non-hidden) class folders and the label of an image is the position of
    its class there; every class folder is searched recursively. ``samples`` is the list of ``(path, label)`` and
    ``targets`` the list of labels, in order. Items are ``(transform(image), label)``, or None for an unreadable file
    (see :class:`~franca.data.images.ImageFileDataset`). A class folder without images keeps its label (with a
    warning) so that label ids do not depend on which folders happen to be empty.
    """

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder; expected ROOT/<class>/<image>")
        self.classes = sorted(
            entry.name for entry in os.scandir(self.root) if entry.is_dir() and not entry.name.startswith(".")
        )
        if not self.classes:
            raise DataError(f"{self.root} has no class folders; expected ROOT/<class>/<image>")
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        samples: list[tuple[Path, int]] = []
        empty_classes: list[str] = []
        for name, label in self.class_to_idx.items():
            paths = _walk_images(self.root / name)
            if not paths:
                empty_classes.append(name)
            samples.extend((Path(os.path.abspath(path)), label) for path in paths)
        if not samples:
            raise DataError(
                f"{self.root} has class folders but no images in them (looked for {', '.join(IMAGE_EXTENSIONS)}); "
                "expected ROOT/<class>/<image>"
            )
        if empty_classes:
            warnings.warn(
                f"{self.root}: {len(empty_classes)} class folder(s) contain no images: {', '.join(empty_classes[:5])}",
                stacklevel=2,
            )
        self.samples = samples
        self.targets = [label for _, label in samples]
        super().__init__([path for path, _ in samples], transform=transform, labels=self.targets)


def _import_webdataset() -> Any:
    """Import the optional webdataset package, or raise a DataError saying how to install it."""
    try:
        import webdataset
    except ImportError as error:
        raise DataError(
            "reading WebDataset tar shards needs the webdataset package: pip install franca[webdataset]"
        ) from error
    return webdataset


def _expand_shards(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard paths for a brace pattern (``shard-{000000..000009}.tar``), a glob, a folder of .tar files or a list.

    Local shards are checked to exist; anything with a URL scheme (``http://``, ``pipe:``...) is passed through.
    """
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    shards: list[str] = []
    for item in items:
        text = os.path.expanduser(str(item))
        if os.path.isdir(text):
            found = sorted(glob.glob(os.path.join(glob.escape(text), "*.tar")))
            if not found:
                raise DataError(f"{text} contains no .tar shards")
            shards.extend(found)
            continue
        import braceexpand  # a dependency of webdataset

        for name in braceexpand.braceexpand(text):
            if "://" in name or name.startswith("pipe:"):
                shards.append(name)
            elif any(char in name for char in "*?["):
                matches = sorted(glob.glob(name))
                if not matches:
                    raise DataError(f"{name} matches no .tar shards")
                shards.extend(matches)
            elif os.path.isfile(name):
                shards.append(name)
            else:
                raise DataError(f"WebDataset shard {name} does not exist (from {text})")
    if not shards:
        raise DataError(f"no WebDataset shards found in {', '.join(str(item) for item in items)}")
    return shards


class WebDatasetImages(IterableDataset):
    """Images from WebDataset tar shards, in shard order (no shuffling), split across ranks and workers.

    Each sample's first entry with an image suffix (``jpg``, ``png``, ...) is decoded with PIL (the rules of
    :func:`~franca.data.images.load_image`) and transformed; the target is the sample's ``cls`` / ``label`` entry as
    an int, or -1 when there is none. A sample whose image cannot be decoded, or that has no image, is yielded as
    ``None`` after a warning, so that :func:`~franca.data.images.collate_skip_none` drops and counts it in the main
    process; ``num_failed`` counts them in this process only. Tar-level corruption is reported by webdataset's
    ``warn_and_continue`` handler and the rest of the shard is read. Shards are split by rank (``split_by_node``) and
    by DataLoader worker (``split_by_worker``): give at least ``world_size * num_workers`` shards.
    """

    def __init__(
        self, shards: str | Path | Sequence[str | Path], transform: Callable[[Image.Image], Any] | None = None
    ) -> None:
        _import_webdataset()
        self.shards = _expand_shards(shards)
        self.transform = transform
        self.num_failed = 0

    def _decode(self, sample: dict[str, Any]) -> tuple[Any, int] | None:
        key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        image_fields = [name for name in sample if not name.startswith("__") and is_image_file(f"x.{name}")]
        if not image_fields:
            self.num_failed += 1
            warnings.warn(f"skipping WebDataset sample {key}: it has no image entry", stacklevel=2)
            return None
        field = sorted(image_fields)[0]
        try:
            image = decode_image(sample[field], name=f"{key}.{field}")
        except UnreadableImageError as error:
            self.num_failed += 1
            warnings.warn(f"skipping unreadable image: {error}", stacklevel=2)
            return None
        target = -1
        for name in ("cls", "label", "cls.txt"):
            if name in sample:
                try:
                    target = int(bytes(sample[name]).decode("utf-8").strip())
                except (ValueError, UnicodeDecodeError):
                    target = -1
                break
        return (self.transform(image) if self.transform is not None else image), target

    def __iter__(self) -> Iterator[tuple[Any, int] | None]:
        wds = _import_webdataset()
        pipeline = wds.WebDataset(
            self.shards,
            shardshuffle=False,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            handler=wds.warn_and_continue,
            empty_check=False,
        )
        for sample in pipeline:
            yield self._decode(sample)


def _looks_like_shards(path: str) -> bool:
    """Whether ``path`` names tar shards: a .tar file/pattern or a brace pattern."""
    return path.endswith(".tar") or bool(_BRACE_RANGE.search(path))


def _folder_holds_only_shards(folder: Path) -> bool:
    """Whether ``folder``'s top level holds .tar files and neither images nor sub-folders (a folder of shards)."""
    has_tar = False
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() or is_image_file(entry.name):
            return False
        has_tar = has_tar or entry.name.endswith(".tar")
    return has_tar


def _detect_kind(path: str | Path | Sequence[str | Path]) -> str:
    """The kind ``auto`` stands for (see :func:`build_unlabeled_dataset`)."""
    items = [path] if isinstance(path, (str, Path)) else list(path)
    texts = [os.path.expanduser(str(item)) for item in items]
    if texts and all(_looks_like_shards(text) for text in texts):
        return "webdataset"
    if len(texts) == 1:
        text = texts[0]
        if os.path.isdir(text):
            return "webdataset" if _folder_holds_only_shards(Path(text)) else "folder"
        if os.path.isfile(text) and not is_image_file(text):
            return "filelist"
    return "folder"


def build_unlabeled_dataset(
    path: str | Path | Sequence[str | Path],
    kind: str = "auto",
    transform: Callable[[Image.Image], Any] | None = None,
) -> Dataset:
    """Build the pre-training data set; items are ``(transform(image), index or label)`` or None if unreadable.

    ``kind``:

    - ``folder``: every image under the folder(s), recursively (anything :func:`~franca.data.images.list_images`
      accepts: folders, globs, list files, image files); targets are sample indices;
    - ``imagefolder``: the images of an ``ROOT/<class>/<image>`` tree (layout checked, labels ignored: targets are
      sample indices);
    - ``filelist``: a text file listing image paths one per line (relative to the list file's folder);
    - ``webdataset``: tar shards, as a brace pattern (``data/shard-{000000..000009}.tar``), a glob, a folder of .tar
      files or a list of shards; returns an iterable :class:`WebDatasetImages` (targets: ``cls`` or -1);
    - ``auto``: ``webdataset`` for .tar paths and brace patterns or a folder holding only .tar files, ``filelist`` for
      a non-image file, ``folder`` otherwise.

    Map-style results are sampled with :class:`InfiniteSampler` (see the module docstring for sharding). Raises
    :class:`DataError` for missing or empty inputs and :class:`ConfigError` for an unknown kind.
    """
    if kind not in DATASET_KINDS:
        raise ConfigError(f"unknown data set kind {kind!r}; expected one of {', '.join(DATASET_KINDS)}")
    if kind == "auto":
        kind = _detect_kind(path)
    if kind == "webdataset":
        return WebDatasetImages(path, transform=transform)
    if kind == "imagefolder":
        if not isinstance(path, (str, Path)):
            raise DataError("kind 'imagefolder' takes one root folder, ROOT/<class>/<image>")
        return ImageFileDataset(ImageFolderDataset(path).paths, transform=transform)
    if kind == "filelist":
        items = [path] if isinstance(path, (str, Path)) else list(path)
        for item in items:
            text = os.path.expanduser(str(item))
            if not os.path.isfile(text):
                raise DataError(
                    f"image list {text} does not exist (expected a text file with one image path a line)"
                )
            if is_image_file(text):
                raise DataError(
                    f"{text} is an image, not a text file listing image paths (use kind 'folder')"
                )
    return ImageFileDataset(list_images(path), transform=transform)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit generator seed hashed from the pair (seed, epoch).

    Hashed, not packed into one integer, because torch's CPU generator only uses the low 32 bits of its seed: seeds
    differing only in their high bits would give the same permutations.
    """
    digest = hashlib.blake2b(f"franca-sampler:{int(seed)}:{int(epoch)}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class InfiniteSampler(Sampler[int]):
    """Endless stream of data set indices: epoch after epoch, strided over ranks, resumable at any position.

    The global stream is the concatenation of one ordering of ``range(dataset_size)`` per epoch: a permutation from a
    ``torch.Generator`` seeded by ``(seed, epoch)`` when ``shuffle``, else the identity. Global position ``p`` holds
    epoch ``p // dataset_size``, entry ``p % dataset_size``. Rank ``r`` yields the positions
    ``start_index + r + k * world_size`` for k = 0, 1, ...; so the ranks together consume the global stream in order,
    disjointly within each epoch (up to the epoch's last partial round), and ``start_index`` (the number of samples all
    ranks consumed together, e.g. ``iteration * batch_size_per_rank * world_size``) resumes the exact same stream,
    even with a different world size. There is no hidden RNG state: every call to ``iter`` restarts at
    ``start_index``. Each epoch draws one permutation of ``dataset_size`` int64 (8 bytes a sample) and keeps this rank's
    share.
    """

    def __init__(
        self,
        dataset_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_index: int = 0,
    ) -> None:
        if dataset_size <= 0:
            raise DataError(f"cannot sample from an empty data set (dataset_size={dataset_size})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"invalid rank {rank} for world_size {world_size}; need 0 <= rank < world_size")
        if start_index < 0:
            raise ConfigError(f"start_index must be >= 0, got {start_index}")
        self.dataset_size = int(dataset_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_index = int(start_index)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The ``[dataset_size]`` int64 ordering of the data set used in ``epoch`` (same on every rank)."""
        if not self.shuffle:
            return torch.arange(self.dataset_size, dtype=torch.int64)
        generator = torch.Generator()
        generator.manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[int]:
        size, stride = self.dataset_size, self.world_size
        position = self.start_index + self.rank  # next global position this rank yields
        while True:
            epoch = position // size
            order = self.epoch_order(epoch)
            offset = position - epoch * size
            mine = order[offset::stride]
            yield from mine.tolist()
            position += stride * len(mine)
