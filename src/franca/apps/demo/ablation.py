"""The head-mode ablation of ``franca demo --ablation``: every ``heads.mode`` over several seeds and two budgets.

The question (issue 19, docs/heads.md): Franca gives each nested prefix of the embedding its own projection head
(``slice``); would one shared head (``tied``), the v1.0 code's projections (``project``) or no nesting at all
(``dinov2``) do as well? One run per mode cannot say: seeds move the demo's metrics by about as much as the modes
differ. So every mode is trained with the demo's recipe for ``--seeds`` training seeds and scored with the demo's
protocols on the same evaluation data (the evaluation subsets keep the demo's ``--seed``); the modes are compared
seed by seed (paired differences with a t interval, :func:`franca.eval.metrics.paired_difference`).

Two budgets:

- ``iterations``: every mode trains the recipe's iterations (the demo's own run is the ``slice`` run of its seed).
- ``time``: every mode trains for the wall time ``slice`` needs. The step times of the modes are measured side by
  side first (:func:`calibrate_step_times`: real training steps of each mode, interleaved in rounds so that a busy
  machine slows them alike; medians), and each mode gets ``round(iterations * t_slice / t_mode)`` iterations, with
  its schedules scaled to them. The measurement is kept in ``ablation/step_times.json`` so that a re-run resumes
  the same runs.

Runs train to their last iteration (no time budget: a run cut short would not be comparable), each in its own
resumable directory; their scores are cached beside them (``ablation_scores.json``), so re-running the command
resumes and re-renders the report without training or evaluating anything twice. Layout::

    <output-dir>/train/                          the demo's run: slice, seed --seed, equal iterations
    <output-dir>/ablation/<mode>/seed<s>/         the other equal-iteration runs
    <output-dir>/ablation/<mode>/seed<s>-<n>it/   equal-time runs whose iteration count n differs
    <output-dir>/ablation/step_times.json        the step-time measurement behind the equal-time budget
    <output-dir>/ablation/report.html, ablation.json
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from franca.apps.demo.ablation_report import write_ablation_report
from franca.apps.demo.data import DemoData
from franca.apps.demo.evaluation import BackboneEvaluation, score_backbone
from franca.apps.demo.progress import PhaseLog, format_duration
from franca.apps.demo.protocols import run_linear, sliced_curve
from franca.apps.demo.settings import (
    ABLATION_METRICS,
    ABLATION_MODES,
    MODE_DESCRIPTIONS,
    PRESET,
    REFERENCES,
    DemoSettings,
)
from franca.apps.demo.training import TrainOutcome, existing_run, train_with_budget, training_overrides
from franca.eval.metrics import paired_difference, seed_spread
from franca.models.checkpoints import load_backbone
from franca.report import write_metrics_json
from franca.report.format import to_json_safe
from franca.train.callbacks import Callback
from franca.train.config import load_config
from franca.train.head_cost import PAPER_MODELS, HeadCost, head_cost, paper_head_cost
from franca.train.trainer import Trainer

CALIBRATION_ROUNDS = 4  # the first round warms up and is not counted
CALIBRATION_STEPS = 15  # training steps per mode and round
SCORES_FILE = "ablation_scores.json"


@dataclass(frozen=True)
class PlannedRun:
    """One training of the ablation: which mode, seed and budget, how many iterations, and where."""

    budget: str
    mode: str
    seed: int
    iterations: int
    run_dir: Path


@dataclass
class RunScores:
    """What one ablation run reached and scored (metrics in percent, see :data:`ABLATION_METRICS`)."""

    budget: str
    mode: str
    seed: int
    run_dir: Path
    iteration: int
    iterations: int
    images_per_s: float | None
    metrics: dict[str, float]
    sliced_curve: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (run_dir as a string)."""
        return {**asdict(self), "run_dir": str(self.run_dir)}


