"""Where do a backbone's patch features come from: the patch embedding, or what the blocks add to it?

The last-layer patch tokens are ``x_L = x_0 + r``: ``x_0`` is the patch embedding plus the position embedding (what the
blocks start from) and ``r`` the sum of every block's residual update. With LayerScale initialised at 1e-5 a short run
leaves ``r`` small, so the patch features a dense evaluation sees can be the (trained) patch embedding almost alone
while the CLS token, which *is* its residual, has learned the classes. This probe measures it on a synthetic data set:
for the trained backbone of a run and the same backbone at random initialisation, the mean norms ``|x_0|`` and ``|r|``
of the patch tokens, and the demo's protocols on three features: the final tokens (the model's own LayerNorm), ``x_0``
and ``r`` (each standardised per token, i.e. a LayerNorm without affine): k-NN on the mean-pooled patch tokens and
HummingBird mIoU, plus k-NN on the final CLS token for reference (docs/demo-learning.md, section 6). The random-init
``r`` (LayerScale-sized noise) gives the scores of a feature that carries nothing::

    python benchmarks/probe_patch_features.py --run runs/demo/train --data runs/demo/data
    python benchmarks/probe_patch_features.py --run runs/demo/train --data runs/demo/data --blocks 2 4  # earlier blocks

Evaluation sizes are the demo's (5,000 train images, the whole val split, a 32,768-patch HummingBird bank); about a
minute in all on 2 CPU cores for a tiny_cpu run (50 s with ``--blocks 3``, 8 features).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import machine_info, print_table, write_json
from torch import Tensor, nn

from franca.apps import demo
from franca.apps.demo.settings import NUM_SHAPE_CLASSES
from franca.eval.hummingbird import HummingbirdSettings, label_bank, score_hummingbird
from franca.eval.knn import knn_classify
from franca.features import Features, TensorImages, extract_features
from franca.models.checkpoints import load_backbone
from franca.train.config import load_config

TOKENS = ("cls", "patch", "pooled")


class PatchDecomposition(nn.Module):
    """A backbone view for :func:`franca.features.extract_features` that returns one part of the tokens: ``"x0"``
    (patch embedding + position, what the blocks start from) or ``"residual"`` (what the first ``blocks`` blocks
    added to it). ``standardise`` applies a LayerNorm without affine, so that cosine similarities compare directions
    only; without it the raw part comes back (for its norm)."""

    def __init__(self, backbone: nn.Module, part: str, blocks: int, standardise: bool = True) -> None:
        super().__init__()
        if part not in ("x0", "residual"):
            raise ValueError(f"unknown part {part!r}")
        self.backbone, self.part, self.blocks, self.standardise = backbone, part, blocks, standardise
        self.patch_size = backbone.patch_size

    def forward_features(self, images: Tensor) -> dict[str, Tensor]:
        start = self.backbone.prepare_tokens_with_masks(images)
        chosen = start
        if self.part == "residual":
            tokens = start
            for block in self.backbone.blocks[: self.blocks]:
                tokens = block(tokens)
            chosen = tokens - start
        if self.standardise:
            chosen = F.layer_norm(chosen, chosen.shape[-1:])
        first_patch = 1 + self.backbone.num_register_tokens
        return {"x_norm_clstoken": chosen[:, 0], "x_norm_patchtokens": chosen[:, first_patch:]}


def features_of(model: nn.Module, images: Tensor, labels: Tensor | None = None) -> Features:
    """The CLS token, patch grid and mean patch token of uint8 ``images`` [N, 3, S, S] (ImageNet-normalised by
    :mod:`franca.features`), on the CPU, with ``labels`` as targets."""
    return extract_features(model, TensorImages(images, labels, 256), TOKENS, "cpu", progress=False)


def mean_norms(view: PatchDecomposition, images: Tensor) -> tuple[float, float]:
    """Mean L2 norm of the (raw) part over the patch tokens and over the CLS token of ``images``."""
    raw = PatchDecomposition(view.backbone, view.part, view.blocks, standardise=False)
    features = features_of(raw, images)
    return float(features.patch.norm(dim=-1).mean()), float(features.cls.norm(dim=-1).mean())


def knn_top1(train: Tensor, train_labels: Tensor, val: Tensor, val_labels: Tensor, settings: Any) -> float:
    """The demo's k-NN top-1 (k, temperature of its settings) of val features against train features."""
    results = knn_classify(
        train,
        train_labels,
        val,
        val_labels,
        ks=(settings.knn_k,),
        temperature=settings.knn_temperature,
        num_classes=NUM_SHAPE_CLASSES,
    )
    return results[f"k{settings.knn_k}"]["top1"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--run", required=True, help="a training run folder (config.yaml + teacher_backbone.*)"
    )
    parser.add_argument("--data", required=True, help="the synthetic data set (train/, val/, masks/)")
    parser.add_argument(
        "--blocks",
        type=int,
        nargs="*",
        default=[],
        help="also evaluate the residual after these numbers of blocks (after the last block: always)",
    )
    parser.add_argument("--json", default="benchmarks/out/probe_patch_features.json")
    args = parser.parse_args(argv)

    run, data = Path(args.run), Path(args.data)
    exported = sorted(run.glob("teacher_backbone.*"))
    if not (run / "config.yaml").is_file() or not exported:
        print(
            f"error: {run} is not a training run (needs config.yaml and teacher_backbone.*)", file=sys.stderr
        )
        return 2
    config = load_config(str(run / "config.yaml"))
    settings, device = demo.EvalSettings(), torch.device("cpu")
    size = config.crops.global_size
    train = demo.load_split(data, "train", size, progress=False, max_images=settings.train_images)
    val = demo.load_split(data, "val", size, progress=False)  # all of it, as the demo
    num_classes = NUM_SHAPE_CLASSES + 1  # + background
    bank = label_bank(train.masks, config.model.patch_size, num_classes, settings.hummingbird_memory_patches)
    hummingbird = HummingbirdSettings(
        k=settings.hummingbird_k, temperature=settings.hummingbird_temperature, search="torch"
    )
    models = {"trained": load_backbone(str(exported[0])), "random init": demo.random_init_backbone(config)}
    rows = []
    for model_name, backbone in models.items():
        backbone.eval()
        depth = len(backbone.blocks)
        views: list[tuple[str, int, nn.Module]] = [("final", depth, backbone)]
        views += [("x0", 0, PatchDecomposition(backbone, "x0", 0))]
        views += [
            ("residual", n, PatchDecomposition(backbone, "residual", n))
            for n in sorted({*args.blocks, depth})
        ]
        for part, blocks, view in views:
            train_features = features_of(view, train.images, train.labels)
            val_features = features_of(view, val.images, val.labels)
            row = {"model": model_name, "features": part, "blocks": blocks, "norm": None, "cls_knn": None}
            if part == "final":
                row["cls_knn"] = knn_top1(
                    train_features.cls, train.labels, val_features.cls, val.labels, settings
                )
            else:
                row["norm"], cls_norm = mean_norms(view, val.images[:256])
                print(f"{model_name} {part}@{blocks}: CLS token norm {cls_norm:.2f}", file=sys.stderr)
            row["pooled_knn"] = knn_top1(
                train_features.pooled, train.labels, val_features.pooled, val.labels, settings
            )
            row["hummingbird"] = score_hummingbird(
                train_features.patch,
                train.masks,
                val_features.patch,
                val.masks,
                hummingbird,
                num_classes=num_classes,
                bank=bank,
                device=device,
            ).miou
            rows.append(row)
            print(
                f"{model_name} {part}@{blocks}: HummingBird {row['hummingbird']:.1f}",
                file=sys.stderr,
                flush=True,
            )
    print_table(
        rows,
        [
            ("model", "model", "s"),
            ("features", "features", "s"),
            ("blocks", "after blocks", "d"),
            ("norm", "mean |.|", ".2f"),
            ("cls_knn", "CLS k-NN", ".1f"),
            ("pooled_knn", "pooled-patch k-NN", ".1f"),
            ("hummingbird", "HummingBird mIoU", ".1f"),
        ],
    )
    write_json(args.json, {"machine": machine_info(device), "run": str(run), "data": str(data), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
