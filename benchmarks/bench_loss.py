"""The iBOT loss of one Matryoshka level, forward and backward: franca's against the plain form.

    python benchmarks/bench_loss.py [--rows 6144] [--prototypes 131072] [--device cuda] [--repeats 5] [--compile]

The student's iBOT head gives one bf16 logit per masked patch and prototype (ViT-S at batch 64 masks ~6,000 patches;
the widest level has 131,072 prototypes). The plain form (fp32 copy, division, ``log_softmax``, product with the
teacher's targets, sum; what franca ran before) keeps fp32 log-probabilities of that size for the backward pass;
franca's ``IBotPatchLoss`` goes through ``franca.ssl.cross_entropy.soft_cross_entropy``, which keeps the bf16 logits
and works on chunks of rows (``--compile`` adds it with its kernels through ``torch.compile``, as
``train.compile=true`` runs it). The table gives, per implementation, the median
milliseconds of a forward + backward and the peak memory above the inputs (CUDA: allocated; CPU: resident, which
also counts the allocator's caches); the first line, the largest differences of the loss and of the gradient.
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.nn.functional as F
from common import (
    checked_device,
    median,
    peak_memory_mib,
    print_table,
    reset_peak_memory,
    resident_mib,
    timed,
)

from franca.ssl import IBotPatchLoss

TEMPERATURE = 0.1


def plain_ibot_loss(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The plain form of one level's iBOT loss (n_global_crops = 1)."""
    log_probs = F.log_softmax(student.float() / TEMPERATURE, dim=-1)
    return ((-(teacher.float() * log_probs).sum(dim=-1)) * weights).sum()


def _step(loss_fn, student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor):
    student.grad = None
    loss = loss_fn(student, teacher, weights)
    loss.backward()
    return loss.detach(), student.grad


def _baseline_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return resident_mib() or 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6144, help="masked patches M (default %(default)s)")
    parser.add_argument("--prototypes", type=int, default=131072, help="prototypes K (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also franca's loss with compiled kernels")
    args = parser.parse_args()

    device = checked_device(args.device)
    generator = torch.Generator(device).manual_seed(0)
    shape = (args.rows, args.prototypes)
    student = (torch.randn(shape, device=device, generator=generator) * 3).bfloat16().requires_grad_(True)
    teacher = torch.softmax(torch.randn(shape, device=device, generator=generator) * 5, dim=-1)
    weights = torch.full((args.rows,), 1.0 / args.rows, device=device)
    franca_loss = IBotPatchLoss(student_temperature=TEMPERATURE)
    functions = {
        "franca (soft_cross_entropy)": lambda s, t, w: franca_loss.level_loss(s, t, w, 1),
        "plain (log_softmax, product)": plain_ibot_loss,
    }
    if args.compile:
        compiled_loss = IBotPatchLoss(student_temperature=TEMPERATURE, compiled=True)
        functions["franca, compiled kernels"] = lambda s, t, w: compiled_loss.level_loss(s, t, w, 1)
        _step(functions["franca, compiled kernels"], student, teacher, weights)  # compile outside the timing
    loss_a, grad_a = _step(functions["franca (soft_cross_entropy)"], student, teacher, weights)
    grad_a = grad_a.clone()
    loss_b, grad_b = _step(functions["plain (log_softmax, product)"], student, teacher, weights)
    loss_difference = float((loss_a - loss_b).abs())
    grad_difference = float((grad_a.float() - grad_b.float()).abs().max())
    del grad_a, grad_b
    times: dict[str, list[float]] = {name: [] for name in functions}
    peaks: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        for name, fn in functions.items():
            student.grad = None
            gc.collect()
            before = _baseline_mib(device)
            reset_peak_memory(device)
            times[name].append(timed(lambda fn=fn: _step(fn, student, teacher, weights), device))
            peaks[name].append(peak_memory_mib(device) - before)
    fp32_gib = args.rows * args.prototypes * 4 / 2**30
    print(
        f"{args.rows} x {args.prototypes} ({fp32_gib:.2f} GiB per fp32 copy), {device}; "
        f"|loss difference| {loss_difference:.2e}, max |gradient difference| {grad_difference:.2e}"
    )
    rows = [
        {"name": name, "ms": 1000 * median(times[name]), "peak": median(peaks[name]),
         "copies": median(peaks[name]) / 1024 / fp32_gib}
        for name in functions
    ]  # fmt: skip
    print_table(
        rows,
        [("name", "implementation", ""), ("ms", "ms fwd+bwd (median)", ".1f"),
         ("peak", "peak MiB above inputs", ".0f"), ("copies", "in fp32 copies", ".2f")],
    )  # fmt: skip


if __name__ == "__main__":
    main()