# ----------------------------------------------------------------------------------------- the equal-time budget
class _StepClock(Callback):
    """The wall time of every training step (between consecutive step ends; the first from the fit's start)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._last = 0.0

    def on_fit_start(self, trainer: Any) -> None:
        self._last = time.perf_counter()

    def on_step_end(self, trainer: Any, logs: dict[str, Any]) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self._last = now


def calibrate_step_times(
    configs: dict[str, Any], scratch: Path, rounds: int = CALIBRATION_ROUNDS, steps: int = CALIBRATION_STEPS
) -> dict[str, float]:
    """Median seconds per training step of each mode's config, measured side by side on the real pipeline.

    One :class:`~franca.train.trainer.Trainer` per mode (output in ``scratch/<mode>``, deleted afterwards) trains
    ``steps`` steps in turn, for ``rounds`` rounds, so that a machine that gets busier or quieter slows every mode
    alike; the first round (worker start-up, allocator warm-up) is not counted unless it is the only one.
    """
    clocks = {mode: _StepClock() for mode in configs}
    trainers = {
        mode: Trainer(config, scratch / mode, progress=False, callbacks=[clocks[mode]])
        for mode, config in configs.items()
    }
    try:
        counted: dict[str, list[float]] = {mode: [] for mode in configs}
        for round_index in range(rounds):
            for mode, trainer in trainers.items():
                clocks[mode].seconds.clear()
                trainer.fit(stop_at=(round_index + 1) * steps)
                if round_index or rounds == 1:
                    counted[mode].extend(clocks[mode].seconds)
    finally:
        del trainers
        shutil.rmtree(scratch, ignore_errors=True)
    return {mode: float(torch.tensor(seconds).median()) for mode, seconds in counted.items()}


def equal_time_iterations(iterations: int, step_seconds: dict[str, float]) -> dict[str, int]:
    """Iterations per mode that take the wall time of ``iterations`` steps of ``slice``: n * t_slice / t_mode."""
    reference = step_seconds["slice"]
    return {mode: max(1, round(iterations * reference / seconds)) for mode, seconds in step_seconds.items()}


def step_times(
    settings: DemoSettings, data_dir: Path, device: torch.device, iterations: int, log: PhaseLog
) -> dict[str, Any]:
    """The step-time measurement of ``ablation/step_times.json``, measured now if it is missing or of other runs."""
    path = Path(settings.output_dir) / "ablation" / "step_times.json"
    scratch = path.parent / "calibration"
    configs = {
        mode: load_config(PRESET, training_overrides(settings, data_dir, scratch / mode, device.type, mode))
        for mode in ABLATION_MODES
    }
    key = {
        "modes": list(ABLATION_MODES),
        "iterations": iterations,
        "batch_size": configs["slice"].train.batch_size_per_device,
        "device": device.type,
    }
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved
        log(f"ablation: {path} measured other runs ({saved.get('key')}); measuring again")
    if settings.eval_only:
        raise FileNotFoundError(f"--eval-only: {path} is missing; run the ablation without --eval-only first")
    rounds = min(CALIBRATION_ROUNDS, iterations)  # a calibration run cannot go past the runs' last iteration
    steps = max(1, min(CALIBRATION_STEPS, iterations // rounds))
    log(
        f"ablation: measuring the step time of each mode ({rounds} interleaved rounds of {steps} steps) for the "
        "equal-time budget"
    )
    seconds = calibrate_step_times(configs, scratch, rounds, steps)
    measured = {
        "key": key,
        "step_seconds": seconds,
        "ratio_to_slice": {mode: value / seconds["slice"] for mode, value in seconds.items()},
        "iterations": equal_time_iterations(iterations, seconds),
        "rounds": rounds,
        "steps_per_round": steps,
    }
    write_metrics_json(path, measured)
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------------ the plan
def ablation_seeds(settings: DemoSettings) -> list[int]:
    """The training seeds: ``--seed``, ``--seed + 1``, ... (``--seeds`` of them)."""
    return [settings.seed + offset for offset in range(settings.seeds)]


def plan_runs(
    settings: DemoSettings, base_iterations: int, time_iterations: dict[str, int] | None
) -> list[PlannedRun]:
    """Every (budget, seed, mode) of the study, seeds before budgets so that a stopped study has whole seeds.

    Runs of the same mode, seed and iteration count share one directory (the equal-time ``slice`` run is the
    equal-iteration one); the ``slice`` run of the demo's own seed is the demo's run in ``<output-dir>/train``.
    """
    out = Path(settings.output_dir)
    plan = []
    for budget in settings.ablation_budgets:
        for seed in ablation_seeds(settings):
            for mode in ABLATION_MODES:
                iterations = base_iterations if budget == "iterations" else time_iterations[mode]  # type: ignore[index]
                if iterations == base_iterations:
                    run_dir = (
                        out / "train"
                        if (mode, seed) == ("slice", settings.seed)
                        else out / "ablation" / mode / f"seed{seed}"
                    )
                else:
                    run_dir = out / "ablation" / mode / f"seed{seed}-{iterations}it"
                plan.append(PlannedRun(budget, mode, seed, iterations, run_dir))
    return plan


def obtain_planned(
    run: PlannedRun, settings: DemoSettings, data_dir: Path, device: torch.device, log: PhaseLog
) -> TrainOutcome:
    """Train ``run`` to its last iteration (resuming its directory), or take it as it is with ``--eval-only``."""
    if settings.eval_only:
        return existing_run(run.run_dir, log, run.mode)
    run_settings = replace(settings, seed=run.seed, iterations=run.iterations)
    config = load_config(
        PRESET, training_overrides(run_settings, data_dir, run.run_dir, device.type, run.mode)
    )
    return train_with_budget(config, run.run_dir, math.inf, log, settings.progress, run.mode)


# ---------------------------------------------------------------------------------------------------- the scores
def _scores(
    results: BackboneEvaluation, linear: dict[str, Any], k: int
) -> tuple[dict[str, float], dict[int, float]]:
    """The ablation's metrics from :func:`score_backbone` results and a linear probe's."""
    curve = sliced_curve(results.sliced_knn, "sliced", k)
    dim = int(results.sliced_knn["feature_dim"])
    metrics = {
        "knn_top1": float(results.knn_top1),
        "knn_d16_top1": curve[dim // 16],
        "knn_d4_top1": curve[dim // 4],
        "hummingbird_miou": float(results.hummingbird_miou),
        "linear_top1": float(linear["top1"]),
    }
    return metrics, curve


def _cache_key(settings: DemoSettings, outcome: TrainOutcome) -> dict[str, Any]:
    """What a run's cached scores depend on: the evaluation settings and seed, the backbone file, its iteration."""
    backbone = outcome.run_dir / "teacher_backbone.safetensors"
    stat = backbone.stat()
    key = {
        "evaluation": asdict(settings.eval),
        "eval_seed": settings.seed,
        "iteration": outcome.iteration,
        "backbone_bytes": stat.st_size,
        "backbone_mtime_ns": stat.st_mtime_ns,
    }
    return json.loads(json.dumps(to_json_safe(key)))


