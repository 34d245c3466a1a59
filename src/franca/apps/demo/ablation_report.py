"""The ablation's HTML report (``ablation/report.html``), its section in the demo's report, and its terminal table.

Everything here reads the JSON that :func:`franca.apps.demo.ablation.run_ablation` writes (``ablation.json``), so a
report can be redrawn from that file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from franca.apps.demo.settings import ABLATION_METRICS, ABLATION_MODES, MODE_DESCRIPTIONS, DemoSettings
from franca.eval.metrics import seed_spread
from franca.report import (
    ReportImage,
    ReportSection,
    default_facts,
    plot_grouped_bars,
    plot_sliced_knn,
    render_report,
)

BUDGET_WORDS = {"iterations": "equal iterations", "time": "equal wall time"}


def mean_sd(entry: dict[str, Any]) -> str:
    """``{"mean": 71.23, "std": 1.9, "values": [...]}`` -> ``"71.2 ± 1.9"`` (just the mean for one seed)."""
    if len(entry["values"]) < 2:
        return f"{entry['mean']:.1f}"
    return f"{entry['mean']:.1f} ± {entry['std']:.1f}"


def summary_table(ablation: dict[str, Any], budget: str) -> list[dict[str, Any]]:
    """Rows (mode, seeds, iterations, one "mean ± sd" per metric) of one budget, and the random init."""
    rows = []
    for mode, metrics in ablation["summary"][budget].items():
        iterations = sorted(
            {r["iterations"] for r in ablation["runs"] if r["budget"] == budget and r["mode"] == mode}
        )
        rows.append(
            {
                "heads.mode": mode,
                "seeds": len(next(iter(metrics.values()))["values"]),
                "iterations": ", ".join(map(str, iterations)),
                **{label: mean_sd(metrics[key]) for key, label in ABLATION_METRICS.items()},
            }
        )
    random = ablation["random_init"]
    rows.append(
        {
            "heads.mode": "(random init)",
            "seeds": 1,
            "iterations": "0",
            **{label: f"{random[key]:.1f}" for key, label in ABLATION_METRICS.items()},
        }
    )
    return rows


def comparison_table(ablation: dict[str, Any], budget: str) -> list[dict[str, Any]]:
    """Rows (pair, metric, mean difference, its sd, 95 % interval, separated?) of one budget's paired comparisons."""
    rows = []
    for pair, by_metric in ablation["comparisons"][budget].items():
        for key, difference in by_metric.items():
            interval = (
                "-"
                if difference["ci_low"] is None
                else f"{difference['ci_low']:+.1f} to {difference['ci_high']:+.1f}"
            )
            rows.append(
                {
                    "difference": pair,
                    "metric": ABLATION_METRICS[key],
                    "mean": f"{difference['mean']:+.1f}",
                    "sd over seeds": f"{difference['std']:.1f}",
                    "95 % interval": interval,
                    "separated": "yes" if difference["separated"] else "no",
                }
            )
    return rows


def _figures(out: Path, ablation: dict[str, Any]) -> dict[str, Path]:
    figures = {}
    for budget, modes in ablation["summary"].items():
        groups = {
            label: {mode: modes[mode][key]["values"] for mode in modes}
            for key, label in ABLATION_METRICS.items()
        }
        figures[f"bars_{budget}"] = plot_grouped_bars(
            groups,
            out / "figures" / f"ablation_{budget}.png",
            title=f"Head modes, {BUDGET_WORDS[budget]}: mean ± sd over seeds (dots: each seed)",
            ylabel="%",
        )
        curves, spreads = {}, {}
        for mode in modes:
            per_seed = [
                r["sliced_curve"] for r in ablation["runs"] if r["budget"] == budget and r["mode"] == mode
            ]
            dims = sorted({int(m) for curve in per_seed for m in curve})
            stats = {
                m: _spread([float(curve[str(m)] if str(m) in curve else curve[m]) for curve in per_seed])
                for m in dims
            }
            curves[mode] = {"sliced": {m: mean for m, (mean, _) in stats.items()}}
            spreads[mode] = {"sliced": {m: std for m, (_, std) in stats.items()}}
        figures[f"sliced_{budget}"] = plot_sliced_knn(
            curves,
            out / "figures" / f"ablation_sliced_{budget}.png",
            title=f"k-NN top-1 on the first m dims of the CLS token, {BUDGET_WORDS[budget]} (band: ± sd)",
            spreads=spreads,
        )
    return figures


def _spread(values: list[float]) -> tuple[float, float]:
    spread = seed_spread(values)
    return spread.mean, spread.std


def _step_time_rows(ablation: dict[str, Any]) -> list[dict[str, Any]]:
    calibration = ablation.get("step_times")
    if not calibration:
        return []
    return [
        {
            "heads.mode": mode,
            "median step, ms": 1000 * seconds,
            "relative to slice": calibration["ratio_to_slice"][mode],
            "equal-time iterations": calibration["iterations"][mode],
        }
        for mode, seconds in calibration["step_seconds"].items()
    ]


