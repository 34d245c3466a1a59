"""CPU inference throughput of one backbone several ways: franca's PyTorch eager (fp32, and under CPU bf16 autocast),
its ONNX export in onnxruntime, and timm's ViT loading franca's timm export, side by side in one run.

    python benchmarks/bench_export.py [--archs vit_small vit_base] [--sizes 224 518] [--batches 1 8] [--repeats 3]
        [--threads N] [--no-bf16]

All run the same weights on the same input, interleaved (each repeat times every runtime once), so the machine's
noise hits them alike; the table gives the median images/s of each, the ratio of the fastest exact franca path
(fp32 eager or onnxruntime) to timm's eager speed, and that of bf16 autocast, whose features are not exact (its
relative error is shown). The fp32 paths' features are checked equal (1e-4) before timing. Prints a table and
writes JSON to benchmarks/out/export.json.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
from common import machine_info, median, print_table, write_json

from franca.models import build_model
from franca.models.export import OnnxBackbone, export_backbone


def _runtimes(arch: str, folder: Path, threads: int, bf16: bool) -> dict[str, torch.nn.Module]:
    """franca eager, onnxruntime, timm eager (and franca under bf16 autocast), all holding one randomly initialised
    DINOv2-style backbone."""
    import timm
    from safetensors.torch import load_file

    # the DINOv2 S/B layout (MLP FFN, 518-px grid) with timm's resize, so that every size runs one graph of each
    model = build_model(
        arch, img_size=518, ffn_layer="mlp", interpolate_offset=0.0, interpolate_antialias=True
    )
    model.eval()
    exported = export_backbone(model, folder / f"{arch}.safetensors", "timm")
    reference = timm.create_model(exported.details["model"], pretrained=False, **exported.details["kwargs"])
    reference.load_state_dict(load_file(exported.path))
    graph = export_backbone(model, folder / f"{arch}.onnx", "onnx").path
    runtimes = {
        "franca": model,
        "onnxruntime": OnnxBackbone(graph, threads=threads),
        "timm": reference.eval(),
    }
    if bf16:
        runtimes["franca_bf16"] = model
    return runtimes


def _forward(name: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patch tokens [B, N, D] (fp32) of ``x``: what an embedding job keeps."""
    if name == "timm":
        return model.forward_features(x)[:, 1:]
    bf16 = name == "franca_bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        return model.forward_features(x)["x_norm_patchtokens"].float()


def _seconds(name: str, model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        _forward(name, model, x)
    return time.perf_counter() - start


def _measure(runtimes: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median images/s of each runtime after one warm-up call each, and ``bf16_error``: the relative L2 error of the
    bf16 features. The fp32 runtimes' features are compared first."""
    with torch.inference_mode():
        outputs = {name: _forward(name, model, x) for name, model in runtimes.items()}  # warm-up too
    reference = outputs["franca"]
    for name, value in outputs.items():
        gap = float((value - reference).abs().max())
        if name != "franca_bf16" and gap > 1e-4:
            raise SystemExit(f"{name} differs from franca's features by {gap:.2e}")
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(repeats):
        for name, model in runtimes.items():
            times[name].append(_seconds(name, model, x))
    speed = {name: x.shape[0] / median(values) for name, values in times.items()}
    if "franca_bf16" in outputs:
        speed["bf16_error"] = float((outputs["franca_bf16"] - reference).norm() / reference.norm())
    return speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["vit_small", "vit_base"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 518])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--no-bf16", dest="bf16", action="store_false", help="skip franca under CPU bf16 autocast"
    )
    parser.add_argument("--out", default="benchmarks/out/export.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            runtimes = _runtimes(arch, Path(tmp), args.threads, args.bf16)
            for size in args.sizes:
                for batch in args.batches:
                    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
                    speed = _measure(runtimes, x, args.repeats)
                    best = max(("franca", "onnxruntime"), key=speed.__getitem__)
                    row = {"arch": arch, "size": size, "batch": batch, **speed, "best": best}
                    row["ratio"] = speed[best] / speed["timm"]
                    if "franca_bf16" in speed:
                        row["bf16_ratio"] = speed["franca_bf16"] / speed["timm"]
                    rows.append(row)
                    print_table(rows[-1:], _COLUMNS)
    print()
    print_table(rows, _COLUMNS)
    write_json(args.out, {"machine": machine_info(), "threads": args.threads, "rows": rows})


_COLUMNS = [
    ("arch", "arch", ""),
    ("size", "size", "d"),
    ("batch", "batch", "d"),
    ("franca", "franca eager img/s", ".2f"),
    ("onnxruntime", "onnxruntime img/s", ".2f"),
    ("timm", "timm eager img/s", ".2f"),
    ("best", "fastest exact", ""),
    ("ratio", "exact vs timm", ".2f"),
    ("franca_bf16", "franca bf16 img/s", ".2f"),
    ("bf16_ratio", "bf16 vs timm", ".2f"),
    ("bf16_error", "bf16 rel. error", ".1e"),
]


if __name__ == "__main__":
    main()
