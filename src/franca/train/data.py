"""The pre-training input pipeline: a resumable sample stream, per-sample seeded multi-crop, masks in the collate.

Every random choice of the pipeline is a function of (seed, rank, global sample position), never of hidden state:

- :class:`PositionedSampler` yields ``(position, index)`` pairs of :class:`~franca.data.datasets.InfiniteSampler`'s
  stream, which resumes at any position;
- :class:`SeededSample` augments sample ``position`` under a torch seed derived from it (inside ``fork_rng``, so the
  process's own random state is untouched whether loading runs in workers or not);
- :class:`MultiCropCollator` stacks the crops and draws the CyclicMask masks from a generator seeded by the batch's
  first position.

So a run resumed at iteration k sees exactly the batches an uninterrupted run sees, with any number of workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from franca.core.errors import ConfigError
from franca.data.augmentations import MultiCropAugmentation
from franca.data.batch import TrainBatch
from franca.data.datasets import InfiniteSampler, build_unlabeled_dataset
from franca.data.device_augment import DeviceMultiCropAugmentation
from franca.ssl import CyclicMask, build_mask_batch
from franca.train.config import TrainConfig


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed hashed from ``parts`` (distinct tuples give unrelated streams)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class PositionedSampler(Sampler[tuple[int, int]]):
    """``(global position, data set index)`` pairs of an :class:`InfiniteSampler` stream (rank-strided)."""

    def __init__(self, sampler: InfiniteSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.sampler.start_index + self.sampler.rank
        for index in self.sampler:
            yield position, index
            position += self.sampler.world_size


class SeededSample(Dataset):
    """Map-style wrapper: ``item[(position, index)]`` augments ``dataset[index]`` under a seed derived from position.

    Returns ``(crops, position)``, or None when the underlying data set skipped an unreadable file.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int] | None:
        position, index = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also queues a (lazy) seed for every accelerator backend,
            # ~0.16 ms per call, i.e. ~1 % of a batch-16 step of the 32-px demo
            torch.default_generator.manual_seed(derived_seed(self.seed, "sample", position))
            sample = self.dataset[index]
        if sample is None:
            return None
        return sample[0], position


class PositionedIterable(IterableDataset):
    """Iterable (WebDataset) counterpart: numbers the stream, skips what a resumed run already consumed."""

    def __init__(self, dataset: IterableDataset, seed: int, start: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed
        self.start = start

    def __iter__(self) -> Iterator[tuple[Any, int] | None]:
        for position, sample in enumerate(self.dataset):
            if position < self.start:
                continue
            yield None if sample is None else (sample[0], position)


class MultiCropCollator:
    """Collate ``(crops, position)`` samples into a :class:`TrainBatch` with CyclicMask masks for the global crops."""

    def __init__(self, config: TrainConfig, patch_size: int, seed: int) -> None:
        grid = config.crops.global_size // patch_size
        self.mask_generator = CyclicMask(
            grid, grid, min_aspect=config.masking.min_aspect, roll=config.masking.roll
        )
        self.mask_probability = config.masking.probability
        self.ratio_min_max = tuple(config.masking.ratio_min_max)
        self.seed = seed

    def __call__(self, samples: Sequence[tuple[Any, int] | None]) -> TrainBatch | None:
        kept = [s for s in samples if s is not None]
        skipped = len(samples) - len(kept)
        if not kept:
            return TrainBatch(
                torch.empty(0), None, torch.empty(0), torch.empty(0), torch.empty(0), 0, skipped
            )
        crops = [s[0] for s in kept]
        positions = [s[1] for s in kept]
        n_views = len(crops[0]["global_crops"])
        global_crops = torch.stack([c["global_crops"][v] for v in range(n_views) for c in crops])
        n_local = len(crops[0]["local_crops"])
        local_crops = (
            torch.stack([c["local_crops"][v] for v in range(n_local) for c in crops]) if n_local else None
        )
        generator = torch.Generator().manual_seed(derived_seed(self.seed, "masks", min(positions)))
        mask_batch = build_mask_batch(
            global_crops.shape[0], self.mask_generator, self.mask_probability, self.ratio_min_max, generator
        )
        return TrainBatch(
            global_crops=global_crops,
            local_crops=local_crops,
            masks=mask_batch.masks,
            masked_indices=mask_batch.masked_indices,
            masked_weights=mask_batch.masked_weights,
            batch_size=len(kept),
            num_skipped=skipped,
            positions=positions,
        )


def _photometric_settings(crops: Any) -> dict[str, Any]:
    """The keyword arguments of ``config.crops`` that both augmentation pipelines take (colour, blur, solarise), so
    that a new photometric key cannot reach one pipeline and miss the other."""
    return {
        "blur": crops.blur_probabilities,
        "solarize_prob": crops.solarize_probability,
        "blur_sigma": tuple(crops.blur_sigma),
        "color_jitter": tuple(crops.color_jitter),
        "color_jitter_prob": crops.color_jitter_probability,
        "grayscale_prob": crops.grayscale_probability,
    }


def build_multicrop(config: TrainConfig) -> Any:
    """The multi-crop augmentation that ``config.crops`` describes."""
    crops = config.crops
    return MultiCropAugmentation(
        global_size=crops.global_size,
        local_size=crops.local_size,
        n_local_crops=crops.n_local,
        global_scale=tuple(crops.global_scale),
        local_scale=tuple(crops.local_scale),
        geometry_only=crops.augment_on_device,
        **_photometric_settings(crops),
    )


def build_device_augmentation(config: TrainConfig) -> Any:
    """The batched photometric half of ``config.crops`` (for ``crops.augment_on_device``), see franca.data.device_augment."""
    return DeviceMultiCropAugmentation(**_photometric_settings(config.crops))


def build_train_loader(
    config: TrainConfig,
    patch_size: int,
    batch_size: int,
    start_iteration: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, int]:
    """The infinite training DataLoader starting at ``start_iteration``; returns it and the data set size (or -1)."""
    if not config.data.path:
        raise ConfigError(
            "config key 'data.path' is not set; pass data.path=FOLDER (e.g. made by `franca data synth`)"
        )
    dataset = build_unlabeled_dataset(config.data.path, config.data.kind, transform=build_multicrop(config))
    seed = derived_seed(config.train.seed, "data")
    collate = MultiCropCollator(config, patch_size, derived_seed(config.train.seed, "collate"))
    workers = config.train.num_workers
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": workers,
        "collate_fn": collate,
        "pin_memory": torch.cuda.is_available(),
        "drop_last": True,
        "persistent_workers": workers > 0,
    }
    if workers > 0:
        common["prefetch_factor"] = 4
    start = start_iteration * batch_size * world_size
    if isinstance(dataset, IterableDataset):
        # WebDataset splits shards over nodes and workers itself; a resumed run skips consumed samples.
        loader = DataLoader(PositionedIterable(dataset, seed, start // world_size), **common)
        return loader, -1
    sampler = InfiniteSampler(
        len(dataset),
        shuffle=True,
        seed=config.train.seed,
        rank=rank,
        world_size=world_size,
        start_index=start,
    )
    loader = DataLoader(
        SeededSample(dataset, seed),
        sampler=PositionedSampler(sampler),
        generator=torch.Generator().manual_seed(seed),
        **common,
    )
    return loader, len(dataset)
