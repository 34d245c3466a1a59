"""Head cost per Matryoshka head mode: parameters, FLOPs, activation and optimizer memory, and the tiny step time.

    python benchmarks/bench_heads.py [--rounds 6] [--steps 3] [--warmup 2] [--batch 16] [--threads N] [--json OUT]

For ViT-S/B/L/g with the paper's heads and crops (vitb14_in21k with model.arch=vit_small / vit_base, vitl14_laion,
vitg14_laion: 131072 prototypes for the largest of five levels, 2048 hidden, 384 bottleneck, 224/98-px crops x8) and
for the demo's tiny_cpu config (32/16-px crops x4, 4096 prototypes), each of ``heads.mode`` slice, project, tied and
dinov2: the numbers of :func:`franca.train.head_cost.head_cost`, computed on the meta device (no weights are
allocated), per image of one training step (DINO + iBOT head; student forward + backward, teacher forward):

- head parameters (M) and backbone parameters (M);
- head GFLOP per image and the heads' share of the step's FLOPs (heads + backbone, student and teacher);
- activation MiB per image: what autograd saves for the backward in the student heads (fp32) plus the teacher's
  logits; "fixed" is the per-step part (the weight-normalised prototype matrices the prototype layers save);
- optimizer MiB: AdamW's two fp32 moments and the gradient of every trainable head parameter and the EMA teacher's
  copy of the heads.

The tiny rows also time the real training step per mode on this machine (bench_train_step's StepRunner on its
synthetic batches, fp32, ``--batch`` images): the modes run round-robin (``--rounds`` rounds of ``--steps`` steps
each, the order rotated every round) after ``--warmup`` steps each, and the table gives each mode's median step time
and its ratio to slice's. Writes JSON to benchmarks/out/heads.json. About 1 minute on 2 quiet CPU cores; when
another process holds a core, ``--threads 1`` keeps torch's OpenMP threads from waiting on it
(which otherwise makes the steps swing by several times).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from bench_train_step import StepRunner, synthetic_batches
from common import machine_info, median, print_table, timed, write_json

from franca.train.config import TrainConfig, load_config
from franca.train.head_cost import PAPER_MODELS, head_cost

MODES = ("slice", "project", "tied", "dinov2")
# label -> (config preset, overrides); data.path is required by the presets but never read here
MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    **PAPER_MODELS,
    # the demo's overrides of the preset (franca.apps.demo.training.training_overrides at its default 32 px)
    "tiny": ("tiny_cpu", ("model.img_size=32", "crops.global_size=32", "crops.local_size=16")),
}
MIB = 2**20


def model_config(label: str, mode: str) -> TrainConfig:
    """The TrainConfig of one table row."""
    preset, overrides = MODELS[label]
    return load_config(preset, [*overrides, "data.path=unused", f"heads.mode={mode}"])


def cost_row(label: str, mode: str) -> dict[str, Any]:
    """One row: the head cost of ``label`` in ``mode``, in the table's units, plus every raw number."""
    cost = head_cost(model_config(label, mode))
    return {
        "model": label,
        "mode": mode,
        "backbone_m": cost.backbone_params / 1e6,
        "head_m": cost.params / 1e6,
        "head_gflop": cost.flops / 1e9,
        "share_percent": 100 * cost.flops_share,
        "activation_mib": (cost.activation_bytes + cost.teacher_logit_bytes) / MIB,
        "fixed_mib": cost.activation_fixed_bytes / MIB,
        "optimizer_mib": cost.optimizer_bytes / MIB,
        "cost": cost.to_dict(),
    }


def time_tiny_modes(args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds of every timed training step of the tiny config per mode, the modes interleaved round-robin."""
    device = torch.device("cpu")
    runners, batches = {}, {}
    for mode in MODES:
        config = model_config("tiny", mode)
        runners[mode] = StepRunner(config, device, None)
        batches[mode] = synthetic_batches(config, args.batch, device, count=4)  # the same seed: same crops
        for index in range(args.warmup):
            runners[mode].step(batches[mode][index % 4])
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_index in range(args.rounds):
        order = MODES[round_index % len(MODES) :] + MODES[: round_index % len(MODES)]
        for mode in order:
            for step in range(args.steps):
                batch = batches[mode][(round_index * args.steps + step) % 4]
                times[mode].append(timed(lambda mode=mode, batch=batch: runners[mode].step(batch), device))
        print(
            f"round {round_index + 1}/{args.rounds}: "
            + ", ".join(f"{m} {median(times[m]):.3f} s" for m in MODES)
        )
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=6, help="round-robin rounds over the modes (tiny timing)"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    parser.add_argument(
        "--batch", type=int, default=16, help="images per tiny step (the tiny_cpu preset's 16)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default="benchmarks/out/heads.json")
    args = parser.parse_args()
    if min(args.rounds, args.steps, args.batch) < 1 or args.warmup < 0:
        raise SystemExit("--rounds, --steps and --batch must be at least 1, --warmup at least 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"cpu, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = [cost_row(label, mode) for label in MODELS for mode in MODES]
    times = time_tiny_modes(args)
    slice_s = median(times["slice"])
    for row in rows:
        if row["model"] == "tiny":
            step_s = median(times[row["mode"]])
            row.update(
                {"step_ms": 1000 * step_s, "vs_slice": step_s / slice_s, "step_s_all": times[row["mode"]]}
            )
    columns = [
        ("model", "model", ""),
        ("mode", "mode", ""),
        ("backbone_m", "backbone M", ".1f"),
        ("head_m", "head M", ".2f"),
        ("head_gflop", "head GFLOP/img", ".3f"),
        ("share_percent", "head % of step", ".1f"),
        ("activation_mib", "act MiB/img", ".2f"),
        ("fixed_mib", "fixed MiB/step", ".1f"),
        ("optimizer_mib", "optim+EMA+grad MiB", ".1f"),
        ("step_ms", "tiny step ms", ".0f"),
        ("vs_slice", "x slice", ".2f"),
    ]
    print_table(rows, columns)
    settings = {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
                "threads": torch.get_num_threads()}  # fmt: skip
    write_json(args.json, {"machine": machine_info(), "settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
