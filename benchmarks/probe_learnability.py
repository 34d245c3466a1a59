"""How many iterations does a small backbone need to learn a data set *with labels*? (a ceiling for the demo)

The demo must beat random initialisation by 15 k-NN points after ~10 CPU-minutes of self-supervised training. A
supervised run with the same backbone and budget is an upper bound on what self-supervision can reach, so this probe
tells whether a data set (e.g. a synthetic style) is learnable at all within the budget. It trains, with
cross-entropy on an ImageFolder, a small CNN (4 conv-BN-ReLU stages, global average pooling) and/or the ViT of a
training preset, and prints the training accuracy over the last 25 batches as it goes::

    python benchmarks/probe_learnability.py --data runs/demo/data --models cnn vit --iterations 300
    python benchmarks/probe_learnability.py --data DIR --models vit --override model.patch_size=16 --lr 5e-4

The table lists, per model, the training accuracy at every ``--every`` iterations and the seconds taken.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from common import machine_info, print_table, write_json
from torch import nn

from franca.core.constants import IMAGENET_MEAN, IMAGENET_STD
from franca.data.datasets import ImageFolderDataset
from franca.train.config import load_config
from franca.train.ssl_model import build_backbone


def small_cnn(width: int = 192) -> nn.Module:
    """Four 3x3 conv-BN-ReLU stages (32, 64, 128, ``width`` channels), 2x2 max-pooling between, average pooling."""
    layers: list[nn.Module] = []
    channels = [3, 32, 64, 128, width]
    for index, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        layers.append(nn.MaxPool2d(2) if index < len(channels) - 2 else nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(*layers, nn.Flatten())


def probe(
    model: nn.Module, width: int, loader: torch.utils.data.DataLoader, args: argparse.Namespace
) -> dict:
    """Train ``model`` + a linear classifier for ``args.iterations`` steps; training accuracy every ``args.every``."""
    classifier = nn.Linear(width, args.num_classes)
    parameters = [*model.parameters(), *classifier.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.05)
    correct: list[float] = []
    curve: dict[int, float] = {}
    iteration, start = 0, time.perf_counter()
    while iteration < args.iterations:
        for images, labels in loader:
            logits = classifier(model(images))
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct.append((logits.argmax(1) == labels).float().mean().item())
            iteration += 1
            if iteration % args.every == 0:
                curve[iteration] = 100.0 * sum(correct[-25:]) / len(correct[-25:])
                print(f"  {iteration}: train accuracy {curve[iteration]:.1f}% (last 25 batches)", flush=True)
            if iteration >= args.iterations:
                break
    return {"curve": curve, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", required=True, help="ImageFolder root with a train/ folder (or the train folder)"
    )
    parser.add_argument("--models", nargs="+", default=["cnn", "vit"], choices=["cnn", "vit"])
    parser.add_argument("--preset", default="tiny_cpu", help="training preset whose ViT is probed")
    parser.add_argument("--override", nargs="*", default=[], help="dotlist overrides of the preset (model.*)")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--json", default="benchmarks/out/learnability.json")
    args = parser.parse_args(argv)

    root = Path(args.data)
    train_dir = root / "train" if (root / "train").is_dir() else root
    config = load_config(args.preset, [f"data.path={train_dir}", *args.override])
    size = config.crops.global_size
    transform = T.Compose(
        [
            T.Resize(size, antialias=True),
            T.CenterCrop(size),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = ImageFolderDataset(str(train_dir), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=1, drop_last=True
    )
    rows, results = [], {}
    for kind in args.models:
        torch.manual_seed(0)
        if kind == "cnn":
            model, width = small_cnn(), 192
        else:
            model = build_backbone(config)
            width = model.embed_dim
        print(f"{kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
        result = probe(model, width, loader, args)
        results[kind] = result
        rows.append(
            {"model": kind, "seconds": result["seconds"], **{str(k): v for k, v in result["curve"].items()}}
        )
    columns = [("model", "model", "s"), ("seconds", "seconds", ".0f")]
    columns += [(str(k), f"acc@{k}", ".1f") for k in range(args.every, args.iterations + 1, args.every)]
    print_table(rows, columns)
    write_json(args.json, {"machine": machine_info(), "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
