"""The head-mode ablation's plan, equal-time budget, summaries and tables, on hand-made scores (no training)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from franca.apps.demo.ablation import RunScores, equal_time_iterations, plan_runs, summarise, verdict
from franca.apps.demo.ablation_report import comparison_table, mean_sd, summary_table
from franca.apps.demo.settings import ABLATION_METRICS, DemoSettings


def test_equal_time_iterations_buy_more_steps_for_a_cheaper_step() -> None:
    seconds = {"slice": 0.30, "project": 0.31, "tied": 0.28, "dinov2": 0.25}
    iterations = equal_time_iterations(1800, seconds)
    # 1800 * 0.30 / t: 1741.9 -> 1742, 1928.6 -> 1929, 2160
    assert iterations == {"slice": 1800, "project": 1742, "tied": 1929, "dinov2": 2160}
    for mode, count in iterations.items():  # the same wall time, to within one step
        assert abs(count * seconds[mode] - 1800 * 0.30) <= seconds[mode] / 2 + 1e-9


def test_plan_reuses_the_demo_run_and_shares_runs_of_equal_length(tmp_path: Path) -> None:
    settings = DemoSettings(output_dir=tmp_path, seeds=2, seed=5)
    time_iterations = {"slice": 100, "project": 100, "tied": 110, "dinov2": 120}
    plan = plan_runs(settings, 100, time_iterations)
    assert len(plan) == 2 * 2 * 4  # budgets x seeds x modes
    assert {run.seed for run in plan} == {5, 6}
    by_key = {(run.budget, run.mode, run.seed): run for run in plan}
    assert by_key["iterations", "slice", 5].run_dir == tmp_path / "train"  # the demo's own run
    assert by_key["iterations", "slice", 6].run_dir == tmp_path / "ablation" / "slice" / "seed6"
    # equal time: slice and project keep 100 iterations, so they are the equal-iteration runs
    for mode in ("slice", "project"):
        assert by_key["time", mode, 6].run_dir == by_key["iterations", mode, 6].run_dir
    assert by_key["time", "dinov2", 5].run_dir == tmp_path / "ablation" / "dinov2" / "seed5-120it"
    assert by_key["time", "tied", 6].iterations == 110
    assert len({run.run_dir for run in plan}) == 8 + 4  # two extra runs per seed (tied, dinov2)
    only_iterations = plan_runs(
        DemoSettings(output_dir=tmp_path, seeds=3, ablation_budgets=("iterations",)), 7, None
    )
    assert len(only_iterations) == 12 and {run.iterations for run in only_iterations} == {7}


def _runs(values: dict[str, list[float]], budget: str = "iterations") -> list[RunScores]:
    """Runs whose every metric is the given value (per mode, one value per seed 0, 1, ...)."""
    return [
        RunScores(
            budget, mode, seed, Path(f"{mode}{seed}"), 10, 10, None, dict.fromkeys(ABLATION_METRICS, value)
        )
        for mode, per_seed in values.items()
        for seed, value in enumerate(per_seed)
    ]


def test_summary_and_paired_differences_by_hand() -> None:
    runs = _runs(
        {
            "slice": [60.0, 62.0, 64.0],
            "project": [61.0, 63.0, 65.5],  # slice + 1, 1, 1.5
            "tied": [59.0, 64.0, 63.0],  # slice - 1, + 2, - 1
            "dinov2": [50.0, 51.0, 55.0],
        }
    )
    result = summarise(runs, ("iterations",))
    entry = result["summary"]["iterations"]["slice"]["knn_top1"]
    assert entry["mean"] == pytest.approx(62.0) and entry["std"] == pytest.approx(2.0)
    project = result["comparisons"]["iterations"]["project - slice"]["knn_top1"]
    assert project["mean"] == pytest.approx(3.5 / 3)
    # differences 1, 1, 1.5: sd = sqrt(((1-7/6)^2 * 2 + (1.5-7/6)^2) / 2) = sqrt(1/12); t(0.975, 2) = 4.302653
    assert project["std"] == pytest.approx(math.sqrt(1 / 12))
    assert project["ci_low"] == pytest.approx(7 / 6 - 4.302653 * math.sqrt(1 / 12) / math.sqrt(3), rel=1e-5)
    assert project["separated"] is True
    tied = result["comparisons"]["iterations"]["tied - slice"]["hummingbird_miou"]
    assert tied["mean"] == pytest.approx(0.0) and tied["separated"] is False
    # every nested mode against slice and against the single-head baseline, each pair once
    assert sorted(result["comparisons"]["iterations"]) == [
        "project - dinov2",
        "project - slice",
        "slice - dinov2",
        "tied - dinov2",
        "tied - slice",
    ]
    sentences = verdict(result["comparisons"])
    assert any(
        s.startswith("project - slice, equal iterations, 3 seed(s): separated on k-NN top-1 +1.2")
        for s in sentences
    )
    assert any(
        s.startswith("tied - slice, equal iterations, 3 seed(s): no metric separated") for s in sentences
    )


def test_tables_show_mean_and_spread() -> None:
    runs = _runs({"slice": [60.0, 62.0, 64.0], "dinov2": [50.0, 51.0, 55.0]})
    ablation = {
        **summarise(runs, ("iterations",)),
        "runs": [run.to_dict() for run in runs],
        "random_init": dict.fromkeys(ABLATION_METRICS, 10.0),
    }
    rows = summary_table(ablation, "iterations")
    assert [row["heads.mode"] for row in rows] == ["slice", "dinov2", "(random init)"]
    assert rows[0]["k-NN top-1"] == "62.0 ± 2.0" and rows[0]["seeds"] == 3 and rows[0]["iterations"] == "10"
    assert rows[1]["HummingBird mIoU"] == "52.0 ± 2.6"  # sd of 50, 51, 55 = sqrt(7) = 2.65
    assert mean_sd({"mean": 3.0, "std": 0.0, "values": [3.0]}) == "3.0"
    comparisons = comparison_table(ablation, "iterations")
    first = comparisons[0]
    assert (
        first["difference"] == "slice - dinov2" and first["mean"] == "+10.0" and first["separated"] == "yes"
    )


def test_head_costs_cover_the_runs_config_and_the_paper_sizes(tmp_path: Path) -> None:
    import torch

    from franca.apps.demo.ablation import head_costs
    from franca.apps.demo.training import random_init_backbone, training_overrides
    from franca.train.config import load_config

    settings = DemoSettings(output_dir=tmp_path)
    costs = head_costs(settings, tmp_path / "data", torch.device("cpu"))
    assert list(costs) == [
        "ViT-tiny/8 (these runs)",
        "ViT-S/14 (paper heads)",
        "ViT-B/14 (paper heads)",
        "ViT-L/14 (paper heads)",
        "ViT-g/14 (paper heads)",
    ]
    tiny = costs["ViT-tiny/8 (these runs)"]
    # the backbone of the runs' config, counted on the real (random-init) backbone the demo evaluates
    config = load_config("tiny_cpu", training_overrides(settings, tmp_path / "data", tmp_path, "cpu"))
    backbone = sum(p.numel() for p in random_init_backbone(config).parameters())
    assert tiny["slice"]["backbone_params_m"] == pytest.approx(backbone / 1e6)
    for model in costs.values():  # one shared head holds fewer parameters; no nesting costs fewer FLOPs
        assert model["tied"]["head_params_m"] < model["slice"]["head_params_m"]
        assert model["dinov2"]["head_gflop"] < model["slice"]["head_gflop"]
        assert model["tied"]["head_gflop"] == pytest.approx(model["slice"]["head_gflop"])
    shares = [
        costs[f"{label}/14 (paper heads)"]["slice"]["head_flop_share"]
        for label in ("ViT-S", "ViT-B", "ViT-L", "ViT-g")
    ]
    assert shares == sorted(shares, reverse=True)  # the same heads weigh less beside a bigger backbone
