"""Sinkhorn-Knopp targets at the paper's iBOT size: franca's implementation against a plain log-domain one.

    python benchmarks/bench_sinkhorn.py [--rows 6144] [--prototypes 131072] [--iterations 3] [--device cuda]

The teacher's iBOT head gives one logit per masked patch and prototype (ViT-S at batch 64 masks ~6,000 patches; the
largest Matryoshka level has 131,072 prototypes), so the targets cost passes over a matrix of several GB. The
reference is the straightforward log-domain algorithm written with ``torch.logsumexp`` (every step a full
log-sum-exp over the matrix); franca's ``sinkhorn_knopp`` runs one iteration in the log domain and the rest as
matrix-vector products (see its module docstring). The table gives the median milliseconds of each, the fp32 matrix
size and that size over the time; the first line, the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import math

import torch
from common import checked_device, median, print_table, timed

from franca.ssl import sinkhorn_knopp


def logsumexp_sinkhorn(logits: torch.Tensor, temperature: float, n_iterations: int) -> torch.Tensor:
    """The log-domain algorithm with torch.logsumexp: prototype step, sample step, ``n_iterations`` times."""
    log_q = logits.float() / temperature
    n, k = log_q.shape
    for _ in range(n_iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n)
    return torch.exp(log_q + math.log(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6144, help="masked patches N (default %(default)s)")
    parser.add_argument("--prototypes", type=int, default=131072, help="prototypes K (default %(default)s)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = checked_device(args.device)
    generator = torch.Generator(device).manual_seed(0)
    # bf16 logits of unit-norm vectors (cosine similarities), as the teacher head gives under autocast
    logits = (torch.rand(args.rows, args.prototypes, device=device, generator=generator) * 2 - 1).bfloat16()
    functions = {
        "franca sinkhorn_knopp": lambda: sinkhorn_knopp(logits, args.temperature, args.iterations),
        "torch.logsumexp reference": lambda: logsumexp_sinkhorn(logits, args.temperature, args.iterations),
    }
    results = {name: fn() for name, fn in functions.items()}  # warm-up, and the outputs to compare
    difference = float((results["franca sinkhorn_knopp"] - results["torch.logsumexp reference"]).abs().max())
    del results
    gigabytes = args.rows * args.prototypes * 4 / 1e9
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        for name, fn in functions.items():
            times[name].append(timed(fn, device))
    rows = [
        {"name": name, "ms": 1000 * median(values), "gb": gigabytes, "gb_per_s": gigabytes / median(values)}
        for name, values in times.items()
    ]
    print(
        f"{args.rows} x {args.prototypes}, {args.iterations} iterations, {device}; max |difference| {difference:.2e}"
    )
    print_table(
        rows,
        [("name", "implementation", ""), ("ms", "ms (median)", ".2f"), ("gb", "matrix GB (fp32)", ".2f"),
         ("gb_per_s", "matrix GB per second", ".1f")],
    )  # fmt: skip


if __name__ == "__main__":
    main()