def score_run(
    outcome: TrainOutcome,
    data: DemoData,
    settings: DemoSettings,
    device: torch.device,
    log: PhaseLog,
    known: BackboneEvaluation | None = None,
) -> tuple[dict[str, float], dict[int, float]]:
    """The metrics and sliced curve of the run's teacher backbone: cached, taken from ``known`` (the demo's own
    results for this backbone) or measured (k-NN, sliced k-NN, HummingBird, linear probe)."""
    cache, key, k = outcome.run_dir / SCORES_FILE, _cache_key(settings, outcome), settings.eval.knn_k
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["metrics"], {int(m): v for m, v in saved["sliced_curve"].items()}
    if known is not None:
        metrics, curve = _scores(known, known.linear, k)
    else:
        model = load_backbone(outcome.run_dir / "teacher_backbone.safetensors")
        name = f"{outcome.mode} {outcome.run_dir.name}"
        results, train, val = score_backbone(name, model, data, settings, device, log, full=False)
        linear = run_linear(train, val, settings.eval, device, seed=settings.seed)
        metrics, curve = _scores(results, linear, k)
    write_metrics_json(cache, {"key": key, "metrics": metrics, "sliced_curve": curve})
    return metrics, curve


# ------------------------------------------------------------------------------------------------- the summaries
def summarise(runs: list[RunScores], budgets: tuple[str, ...]) -> dict[str, Any]:
    """Per budget: each mode's metrics over seeds (mean, sample std) and each mode's paired differences with each
    reference mode (:data:`REFERENCES`) over the seeds both have."""
    summary: dict[str, Any] = {}
    comparisons: dict[str, Any] = {}
    for budget in budgets:
        by_mode = {
            mode: {run.seed: run for run in runs if run.budget == budget and run.mode == mode}
            for mode in ABLATION_MODES
        }
        summary[budget] = {
            mode: {
                metric: asdict(seed_spread([seeds[s].metrics[metric] for s in sorted(seeds)]))
                for metric in ABLATION_METRICS
            }
            for mode, seeds in by_mode.items()
            if seeds
        }
        comparisons[budget] = {}
        for reference in REFERENCES:
            for mode in ABLATION_MODES:
                common = sorted(set(by_mode[mode]) & set(by_mode[reference]))
                if mode in (reference, "dinov2") or not common:  # dinov2 is only a reference: no nesting
                    continue
                comparisons[budget][f"{mode} - {reference}"] = {
                    metric: _paired(
                        [by_mode[mode][s].metrics[metric] for s in common],
                        [by_mode[reference][s].metrics[metric] for s in common],
                    )
                    for metric in ABLATION_METRICS
                }
    return {"summary": summary, "comparisons": comparisons}


def _paired(values: list[float], reference: list[float]) -> dict[str, Any]:
    result = paired_difference(values, reference)
    return {
        **asdict(result),
        "n": result.n,
        "separated": result.separated,
        "exceeds_spread": result.exceeds_spread,
    }


def verdict(comparisons: dict[str, Any]) -> list[str]:
    """One plain sentence per comparison: the metrics whose paired 95 % interval excludes 0, and the rest."""
    sentences = []
    for budget, pairs in comparisons.items():
        for pair, by_metric in pairs.items():
            separated = [
                f"{ABLATION_METRICS[m]} {d['mean']:+.1f} (95 % CI {d['ci_low']:+.1f} to {d['ci_high']:+.1f})"
                for m, d in by_metric.items()
                if d["separated"]
            ]
            n = next(iter(by_metric.values()))["n"]
            rest = len(by_metric) - len(separated)
            text = f"{pair}, equal {budget}, {n} seed(s): "
            text += ("separated on " + "; ".join(separated)) if separated else "no metric separated"
            if separated and rest:
                text += f"; the other {rest} metric(s) not separated"
            sentences.append(text + ".")
    return sentences


