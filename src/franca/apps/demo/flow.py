"""The demo's flow: data, training, evaluation, report, in order, as one short function per phase.

The phases pass small dataclasses to each other (:class:`~franca.apps.demo.evaluation.BackboneEvaluation`,
:class:`~franca.apps.demo.evaluation.RasaEvaluation`, :class:`~franca.apps.demo.evaluation.PcaPanels`, gathered in
:class:`~franca.apps.demo.evaluation.DemoResults`); ``metrics.json`` is their ``to_dict()``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from franca.apps.demo.ablation import run_ablation
from franca.apps.demo.ablation_report import ablation_text_table
from franca.apps.demo.data import DataSummary, DemoData, load_demo_data, prepare_data
from franca.apps.demo.evaluation import (
    BackboneEvaluation,
    DemoResults,
    PcaPanels,
    RasaEvaluation,
    evaluate_rasa,
    score_backbone,
)
from franca.apps.demo.progress import PhaseLog, format_duration
from franca.apps.demo.report import make_figures, plateau_note, unfinished_text, write_report
from franca.apps.demo.settings import PRESET, DemoSettings, resolve_device
from franca.apps.demo.training import (
    TrainOutcome,
    _round_to,
    obtain_run,
    random_init_backbone,
    training_overrides,
)
from franca.eval.output import format_table
from franca.models.checkpoints import load_backbone
from franca.report import write_metrics_json
from franca.train.config import load_config


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Run the whole demo (data, training, evaluation, report); returns the metrics written to metrics.json."""
    log = PhaseLog()
    settings, device = _start(settings, log)
    info = _data_phase(settings, log)
    outcome = _train_phase(settings, info, device, log)
    loaded = _load_phase(settings, info, outcome, log)
    trained, rasa, pca = _evaluate_trained(settings, loaded, device, log)
    random, pca = _evaluate_random(settings, loaded, pca, device, log)
    ablation = None
    if settings.ablation:
        ablation = run_ablation(settings, outcome, trained, random, loaded.data, device, log)
    results = DemoResults(settings, device, loaded.summary, outcome, trained, random, rasa, ablation)
    return _report_phase(results, pca, loaded.data, log)


def _start(settings: DemoSettings, log: PhaseLog) -> tuple[DemoSettings, torch.device]:
    """The output folder and the device (on CUDA: no subsets, the GPU searches the whole memory bank in seconds)."""
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    if device.type == "cuda":
        settings = replace(
            settings, eval=replace(settings.eval, hummingbird_memory_patches=None, train_images=None)
        )
    log(f"franca demo: output in {out}, device {device}" + (" (quick mode)" if settings.quick else ""))
    return settings, device


def _data_phase(settings: DemoSettings, log: PhaseLog) -> Any:
    """Phase 1: the synthetic data set, reused or generated; its SynthInfo."""
    log.phase("data", "phase 1/5: synthetic data set")
    return prepare_data(settings, log)


def _train_phase(settings: DemoSettings, info: Any, device: torch.device, log: PhaseLog) -> TrainOutcome:
    """Phase 2: train (or resume) the main run in ``<output-dir>/train``, or take it as it is with --eval-only."""
    run_dir = Path(settings.output_dir) / "train"
    config = load_config(PRESET, training_overrides(settings, info.train_dir, run_dir, device.type))
    log.phase(
        "train",
        f"phase 2/5: pre-training ({config.train.iterations} iterations of batch "
        f"{config.train.batch_size_per_device}, time budget {format_duration(settings.time_budget_min * 60)})",
    )
    outcome = obtain_run(settings, config, run_dir, log)  # its config: with --eval-only, the run's own
    plateau_text = plateau_note(outcome.summary())  # said again with the summary at the end
    if plateau_text:
        log(f"train: {plateau_text}")
    return outcome


@dataclass
class _Loaded:
    """Phase 3's output: both splits in memory, their facts, and the two backbones to evaluate."""

    data: DemoData
    summary: DataSummary
    trained_model: nn.Module
    random_model: nn.Module