def cost_rows(ablation: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (model, mode, head parameters, GFLOP per image, share of the step, activation and optimizer MiB)."""
    return [
        {
            "model": model,
            "heads.mode": mode,
            "head params, M": cost["head_params_m"],
            "backbone params, M": cost["backbone_params_m"],
            "head GFLOP / image": cost["head_gflop"],
            "head % of step FLOPs": 100 * cost["head_flop_share"],
            "activation MiB / image": cost["activation_mib"],
            "optimizer + EMA + grad MiB": cost["optimizer_mib"],
        }
        for model, modes in ablation.get("head_cost", {}).items()
        for mode, cost in modes.items()
    ]


def _cost_section(ablation: dict[str, Any]) -> Any:
    return ReportSection(
        "What the heads cost",
        text=(
            "Computed by franca.train.head_cost on the meta device, per image of one training step: the DINO and "
            "iBOT heads the trainer builds (student forward + backward, teacher forward), for the runs above and for "
            "the paper's model sizes with its heads (five levels, 131072 prototypes at the widest, 2048 hidden, 384 "
            "bottleneck) and crops (2 x 224 + 8 x 98 px). Activation: what the student heads save for the backward "
            "plus the teacher's logits (fp32); the loss's own tensors are not counted. Optimizer: AdamW's two moments, "
            "the gradient and the EMA teacher's copy of the head parameters (fp32)."
        ),
        table=cost_rows(ablation),
    )


def _run_rows(ablation: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "budget": r["budget"],
            "heads.mode": r["mode"],
            "seed": r["seed"],
            "iterations": f"{r['iteration']}/{r['iterations']}",
            "images/s": r["images_per_s"],
            **{label: r["metrics"][key] for key, label in ABLATION_METRICS.items()},
            "run": Path(r["run_dir"]).name if Path(r["run_dir"]).name != "train" else "train (the demo's)",
        }
        for r in ablation["runs"]
    ]


def _sections(ablation: dict[str, Any], figures: dict[str, Path]) -> list[Any]:
    seeds = ablation["seeds"]
    sections = [
        ReportSection(
            "The question and the setup",
            text=(
                "Does each nested prefix of the embedding need its own projection head (slice, the paper), or does "
                "one shared head (tied) or the v1.0 code's projections (project) do as well, and how much does the "
                "nesting add over a single DINOv2 head (dinov2)? "
                + " ".join(f"{mode}: {MODE_DESCRIPTIONS[mode]}." for mode in ABLATION_MODES)
                + f"\n\nEvery mode is trained with the demo's recipe ({ablation['base_iterations']} iterations of "
                f"batch {ablation['batch_size']}) for the training seeds {seeds}, and scored on the same "
                "evaluation data. Differences are taken seed by seed (the same seed gives both modes the same data "
                "order and initial backbone); a difference is called separated when its 95 % Student-t interval "
                "over the seeds excludes 0."
            ),
        )
    ]
    for budget in ablation["budgets"]:
        sections.append(
            ReportSection(
                f"Results at {BUDGET_WORDS[budget]}",
                text=_budget_text(ablation, budget),
                table=summary_table(ablation, budget),
                images=[
                    ReportImage(figures[f"bars_{budget}"], f"metrics per mode, {BUDGET_WORDS[budget]}"),
                    ReportImage(figures[f"sliced_{budget}"], f"sliced k-NN per mode, {BUDGET_WORDS[budget]}"),
                ],
            )
        )
        sections.append(
            ReportSection(
                f"Paired differences at {BUDGET_WORDS[budget]}",
                text="\n\n".join(s for s in ablation["verdict"] if f"equal {budget}," in s),
                table=comparison_table(ablation, budget),
            )
        )
    rows = _step_time_rows(ablation)
    if rows:
        sections.append(
            ReportSection(
                "Step time per mode (the equal-time budget)",
                text=(
                    "Median wall time of a training step of each mode, measured side by side on this machine "
                    f"({ablation['step_times']['rounds'] - 1} counted rounds of "
                    f"{ablation['step_times']['steps_per_round']} steps per mode, interleaved); each mode's "
                    "equal-time iterations = iterations x t_slice / t_mode."
                ),
                table=rows,
            )
        )
    if ablation.get("head_cost"):
        sections.append(_cost_section(ablation))
    sections.append(ReportSection("Every run", table=_run_rows(ablation)))
    return sections


def _budget_text(ablation: dict[str, Any], budget: str) -> str:
    if budget == "iterations":
        return "Every mode trains the same number of iterations. Mean ± sample standard deviation over the seeds."
    return (
        "Every mode trains for the wall time of the slice runs: a cheaper step buys more iterations (the "
        "schedules scale with them). Mean ± sample standard deviation over the seeds."
    )


def write_ablation_report(out: Path, ablation: dict[str, Any], settings: DemoSettings) -> Path:
    """Render ``out/report.html`` from the ablation's JSON (figures in ``out/figures``)."""
    figures = _figures(out, ablation)
    return render_report(
        out / "report.html",
        title="Franca demo: dedicated vs shared Matryoshka heads, over seeds",
        subtitle=(
            f"{len(ABLATION_MODES)} head modes x {len(ablation['seeds'])} training seeds x "
            f"{len(ablation['budgets'])} budget(s) on the synthetic shapes data (ViT-tiny/8)."
        ),
        summary_rows=[],
        sections=_sections(ablation, figures),
        facts=default_facts(device=settings.device, seeds=ablation["seeds"]),
    )


def ablation_section(ablation: dict[str, Any]) -> Any:
    """The demo report's section: the first budget's table and where the full ablation report is."""
    budget = ablation["budgets"][0]
    return ReportSection(
        "Ablation: Matryoshka head modes and the DINOv2 baseline",
        text=(
            f"Mean ± sd over the training seeds {ablation['seeds']} at {BUDGET_WORDS[budget]}. The paired "
            f"comparisons, both budgets, the plots and every run are in {ablation['report']}.\n\n"
            + "\n".join(ablation["verdict"])
        ),
        table=summary_table(ablation, budget),
    )


def ablation_text_table(ablation: dict[str, Any]) -> list[dict[str, Any]]:
    """The terminal summary's rows: every budget's table."""
    return [
        {"budget": budget, **row}
        for budget in ablation["budgets"]
        for row in summary_table(ablation, budget)
        if row["heads.mode"] != "(random init)"
    ]
