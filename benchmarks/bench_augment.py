"""Multi-crop augmentation throughput on one core, and the pre-training DataLoader with 0, 1 and 2 workers.

    python benchmarks/bench_augment.py [--repeats 5] [--workers 0 1 2] [--loader-batches 6] [--json OUT]

Part 1 (per core, torch limited to one thread): franca.data.augmentations.MultiCropAugmentation on PIL images held in
memory, for the tiny_cpu setting (64-px source -> 64/32 px crops x4) and the paper setting (256-px source -> 224/98 px
crops x8); images/s is the median over ``--repeats`` passes over a fixed set of generated images.

Each setting is also timed split as ``crops.augment_on_device=true`` splits it: the crop+flip part left to the data
workers (one thread), and the batched photometric part (franca.data.device_augment) on ``--device`` (cuda when
available; on a CPU it runs with one thread here, so it only shows the cost).

Part 2: the real pre-training input pipeline (franca.train.data.build_train_loader: JPEG decode, seeded multi-crop,
collate with CyclicMask masks) over a temporary folder of generated JPEGs, for the same two settings, with each
worker count. The first batch (which includes starting the workers) is not timed; images/s is over the next
``--loader-batches`` batches. Writes JSON to benchmarks/out/augment.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import checked_device, machine_info, median, print_table, synchronize, write_json
from PIL import Image

from franca.train.config import load_config
from franca.train.data import build_multicrop, build_train_loader

# setting -> (config preset, source image size, images per timed pass, loader batch size)
SETTINGS: dict[str, tuple[str, int, int, int]] = {
    "64px->64/32x4": ("tiny_cpu", 64, 64, 32),
    "256px->224/98x8": ("vitb14_in21k", 256, 16, 16),
}


def generated_images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    """``count`` RGB images of ``size`` px: smooth random colour fields plus noise (JPEG-like content, not flat)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
            (size, size), Image.Resampling.BICUBIC
        )
        noise = rng.normal(0, 12, (size, size, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def augment_throughput(
    preset: str, size: int, n_images: int, repeats: int, on_device: bool = False
) -> dict[str, Any]:
    """Images/s of MultiCropAugmentation on one thread (median over ``repeats`` passes over ``n_images`` images).

    ``on_device=True`` times only the part left to the data workers when ``crops.augment_on_device`` is set (crop and
    flip, uint8).
    """
    config = load_config(preset, ["data.path=unused", f"crops.augment_on_device={on_device}"])
    transform = build_multicrop(config)
    images = generated_images(n_images, size)
    transform(images[0])  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for image in images:
            transform(image)
        rates.append(n_images / (time.perf_counter() - start))
    return {"images_per_s": median(rates), "images_per_s_all": rates, "images": n_images}


def device_photometric_throughput(
    preset: str, size: int, batch_size: int, repeats: int, device: torch.device
) -> dict[str, Any]:
    """Images/s of the batched colour/blur/solarise/normalise step (franca.data.device_augment) on ``device``."""
    from franca.train.data import MultiCropCollator, build_device_augmentation

    config = load_config(preset, ["data.path=unused", "crops.augment_on_device=true"])
    transform = build_multicrop(config)
    samples = [(transform(image), index) for index, image in enumerate(generated_images(batch_size, size))]
    batch = MultiCropCollator(config, config.model.patch_size, seed=0)(samples).to(device)
    augment = build_device_augmentation(config)
    generator = torch.Generator(device).manual_seed(0)
    augment(batch, generator)  # warm-up
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        augment(batch, generator)
        synchronize(device)
        rates.append(batch_size / (time.perf_counter() - start))
    return {"images_per_s": median(rates), "images_per_s_all": rates, "images": batch_size}


def loader_throughput(
    preset: str, folder: Path, workers: int, batch_size: int, batches: int
) -> dict[str, Any]:
    """Images/s of the pre-training DataLoader with ``workers`` workers, after its first batch."""
    config = load_config(preset, [f"data.path={folder}", f"train.num_workers={workers}"])
    loader, _ = build_train_loader(config, config.model.patch_size, batch_size, start_iteration=0)
    iterator = iter(loader)
    start = time.perf_counter()
    next(iterator)
    first_batch_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    del iterator, loader  # shuts the (persistent) workers down
    return {
        "images_per_s": batches * batch_size / elapsed,
        "first_batch_s": first_batch_s,
        "batches": batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=5, help="timed passes for the per-core measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--loader-batches", type=int, default=6, help="timed batches per DataLoader run")
    parser.add_argument("--jpegs", type=int, default=192, help="generated JPEGs per setting")
    parser.add_argument("--json", default="benchmarks/out/augment.json")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device of the batched photometric step (crops.augment_on_device)",
    )
    args = parser.parse_args()
    device = checked_device(args.device)

    torch.set_num_threads(1)  # per-core numbers; DataLoader workers run one thread each anyway
    rows: list[dict[str, Any]] = []
    for setting in args.settings:
        preset, size, n_images, _ = SETTINGS[setting]
        result = augment_throughput(preset, size, n_images, args.repeats)
        rows.append({"what": "augment (1 thread)", "setting": setting, "workers": None, **result})
        print(f"augment {setting}: {result['images_per_s']:.1f} images/s on one thread")
        result = augment_throughput(preset, size, n_images, args.repeats, on_device=True)
        rows.append({"what": "crop+flip only (1 thread)", "setting": setting, "workers": None, **result})
        print(f"crop+flip only {setting}: {result['images_per_s']:.1f} images/s on one thread")
        result = device_photometric_throughput(preset, size, SETTINGS[setting][3], args.repeats, device)
        rows.append({"what": f"photometric on {device.type}", "setting": setting, "workers": None, **result})
        print(f"photometric on {device.type} {setting}: {result['images_per_s']:.1f} images/s")

    with tempfile.TemporaryDirectory(prefix="franca-bench-") as tmp:
        for setting in args.settings:
            preset, size, _, batch_size = SETTINGS[setting]
            folder = Path(tmp) / f"jpeg{size}"
            folder.mkdir()
            for index, image in enumerate(generated_images(args.jpegs, size, seed=1)):
                image.save(folder / f"{index:05d}.jpg", quality=90)
            for workers in args.workers:
                result = loader_throughput(preset, folder, workers, batch_size, args.loader_batches)
                rows.append(
                    {
                        "what": "DataLoader",
                        "setting": setting,
                        "workers": workers,
                        "batch": batch_size,
                        **result,
                    }
                )
                print(f"loader {setting}, {workers} workers: {result['images_per_s']:.1f} images/s")

    print_table(
        rows,
        [
            ("what", "what", ""),
            ("setting", "setting", ""),
            ("workers", "workers", "d"),
            ("images_per_s", "images/s", ".1f"),
        ],
    )
    write_json(args.json, {"machine": machine_info(), "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
