"""Backbone inference throughput: franca's ViT against timm's DINOv2 ViT of the same architecture, side by side.

    python benchmarks/bench_inference.py [--arch vit_small] [--sizes 224 518] [--batch 8] [--repeats 5] [--device cpu]

Both models run the same input in the same process, interleaved, so machine noise hits them alike; the table gives
the median images/s of each and their ratio. Prints a table and writes JSON to benchmarks/out/inference.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from common import checked_device

from franca.models import build_model

TIMM_NAMES = {
    "vit_small": "vit_small_patch14_dinov2",
    "vit_base": "vit_base_patch14_dinov2",
    "vit_large": "vit_large_patch14_dinov2",
}


def _time(model: torch.nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small", choices=sorted(TIMM_NAMES))
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 518])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/out/inference.json")
    args = parser.parse_args()
    import timm

    device = checked_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    rows = []
    for size in args.sizes:
        ours = build_model(args.arch, img_size=518, ffn_layer="mlp").to(device).eval()
        reference = (
            timm.create_model(
                TIMM_NAMES[args.arch], pretrained=False, num_classes=0, img_size=size, dynamic_img_size=False
            )
            .to(device)
            .eval()
        )
        x = torch.randn(args.batch, 3, size, size, device=device)
        for model in (ours, reference):  # warm-up
            _time(model, x, device, dtype)
        times: dict[str, list[float]] = {"franca": [], "timm": []}
        for _ in range(args.repeats):
            times["franca"].append(_time(ours, x, device, dtype))
            times["timm"].append(_time(reference, x, device, dtype))
        franca_ips = args.batch / statistics.median(times["franca"])
        timm_ips = args.batch / statistics.median(times["timm"])
        rows.append(
            {
                "arch": args.arch,
                "size": size,
                "batch": args.batch,
                "device": str(device),
                "franca_img_per_s": franca_ips,
                "timm_img_per_s": timm_ips,
                "ratio": franca_ips / timm_ips,
            }
        )
    header = f"{'arch':<10} {'size':>5} {'batch':>5} {'franca img/s':>13} {'timm img/s':>11} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['arch']:<10} {row['size']:>5} {row['batch']:>5} {row['franca_img_per_s']:>13.2f} "
            f"{row['timm_img_per_s']:>11.2f} {row['ratio']:>6.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "timm": timm.__version__,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
