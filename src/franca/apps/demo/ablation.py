"""The head-mode ablation of ``franca demo --ablation``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from franca.apps.demo.data import DemoData
from franca.apps.demo.evaluation import evaluate_backbone
from franca.apps.demo.progress import PhaseLog
from franca.apps.demo.protocols import sliced_curve
from franca.apps.demo.settings import ABLATION_MODES, MODE_DESCRIPTIONS, PRESET, DemoSettings, EvalSettings
from franca.apps.demo.training import TrainOutcome, obtain_run, training_overrides


def _abbreviated(results: dict[str, Any], k: int) -> dict[str, Any]:
    smallest = str(min(int(m) for m in results["sliced_knn"]["dims"]))
    return {
        "knn_top1": round(results["knn"]["top1"], 2),
        "sliced_smallest_top1": round(results["sliced_knn"]["sliced"][smallest][f"k{k}"]["top1"], 2),
        "sliced_curve": sliced_curve(results["sliced_knn"], "sliced", k),
        "hummingbird_miou": round(results["hummingbird"]["miou"], 2),
    }


def run_ablation(
    settings: DemoSettings,
    main_outcome: TrainOutcome,
    main_trained: dict[str, Any],
    random_results: dict[str, Any],
    data: DemoData,
    device: torch.device,
    log: PhaseLog,
) -> dict[str, Any]:
    """Train the other head modes with the main run's budget and evaluate them (k-NN, sliced k-NN, HummingBird)."""
    from franca.models.checkpoints import load_backbone
    from franca.train.config import load_config

    k = settings.eval.knn_k
    modes: dict[str, Any] = {"slice": {**_abbreviated(main_trained, k), "training": main_outcome.summary()}}
    for mode in ABLATION_MODES:
        if mode == "slice":
            continue
        run_dir = Path(settings.output_dir) / "ablation" / mode
        log.phase(f"ablation {mode}", f"ablation[{mode}]: training ({MODE_DESCRIPTIONS[mode]})")
        config = load_config(PRESET, training_overrides(settings, data.train_dir, run_dir, device.type, mode))
        outcome = obtain_run(settings, config, run_dir, log, mode)
        model = load_backbone(run_dir / "teacher_backbone.safetensors")
        results, _, _ = evaluate_backbone(mode, model, data, settings, device, log, full=False)
        modes[mode] = {
            **_abbreviated(results, k),
            "training": outcome.summary(),
            "seconds": results["seconds"],
        }
        del model
    dims = min(int(m) for m in main_trained["sliced_knn"]["dims"])
    ablation = {
        "modes": modes,
        "random_init": _abbreviated(random_results, k),
        "smallest_dims": dims,
        "seed": settings.seed,
        "budget": {
            "iterations": main_outcome.iterations,
            "batch_size": main_outcome.config.train.batch_size_per_device,
            "time_budget_min": settings.time_budget_min,
        },
    }
    ablation["verdict"] = ablation_verdict(modes)
    return ablation


def ablation_verdict(modes: dict[str, Any]) -> str:
    """Plain sentences answering the two questions of the ablation from the measured numbers."""
    parts = []
    if "slice" in modes and "tied" in modes:
        s, t = modes["slice"], modes["tied"]
        better = s["sliced_smallest_top1"] - t["sliced_smallest_top1"]
        parts.append(
            "Dedicated head per nesting level (slice) vs one tied head: k-NN top-1 "
            f"{s['knn_top1']:.1f} vs {t['knn_top1']:.1f}, at the smallest level {s['sliced_smallest_top1']:.1f} vs "
            f"{t['sliced_smallest_top1']:.1f} ({better:+.1f}), HummingBird {s['hummingbird_miou']:.1f} vs "
            f"{t['hummingbird_miou']:.1f}."
        )
    if "slice" in modes and "dinov2" in modes:
        s, d = modes["slice"], modes["dinov2"]
        parts.append(
            "Franca (slice) vs the DINOv2 single-head baseline: k-NN top-1 "
            f"{s['knn_top1']:.1f} vs {d['knn_top1']:.1f} ({s['knn_top1'] - d['knn_top1']:+.1f}), at the smallest "
            f"level {s['sliced_smallest_top1']:.1f} vs {d['sliced_smallest_top1']:.1f}, HummingBird "
            f"{s['hummingbird_miou']:.1f} vs {d['hummingbird_miou']:.1f} "
            f"({s['hummingbird_miou'] - d['hummingbird_miou']:+.1f})."
        )
    return " ".join(parts)


def _ablation_section(ablation: dict[str, Any], figures: dict[str, Path], evaluation: EvalSettings):
    from franca.report import ReportImage, ReportSection

    table = []
    for mode, entry in ablation["modes"].items():
        table.append(
            {
                "heads.mode": mode,
                "what": MODE_DESCRIPTIONS[mode],
                "iterations": f"{entry['training']['iteration']}/{entry['training']['iterations']}",
                "k-NN top-1": entry["knn_top1"],
                f"sliced k-NN top-1 at {ablation['smallest_dims']} dims": entry["sliced_smallest_top1"],
                "HummingBird mIoU": entry["hummingbird_miou"],
            }
        )
    table.append(
        {
            "heads.mode": "(random init)",
            "what": "the same backbone before training",
            "iterations": "0",
            "k-NN top-1": ablation["random_init"]["knn_top1"],
            f"sliced k-NN top-1 at {ablation['smallest_dims']} dims": ablation["random_init"][
                "sliced_smallest_top1"
            ],
            "HummingBird mIoU": ablation["random_init"]["hummingbird_miou"],
        }
    )
    return ReportSection(
        "Ablation: Matryoshka head modes and the DINOv2 baseline",
        text=(
            "Each mode is trained with the same preset, iterations, batch and time budget, and evaluated with the "
            f"same protocols as above. One run per mode (seed {ablation['seed']}): the seed-to-seed spread was not "
            "measured, so small differences may be noise.\n\n" + ablation["verdict"]
        ),
        table=table,
        images=[ReportImage(figures["ablation_sliced"], "Ablation: sliced k-NN per head mode")],
    )