# ------------------------------------------------------------------------------------------------------ the cost
MIB = 2**20


def _cost_summary(cost: HeadCost) -> dict[str, float]:
    """The report's numbers of one :class:`~franca.train.head_cost.HeadCost` (per image of a training step)."""
    return {
        "head_params_m": cost.params / 1e6,
        "backbone_params_m": cost.backbone_params / 1e6,
        "head_gflop": cost.flops / 1e9,
        "head_flop_share": cost.flops_share,
        "activation_mib": (cost.activation_bytes + cost.teacher_logit_bytes) / MIB,
        "optimizer_mib": cost.optimizer_bytes / MIB,
    }


def head_costs(settings: DemoSettings, data_dir: Path, device: torch.device) -> dict[str, dict[str, Any]]:
    """{model: {mode: cost}}: what each mode's heads cost (computed, :mod:`franca.train.head_cost`) for the runs'
    own config and for the paper's model sizes and heads."""
    costs: dict[str, dict[str, Any]] = {}
    for mode in ABLATION_MODES:
        overrides = training_overrides(settings, data_dir, Path(settings.output_dir), device.type, mode)
        costs.setdefault("ViT-tiny/8 (these runs)", {})[mode] = _cost_summary(
            head_cost(load_config(PRESET, overrides))
        )
        for label in PAPER_MODELS:
            costs.setdefault(f"{label}/14 (paper heads)", {})[mode] = _cost_summary(
                paper_head_cost(label, mode)
            )
    return costs


# ------------------------------------------------------------------------------------------------------ the study
def run_ablation(
    settings: DemoSettings,
    main_outcome: TrainOutcome,
    main_results: BackboneEvaluation,
    random_results: BackboneEvaluation,
    data: DemoData,
    device: torch.device,
    log: PhaseLog,
) -> dict[str, Any]:
    """Train and score every planned run (resuming what is there), summarise, write ``ablation/ablation.json``
    and ``ablation/report.html``; returns the JSON."""
    base = main_outcome.iterations
    calibration = None
    if "time" in settings.ablation_budgets:
        log.phase("ablation step times", "ablation: step time per mode")
        calibration = step_times(settings, data.train_dir, device, base, log)
    plan = plan_runs(settings, base, calibration["iterations"] if calibration else None)
    unique = list(dict.fromkeys(run.run_dir for run in plan))
    log(f"ablation: {len(plan)} runs ({len(unique)} trainings) over seeds {ablation_seeds(settings)}")
    done: dict[Path, tuple[TrainOutcome, dict[str, float], dict[int, float]]] = {}
    runs = []
    for run in plan:
        if run.run_dir not in done:
            log.phase(
                "ablation",
                f"ablation [{len(done) + 1}/{len(unique)}]: {run.mode}, seed {run.seed}, {run.iterations} "
                f"iterations ({run.run_dir})",
            )
            outcome = obtain_planned(run, settings, data.train_dir, device, log)
            known = main_results if run.run_dir == main_outcome.run_dir and main_outcome.completed else None
            done[run.run_dir] = (outcome, *score_run(outcome, data, settings, device, log, known))
        outcome, metrics, curve = done[run.run_dir]
        runs.append(
            RunScores(
                run.budget,
                run.mode,
                run.seed,
                run.run_dir,
                outcome.iteration,
                outcome.iterations,
                outcome.images_per_s,
                metrics,
                curve,
            )
        )
    log.end_phase()
    ablation = {
        "seeds": ablation_seeds(settings),
        "budgets": list(settings.ablation_budgets),
        "modes": dict(MODE_DESCRIPTIONS),
        "metrics": dict(ABLATION_METRICS),
        "base_iterations": base,
        "batch_size": main_outcome.config.train.batch_size_per_device,
        "step_times": calibration,
        "random_init": _scores(random_results, random_results.linear, settings.eval.knn_k)[0],
        "runs": [run.to_dict() for run in runs],
        **summarise(runs, tuple(settings.ablation_budgets)),
    }
    ablation["verdict"] = verdict(ablation["comparisons"])
    ablation["head_cost"] = head_costs(settings, data.train_dir, device)
    out = Path(settings.output_dir) / "ablation"
    write_metrics_json(out / "ablation.json", ablation)
    ablation["report"] = str(write_ablation_report(out, ablation, settings))
    log(
        f"ablation: report {ablation['report']} ({format_duration(log.timings.get('ablation', 0.0))} of training)"
    )
    return ablation
