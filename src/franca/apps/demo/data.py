"""The demo's data: the synthetic data set on disk, and both splits (images, masks, labels) in memory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from franca.apps.demo.progress import PhaseLog
from franca.apps.demo.settings import DemoSettings
from franca.core.errors import ConfigError, DataError, check_choice
from franca.eval.hummingbird import LabelBank
from franca.eval.segmentation_data import seeded_subset


def prepare_data(settings: DemoSettings, log: PhaseLog) -> Any:
    """Reuse the complete synthetic data set in ``settings.data_path`` or generate it; returns its SynthInfo.

    A complete data set of other sizes is never overwritten: that raises ConfigError naming the mismatch.
    """
    from franca.data.synth import STYLES, generate_synthetic_dataset, read_synth_info

    check_choice("--style", settings.style, STYLES)
    style = STYLES[settings.style]
    root = settings.data_path
    existing = None
    if (root / "classes.json").is_file():
        try:
            existing = read_synth_info(root)
        except DataError:
            existing = None  # an interrupted or foreign data set: generation replaces or refuses it
    wanted = (settings.num_images, settings.val_images, settings.size, settings.data_seed)
    if existing is not None:
        found = (existing.num_train, existing.num_val, existing.size, existing.seed)
        if found == wanted and existing.style != style:
            found_style = next(
                (name for name, preset in STYLES.items() if preset == existing.style), "custom"
            )
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
        style=style,
    )


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
        from franca.eval.segmentation_data import SegmentationDataset

        self.segmentation = SegmentationDataset(root, split=split, layout="synth", size=size)
        names = list(self.segmentation.class_names)  # ("background", shape classes...)
        self.class_of_folder = {name: index - 1 for index, name in enumerate(names) if index > 0}
        self.size = size

    def __len__(self) -> int:
        return len(self.segmentation)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int, int] | None:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        from franca.data.images import UnreadableImageError
        from franca.eval.segmentation_data import UnreadableMaskError

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
    from franca.core.progress import ProgressBar

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
