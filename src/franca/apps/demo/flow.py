"""The demo's flow: data, training, evaluation, report, in order."""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from franca.apps.demo.ablation import run_ablation
from franca.apps.demo.ablation_report import ablation_text_table
from franca.apps.demo.data import DemoData, load_split, prepare_data
from franca.apps.demo.evaluation import evaluate_backbone, summary_rows
from franca.apps.demo.progress import PhaseLog, format_duration
from franca.apps.demo.protocols import colour_mask, pca_map_images, run_hummingbird, run_rasa
from franca.apps.demo.report import _figures, plateau_note, unfinished_text, write_report
from franca.apps.demo.settings import (
    NUM_SHAPE_CLASSES,
    PRESET,
    TARGET_HUMMINGBIRD_POINTS,
    TARGET_KNN_POINTS,
    DemoSettings,
    resolve_device,
)
from franca.apps.demo.training import _round_to, obtain_run, random_init_backbone, training_overrides
from franca.eval.hummingbird import label_bank


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Run the whole demo (data, training, evaluation, report); returns the metrics written to metrics.json."""
    from franca.models.checkpoints import load_backbone
    from franca.report import write_metrics_json
    from franca.train.config import config_to_dict, load_config

    log = PhaseLog(enabled=True)
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    if device.type == "cuda":  # the GPU searches the whole memory bank in seconds
        settings = replace(
            settings, eval=replace(settings.eval, hummingbird_memory_patches=None, train_images=None)
        )
    log(f"franca demo: output in {out}, device {device}" + (" (quick mode)" if settings.quick else ""))

    # 1. data
    log.phase("data", "phase 1/5: synthetic data set")
    info = prepare_data(settings, log)

    # 2. training
    run_dir = out / "train"
    config = load_config(PRESET, training_overrides(settings, info.train_dir, run_dir, device.type))
    log.phase(
        "train",
        f"phase 2/5: pre-training ({config.train.iterations} iterations of batch "
        f"{config.train.batch_size_per_device}, time budget {format_duration(settings.time_budget_min * 60)})",
    )
    outcome = obtain_run(settings, config, run_dir, log)
    config = outcome.config  # with --eval-only: the run's own settings (for its random init)
    plateau_text = plateau_note(outcome.summary())  # printed again with the summary at the end
    if plateau_text:
        log(f"train: {plateau_text}")

    # 3. data in memory, models
    log.phase("load", "phase 3/5: loading the train and val images and masks into memory")
    workers = (
        0
        if settings.num_images + settings.val_images < 2000
        else min(2, settings.workers or os.cpu_count() or 1)
    )
    eval_size = _round_to(info.size, config.model.patch_size, config.model.patch_size)
    train_split = load_split(
        info.root, "train", eval_size, workers, settings.progress, settings.eval.train_images, settings.seed
    )
    val_split = load_split(info.root, "val", eval_size, workers, settings.progress)
    seg_classes = NUM_SHAPE_CLASSES + 1
    bank = label_bank(
        train_split.masks,
        config.model.patch_size,
        seg_classes,
        settings.eval.hummingbird_memory_patches,
        settings.seed,
    )
    data = DemoData(train_split, val_split, bank, seg_classes, config.model.patch_size, info.train_dir)
    trained_model = load_backbone(run_dir / "teacher_backbone.safetensors")
    random_model = random_init_backbone(config)

    # 4. evaluation
    log.phase("evaluate trained", "phase 4/5: evaluating the trained backbone")
    trained, trained_train, trained_val = evaluate_backbone(
        "trained", trained_model, data, settings, device, log
    )
    log(f"evaluate[trained]: RASA ({settings.eval.rasa_iterations} iterations)")
    rasa_result = run_rasa(
        trained_train.patch, trained_val.patch, settings.eval, device, settings.seed, settings.progress
    )
    rasa = rasa_result.to_dict()
    rasa["position_r2_before"] = rasa_result.baseline["linear_r2"]
    rasa["position_r2_after"] = rasa_result.metrics[-1]["linear_r2"]
    rasa["predictor_r2_first"] = rasa_result.metrics[0]["predictor_r2"]
    rasa["predictor_r2_last"] = rasa_result.metrics[-1]["predictor_r2"]
    hummingbird_rasa = run_hummingbird(
        trained_train.patch, trained_val.patch, data, settings.eval, device, projection=rasa_result.matrix
    )
    log(
        f"evaluate[trained]: RASA position R^2 {rasa['position_r2_before']:.3f} -> {rasa['position_r2_after']:.3f}, "
        f"HummingBird mIoU {trained['hummingbird']['miou']:.1f} -> {hummingbird_rasa['miou']:.1f} with RASA"
    )
    # val images spread over the split (it is sorted by class), so that the maps show several shape classes
    count = min(settings.eval.pca_images, len(val_split.labels))
    shown = torch.tensor([round(j * len(val_split.labels) / count) for j in range(count)])
    pca_trained = pca_map_images(trained_val.patch[shown], eval_size)
    pca_rasa = pca_map_images(trained_val.patch[shown] @ rasa_result.matrix.T, eval_size)
    del trained_train, trained_val

    log.phase("evaluate random init", "phase 4/5: evaluating the same backbone at random initialisation")
    random, _, random_val = evaluate_backbone("random init", random_model, data, settings, device, log)
    pca_random = pca_map_images(random_val.patch[shown], eval_size)
    del random_val

    ablation = None
    if settings.ablation:
        ablation = run_ablation(settings, outcome, trained, random, data, device, log)

    # 5. report
    log.phase("report", "phase 5/5: writing the report")
    rows = summary_rows(trained, random, settings.eval)
    knn_points = trained["knn"]["top1"] - random["knn"]["top1"]
    hb_points = trained["hummingbird"]["miou"] - random["hummingbird"]["miou"]
    pca_rows = [
        [
            val_split.images[index].permute(1, 2, 0).numpy(),
            colour_mask(val_split.masks[index]),
            pca_trained[i],
            pca_rasa[i],
            pca_random[i],
        ]
        for i, index in enumerate(shown.tolist())
    ]
    figures = _figures(
        out,
        outcome,
        trained,
        random,
        rasa_result.curve(),
        pca_rows,
        ["image", "mask", "trained", "trained + RASA", "random init"],
        settings.eval,
    )
    log.end_phase()
    metrics: dict[str, Any] = {
        "settings": {
            **{key: value for key, value in asdict(settings).items() if key != "eval"},
            "evaluation": asdict(settings.eval),
            "device": str(device),
            "data_dir": str(settings.data_path),
        },
        "data": {
            "root": str(info.root),
            "num_train": info.num_train,
            "num_val": len(val_split.labels),
            "eval_train_images": len(train_split.labels),
            "size": info.size,
            "style": settings.style,
            "eval_size": eval_size,
            "skipped_train": train_split.num_skipped,
            "skipped_val": val_split.num_skipped,
        },
        "training": {
            **outcome.summary(),
            "levels": config.heads.level_widths(trained["sliced_knn"]["feature_dim"]),
            "config": config_to_dict(config),
        },
        "trained": trained,
        "random_init": random,
        "rasa": rasa,
        "hummingbird_rasa": hummingbird_rasa,
        "summary": rows,
        "targets": {
            "knn_points": knn_points,
            "knn_target": TARGET_KNN_POINTS,
            "knn_met": knn_points >= TARGET_KNN_POINTS,
            "hummingbird_points": hb_points,
            "hummingbird_target": TARGET_HUMMINGBIRD_POINTS,
            "hummingbird_met": hb_points >= TARGET_HUMMINGBIRD_POINTS,
        },
        "timings": dict(log.timings),
    }
    if ablation is not None:
        metrics["ablation"] = ablation
    total = log.elapsed()
    metrics["timings"]["total"] = total
    report = write_report(settings, metrics, outcome, figures, rows, total)
    metrics["report"] = str(report)
    write_metrics_json(out / "metrics.json", metrics)

    notes = []
    if not outcome.completed:
        notes.append(f"{unfinished_text(outcome.summary())}; re-run without --eval-only to continue training")
    if plateau_text:
        notes.append(plateau_text)
    metrics["notes"] = notes
    return metrics


def summary_text(metrics: dict[str, Any]) -> str:
    """The demo's closing summary for a terminal: the trained-vs-random table, RASA's effect, the ablation table,
    the notes and where the report went (``metrics`` as :func:`run_demo` returns it)."""
    from franca.eval.output import format_table

    table = [
        {
            "metric": row["metric"],
            "trained": row["trained"],
            "random init": row["random_init"],
            "delta": row["trained"] - row["random_init"],
        }
        for row in metrics["summary"]
    ]
    rasa, trained = metrics["rasa"], metrics["trained"]
    lines = [
        "",
        format_table(table, ["metric", "trained", "random init", "delta"], precision=1),
        f"RASA: position R^2 {rasa['position_r2_before']:.3f} -> {rasa['position_r2_after']:.3f}; "
        f"HummingBird mIoU {trained['hummingbird']['miou']:.1f} -> {metrics['hummingbird_rasa']['miou']:.1f} with RASA",
    ]
    ablation = metrics.get("ablation")
    if ablation is not None:
        lines += ["", format_table(ablation_text_table(ablation), None, precision=1)]
        lines += ablation["verdict"] + [f"ablation report: {ablation['report']}"]
    lines += [f"note: {note}" for note in metrics.get("notes", [])]
    metrics_path = Path(metrics["report"]).parent / "metrics.json"
    total = metrics["timings"]["total"]
    lines.append(
        f"\nreport: {metrics['report']}\nmetrics: {metrics_path}\ntotal time: {format_duration(total)}"
    )
    return "\n".join(lines)