def _load_phase(settings: DemoSettings, info: Any, outcome: TrainOutcome, log: PhaseLog) -> _Loaded:
    """Phase 3: both splits into memory at a multiple of the patch size; the trained and random-init backbones."""
    log.phase("load", "phase 3/5: loading the train and val images and masks into memory")
    patch = outcome.config.model.patch_size
    eval_size = _round_to(info.size, patch, patch)
    data = load_demo_data(settings, info, eval_size, patch)
    trained_model = load_backbone(outcome.run_dir / "teacher_backbone.safetensors")
    random_model = random_init_backbone(outcome.config)
    return _Loaded(data, DataSummary.of(info, data, settings.style, eval_size), trained_model, random_model)


def _evaluate_trained(
    settings: DemoSettings, loaded: _Loaded, device: torch.device, log: PhaseLog
) -> tuple[BackboneEvaluation, RasaEvaluation, PcaPanels]:
    """Phase 4a: every protocol on the trained backbone, RASA on its patch features, its PCA maps."""
    log.phase("evaluate trained", "phase 4/5: evaluating the trained backbone")
    data = loaded.data
    trained, train, val = score_backbone("trained", loaded.trained_model, data, settings, device, log)
    log(f"evaluate[trained]: RASA ({settings.eval.rasa_iterations} iterations)")
    rasa = evaluate_rasa(train.patch, val.patch, data, settings, device)
    log(
        f"evaluate[trained]: RASA position R^2 {rasa.position_r2_before:.3f} -> {rasa.position_r2_after:.3f}, "
        f"HummingBird mIoU {trained.hummingbird_miou:.1f} -> {rasa.hummingbird['miou']:.1f} with RASA"
    )
    panels = PcaPanels.spread(len(data.val.labels), settings.eval.pca_images, loaded.summary.eval_size)
    return trained, rasa, panels.with_trained(val.patch, rasa.result.matrix)


def _evaluate_random(
    settings: DemoSettings, loaded: _Loaded, pca: PcaPanels, device: torch.device, log: PhaseLog
) -> tuple[BackboneEvaluation, PcaPanels]:
    """Phase 4b: every protocol on the same architecture at its random initialisation, and its PCA maps."""
    log.phase("evaluate random init", "phase 4/5: evaluating the same backbone at random initialisation")
    random, _, val = score_backbone("random init", loaded.random_model, loaded.data, settings, device, log)
    return random, pca.with_random(val.patch)


def _report_phase(results: DemoResults, pca: PcaPanels, data: DemoData, log: PhaseLog) -> dict[str, Any]:
    """Phase 5: the figures, ``report.html`` and ``metrics.json``; returns the metrics with the report's path and
    the closing notes."""
    log.phase("report", "phase 5/5: writing the report")
    figures = make_figures(results, pca.rows(data.val))
    log.end_phase()
    results.timings = {**log.timings, "total": log.elapsed()}
    metrics = results.to_dict()
    metrics["report"] = str(write_report(results, figures))
    write_metrics_json(Path(results.settings.output_dir) / "metrics.json", metrics)
    metrics["notes"] = _notes(results.outcome)
    return metrics


def _notes(outcome: TrainOutcome) -> list[str]:
    """What the closing summary points out: an unfinished run, a DINO loss still at its uniform value."""
    training = outcome.summary()
    notes = []
    if not outcome.completed:
        notes.append(f"{unfinished_text(training)}; re-run without --eval-only to continue training")
    plateau_text = plateau_note(training)
    if plateau_text:
        notes.append(plateau_text)
    return notes


def summary_text(metrics: dict[str, Any]) -> str:
    """The demo's closing summary for a terminal: the trained-vs-random table, RASA's effect, the ablation table,
    the notes and where the report went (``metrics`` as :func:`run_demo` returns it)."""
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
