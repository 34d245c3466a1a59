"""The demo's data: the synthetic data set on disk, and both splits (images, masks, labels) in memory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from franca.apps.demo.progress import PhaseLog
from franca.apps.demo.settings import NUM_SHAPE_CLASSES, DemoSettings
from franca.core.errors import ConfigError, DataError, check_choice
from franca.core.progress import ProgressBar
from franca.data.images import UnreadableImageError
from franca.data.synth import STYLES, generate_synthetic_dataset, read_synth_info
from franca.eval.hummingbird import LabelBank, label_bank
from franca.eval.segmentation_data import SegmentationDataset, UnreadableMaskError, seeded_subset


def prepare_data(settings: DemoSettings, log: PhaseLog) -> Any:
    """Reuse the complete synthetic data set in ``settings.data_path`` or generate it; returns its SynthInfo.

    A complete data set of other sizes is never overwritten: that raises ConfigError naming the mismatch.
    """
    check_choice("--style", settings.style, STYLES)
    root = settings.data_path
    existing = _reusable_data(settings)
    if existing is not None:
        log(
            f"data: reusing {root} ({existing.num_train} train / {existing.num_val} val images, {existing.size} px)"
        )
        return existing
    workers = settings.workers or max(1, min(4, os.cpu_count() or 1))
    log(
        f"data: generating {settings.num_images} train / {settings.val_images} val synthetic images "
        f"({settings.size} px, style {settings.style}) in {root} with {workers} process(es)"
    )
    return generate_synthetic_dataset(
        root,
        num_train=settings.num_images,
        num_val=settings.val_images,
        size=settings.size,
        seed=settings.data_seed,
        workers=workers,
        progress=settings.progress,
        style=STYLES[settings.style],
    )


def _reusable_data(settings: DemoSettings) -> Any:
    """The SynthInfo of the complete data set in ``settings.data_path`` when it is the requested one; None when
    there is none (or an interrupted or foreign one, which generation replaces or refuses); ConfigError when it
    has other sizes, seed or style."""
    root = settings.data_path
    if not (root / "classes.json").is_file():
        return None
    try:
        existing = read_synth_info(root)
    except DataError:
        return None
    wanted = (settings.num_images, settings.val_images, settings.size, settings.data_seed)
    found = (existing.num_train, existing.num_val, existing.size, existing.seed)
    if found == wanted and existing.style != STYLES[settings.style]:
        found_style = next((name for name, preset in STYLES.items() if preset == existing.style), "custom")
        raise ConfigError(
            f"{root} holds a synthetic data set of style {found_style!r}, not the requested "
            f"{settings.style!r}; pass --style {found_style}, another --data or --output-dir, or delete it"
        )
    if found != wanted:
        raise ConfigError(
            f"{root} holds a synthetic data set of {found[0]} train / {found[1]} val images at {found[2]} px "
            f"(seed {found[3]}), not the requested {wanted[0]} / {wanted[1]} at {wanted[2]} px (seed {wanted[3]}); "
            "pass matching --num-images/--val-images/--size, another --data or --output-dir, or delete it"
        )
    return existing


@dataclass
class SplitData:
    """One split held in memory: images uint8 [N, 3, S, S], masks uint8 [N, S, S], class labels int64 [N]."""

    images: Tensor
    masks: Tensor
    labels: Tensor
    paths: list[Path]
    num_skipped: int = 0


class _SplitDataset(torch.utils.data.Dataset):
    """(image uint8 [3, S, S], mask uint8 [S, S], class id, index) of a synthetic split; None when unreadable."""

    def __init__(self, root: Path, split: str, size: int) -> None:
        self.segmentation = SegmentationDataset(root, split=split, layout="synth", size=size)
        names = list(self.segmentation.class_names)  # ("background", shape classes...)
        self.class_of_folder = {name: index - 1 for index, name in enumerate(names) if index > 0}
        self.size = size

    def __len__(self) -> int:
        return len(self.segmentation)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int, int] | None:
        try:
            image, mask = self.segmentation.load_pair(index)
        except (UnreadableImageError, UnreadableMaskError):
            return None
        image_tensor = TF.pil_to_tensor(image)
        mask_tensor = torch.from_numpy(mask).unsqueeze(0)
        if tuple(image_tensor.shape[-2:]) != (self.size, self.size):
            image_tensor = TF.resize(
                image_tensor, [self.size, self.size], InterpolationMode.BILINEAR, antialias=True
            )
            mask_tensor = TF.resize(mask_tensor, [self.size, self.size], InterpolationMode.NEAREST)
        label = self.class_of_folder[self.segmentation.samples[index].image.parent.name]
        return image_tensor, mask_tensor[0].to(torch.uint8), label, index


def _collate_split(batch: Sequence[tuple[Tensor, Tensor, int, int] | None]) -> tuple[Any, ...]:
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, None, None, skipped
    images, masks, labels, indices = zip(*kept)
    return torch.stack(images), torch.stack(masks), torch.tensor(labels), torch.tensor(indices), skipped


def load_split(
    root: Path,
    split: str,
    size: int,
    workers: int = 0,
    progress: bool = True,
    max_images: int | None = None,
    seed: int = 0,
) -> SplitData:
    """Read the images and masks of a synthetic split once into memory (unreadable pairs skipped and counted).

    ``max_images`` keeps a seeded uniform subset of the split (in path order), e.g. to bound feature extraction.
    """
    dataset: torch.utils.data.Dataset = _SplitDataset(root, split, size)
    samples = dataset.segmentation.samples
    if max_images is not None and max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, seeded_subset(range(len(dataset)), max_images, seed))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=256, num_workers=workers, collate_fn=_collate_split, shuffle=False
    )
    images, masks, labels, indices, skipped = [], [], [], [], 0
    for batch_images, batch_masks, batch_labels, batch_indices, batch_skipped in ProgressBar(
        loader, desc=f"load {split}", unit="batch", disable=not progress, leave=False
    ):
        skipped += batch_skipped
        if batch_images is None:
            continue
        images.append(batch_images)
        masks.append(batch_masks)
        labels.append(batch_labels)
        indices.append(batch_indices)
    if not images:
        raise DataError(f"{root}: no readable {split} image; regenerate the data set (delete the folder)")
    order = torch.cat(indices)
    return SplitData(
        images=torch.cat(images),
        masks=torch.cat(masks),
        labels=torch.cat(labels).long(),
        paths=[samples[int(i)].image for i in order],
        num_skipped=skipped,
    )


@dataclass
class DemoData:
    """Both splits in memory plus the shared HummingBird memory bank (a seeded subset of the labelled train patches)."""

    train: SplitData
    val: SplitData
    bank: LabelBank
    num_classes: int  # segmentation classes: background + shapes
    patch_size: int
    train_dir: Path  # the training images (data.path of the runs)


@dataclass
class DataSummary:
    """The facts of the data set a demo evaluated on (``metrics.json["data"]``)."""

    root: str
    num_train: int  # images in the train split
    num_val: int  # val images read
    eval_train_images: int  # train images read (the k-NN / probe / HummingBird memory)
    size: int  # image side of the data set
    style: str
    eval_size: int  # image side the backbones see (a multiple of the patch size)
    skipped_train: int  # unreadable pairs
    skipped_val: int

    @classmethod
    def of(cls, info: Any, data: DemoData, style: str, eval_size: int) -> DataSummary:
        """From the data set's SynthInfo and the splits read into memory."""
        return cls(
            root=str(info.root),
            num_train=info.num_train,
            num_val=len(data.val.labels),
            eval_train_images=len(data.train.labels),
            size=info.size,
            style=style,
            eval_size=eval_size,
            skipped_train=data.train.num_skipped,
            skipped_val=data.val.num_skipped,
        )


def load_demo_data(settings: DemoSettings, info: Any, eval_size: int, patch_size: int) -> DemoData:
    """Both splits of the data set ``info`` (a SynthInfo) in memory at ``eval_size`` px, and the HummingBird memory
    bank: a seeded subset of the labelled ``patch_size`` patches of the train images, shared by every model."""
    small = settings.num_images + settings.val_images < 2000
    workers = 0 if small else min(2, settings.workers or os.cpu_count() or 1)
    train = load_split(
        info.root, "train", eval_size, workers, settings.progress, settings.eval.train_images, settings.seed
    )
    val = load_split(info.root, "val", eval_size, workers, settings.progress)
    classes = NUM_SHAPE_CLASSES + 1  # background + shapes
    bank = label_bank(
        train.masks, patch_size, classes, settings.eval.hummingbird_memory_patches, settings.seed
    )
    return DemoData(train, val, bank, classes, patch_size, info.train_dir)
