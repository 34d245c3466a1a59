"""How many of the official iBOT Sinkhorn-Knopp columns are zero-padding rows rather than masked patches?

The official training step gathers the M masked patch tokens of a GPU's batch into a buffer of ``upperbound`` rows
(zero rows after the first M), runs the iBOT head on the whole buffer and slices the result with
``[:n_masked_patches]``. With the Matryoshka heads the head returns a tuple of levels, so that slice cuts the *tuple*
(a no-op) instead of the rows, and all ``upperbound`` rows enter the iBOT Sinkhorn-Knopp of every level: its columns
are M masked patches plus ``upperbound - M`` padding rows. franca runs Sinkhorn-Knopp on the M masked patches only
(the intended maths).

``upperbound`` is the sum over the masked crops of int(N * p_{i+1}), with p = linspace(r_min, r_max, n + 1) the
stratified ratio bounds, computed as the official collate function does (a float32 ``torch.linspace``; franca's
:func:`franca.ssl.build_mask_batch` uses float64, which can move the bound by a row or two); M is drawn by
:func:`franca.ssl.build_mask_batch`, the collate function's mask construction. The padded fraction is (upperbound - M) / upperbound. Its expectation is exact
here (:func:`franca.train.flops.expected_masked_patches`); the sampled mean, min and max come from ``--trials`` seeded
batches. Across GPUs the fraction is the same (the sums of both counts scale with the number of GPUs). It shrinks
with the per-GPU batch: the paper's global batches on its GPU counts give 64 images per GPU for ViT-B (2048 on 32
GPUs) and 48 for ViT-L (3072 on 64); the official configs and scripts run 32 per GPU. ViT-L and ViT-g share ViT-B's
16x16 grid at 224 px, so their rows are the same::

    python benchmarks/ibot_padding.py                       # ViT-B/14 at 224 px, 16-96 images per GPU
    python benchmarks/ibot_padding.py --images-per-gpu 64 --trials 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from common import machine_info, print_table, write_json

from franca.ssl import CyclicMask, build_mask_batch
from franca.train.config import MaskingConfig, load_config
from franca.train.flops import expected_masked_patches

DINOV2_RATIO_RANGE = (0.1, 0.5)  # DINOv2's default, for comparison with Franca's (0.1, 0.65)


def official_upperbound(n_crops: int, masking: MaskingConfig, num_patches: int) -> int:
    """The official collate's padded bound: sum of int(N * p_{i+1}) over the masked crops, p in float32."""
    n_masked = int(n_crops * masking.probability)
    ratio_min, ratio_max = (float(value) for value in masking.ratio_min_max)
    bounds = torch.linspace(ratio_min, ratio_max, n_masked + 1)  # float32, as in the official code
    return sum(int(num_patches * bounds[i + 1]) for i in range(n_masked))


def measure(
    images_per_gpu: int, masking: MaskingConfig, grid: int, trials: int, seed: int
) -> dict[str, float | int | str]:
    """The padding of one GPU's iBOT Sinkhorn-Knopp for one batch size and masking config."""
    n_crops = 2 * images_per_gpu  # two global crops per image
    mask_generator = CyclicMask(grid, grid, min_aspect=masking.min_aspect, roll=masking.roll)
    ratio_range = tuple(float(value) for value in masking.ratio_min_max)
    generator = torch.Generator().manual_seed(seed)
    batches = [
        build_mask_batch(n_crops, mask_generator, masking.probability, ratio_range, generator)
        for _ in range(trials)
    ]
    upperbound = official_upperbound(n_crops, masking, grid * grid)  # fixed by the crops and the ratio bounds
    if any(batch.n_masked_patches > upperbound for batch in batches):
        raise RuntimeError("a batch has more masked patches than the official padded bound")
    fractions = [(upperbound - batch.n_masked_patches) / upperbound for batch in batches]
    expected = expected_masked_patches(masking, n_crops, grid * grid)
    return {
        "images_per_gpu": images_per_gpu,
        "global_crops": n_crops,
        "masked_crops": int(n_crops * masking.probability),
        "ratio_range": f"{ratio_range[0]:g}-{ratio_range[1]:g}",
        "upperbound": upperbound,
        "expected_masked": expected,
        "sampled_masked": statistics.mean(batch.n_masked_patches for batch in batches),
        "padded_rows": upperbound - expected,
        "padded_percent": 100 * (upperbound - expected) / upperbound,
        "sampled_percent": 100 * statistics.mean(fractions),
        "min_percent": 100 * min(fractions),
        "max_percent": 100 * max(fractions),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="vitb14_in21k", help="config whose masking and crop size to use")
    parser.add_argument("--images-per-gpu", type=int, nargs="+", default=[16, 32, 48, 64, 96])
    parser.add_argument("--trials", type=int, default=200, help="seeded mask batches per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/out/ibot_padding.json")
    args = parser.parse_args(argv)

    config = load_config(args.preset, ["data.path=unused"])
    grid = config.crops.global_size // config.model.patch_size
    masking = config.masking
    dinov2 = MaskingConfig(
        probability=masking.probability,
        ratio_min_max=list(DINOV2_RATIO_RANGE),
        min_aspect=masking.min_aspect,
        roll=masking.roll,
    )
    print(
        f"{args.preset}: {config.crops.global_size} px global crops, {grid}x{grid} patches, mask probability "
        f"{masking.probability}, ratio range {tuple(masking.ratio_min_max)}; {args.trials} batches per row"
    )
    rows = [measure(n, masking, grid, args.trials, args.seed) for n in args.images_per_gpu]
    rows += [measure(n, dinov2, grid, args.trials, args.seed) for n in args.images_per_gpu]
    print_table(
        rows,
        [
            ("images_per_gpu", "images/GPU", "d"),
            ("global_crops", "crops", "d"),
            ("masked_crops", "masked crops", "d"),
            ("ratio_range", "ratios", "s"),
            ("upperbound", "SK columns (official)", "d"),
            ("expected_masked", "E[masked] (franca)", ".1f"),
            ("padded_rows", "padding", ".1f"),
            ("padded_percent", "padded %", ".2f"),
            ("sampled_percent", "sampled %", ".2f"),
            ("min_percent", "min %", ".2f"),
            ("max_percent", "max %", ".2f"),
        ],
    )
    write_json(
        args.json,
        {"machine": machine_info(), "preset": args.preset, "grid": grid, "trials": args.trials, "rows": rows},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
