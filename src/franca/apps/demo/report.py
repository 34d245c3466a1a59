"""The demo's HTML report: figures and sections from the measured metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from franca.apps.demo.ablation_report import ablation_section
from franca.apps.demo.progress import format_duration
from franca.apps.demo.protocols import sliced_curve
from franca.apps.demo.settings import (
    NUM_SHAPE_CLASSES,
    PRESET,
    TARGET_HUMMINGBIRD_POINTS,
    TARGET_KNN_POINTS,
    DemoSettings,
    EvalSettings,
)
from franca.apps.demo.training import PLATEAU_FRACTION, TrainOutcome, uniform_dino_losses


def _figures(
    out: Path,
    outcome: TrainOutcome,
    trained: dict[str, Any],
    random: dict[str, Any],
    rasa_curve: list[dict[str, Any]],
    pca_rows: list[list[Any]],
    pca_columns: list[str],
    evaluation: EvalSettings,
) -> dict[str, Path]:
    from franca.report import plot_image_grid, plot_loss_curves, plot_rasa_r2, plot_sliced_knn

    figures_dir = out / "figures"
    k = evaluation.knn_k
    levels = outcome.config.heads.level_widths(trained["sliced_knn"]["feature_dim"])
    figures = {
        "loss": plot_loss_curves(
            outcome.run_dir / "metrics.jsonl",
            figures_dir / "loss_curves.png",
            levels,
            uniform_losses=uniform_dino_losses(outcome.config),
        ),
        "sliced": plot_sliced_knn(
            {
                "trained": {
                    "sliced": sliced_curve(trained["sliced_knn"], "sliced", k),
                    "pca": sliced_curve(trained["sliced_knn"], "pca", k),
                },
                "random init": {
                    "sliced": sliced_curve(random["sliced_knn"], "sliced", k),
                    "pca": sliced_curve(random["sliced_knn"], "pca", k),
                },
            },
            figures_dir / "sliced_knn.png",
            title=f"k-NN top-1 (k={k}) on the first m dims (solid) and on m PCA directions (dashed)",
        ),
        "rasa": plot_rasa_r2(rasa_curve, figures_dir / "rasa_r2.png"),
        "pca": plot_image_grid(
            pca_rows,
            figures_dir / "pca_maps.png",
            column_titles=pca_columns,
            row_titles=[f"val {i + 1}" for i in range(len(pca_rows))],
        ),
    }
    return figures


def _rasa_section_rows(rasa: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [
        {
            "iteration": 0,
            "position R² (linear, held-out)": rasa["baseline"]["linear_r2"],
            "predictor R²": None,
            "train loss": None,
        }
    ]
    for entry in rasa["iterations"]:
        rows.append(
            {
                "iteration": entry["iteration"],
                "position R² (linear, held-out)": entry["linear_r2"],
                "predictor R²": entry["predictor_r2"],
                "train loss": entry["train_loss"],
            }
        )
    return rows


def write_report(
    settings: DemoSettings,
    metrics: dict[str, Any],
    outcome: TrainOutcome,
    figures: dict[str, Path],
    rows: list[dict[str, Any]],
    total_s: float,
) -> Path:
    """Render ``report.html`` (self-contained) from the measured metrics and the figures."""
    from franca.report import ReportImage, ReportSection, default_facts, render_report

    trained, random = metrics["trained"], metrics["random_init"]
    evaluation = settings.eval
    data = metrics["data"]
    training = metrics["training"]
    status = "completed" if training["completed"] else unfinished_text(training)
    plateau_text = plateau_note(training)
    k = evaluation.knn_k
    memory = (
        "the whole train split"
        if data["eval_train_images"] >= data["num_train"]
        else f"{data['eval_train_images']} train images (a seeded subset of the {data['num_train']})"
    )
    sections = [
        ReportSection(
            "Data and pre-training",
            text=(
                f"Synthetic shapes data set ({data['style']} style): {data['num_train']} train / "
                f"{data['num_val']} val images of "
                f"{data['size']} px, {NUM_SHAPE_CLASSES} shape classes (the class of the largest object), with "
                "per-pixel masks (background is a class for the dense protocols).\n\n"
                f"Pre-training: the {PRESET} preset (ViT-tiny/8, {outcome.config.heads.mode} Matryoshka heads, "
                f"levels {training['levels']}), {training['iterations']} iterations of batch "
                f"{outcome.config.train.batch_size_per_device} on {metrics['settings']['device']}: {status}. "
                f"Median throughput {format_value_or_dash(training['images_per_s'])} images/s. "
                "The curves show the total loss, the DINO and iBOT losses of each Matryoshka level (dashed: "
                "the uniform value ln K_j that a student predicting nothing scores), and the learning rate."
                + (f"\n\nNote: {plateau_text}." if plateau_text else "")
            ),
            images=[ReportImage(figures["loss"], "Training losses per Matryoshka level")],
        ),
        ReportSection(
            "Classification: k-NN and linear probe",
            text=(
                f"k-NN: CLS token, cosine similarity, k={k}, T={evaluation.knn_temperature}, {memory} as memory. "
                "Linear probe: linear heads on the precomputed CLS (and CLS + mean patch) features of the same "
                "images, "
                f"{evaluation.linear_epochs} epochs of SGD, learning rates {list(evaluation.linear_lrs)}, the head "
                f"chosen on a held-out {evaluation.linear_holdout:.0%} of train, reported on val."
            ),
            table=[
                {
                    "model": label,
                    "k-NN top-1": r["knn"]["top1"],
                    "k-NN top-5": r["knn"][f"k{k}"]["top5"],
                    "linear top-1": r["linear"]["top1"],
                    "linear head": f"{r['linear']['best']['feature_set']} lr {r['linear']['best']['lr']:g}",
                }
                for label, r in (("trained", trained), ("random init", random))
            ],
        ),
        ReportSection(
            "Matryoshka-sliced k-NN",
            text=(
                "k-NN top-1 using only the first m dims of the CLS token (the nested representation Franca trains "
                "for) and, as a baseline, its top-m PCA directions fitted on the train features."
            ),
            table=[
                {
                    "dims": m,
                    "trained (first m dims)": sliced_curve(trained["sliced_knn"], "sliced", k)[m],
                    "trained (PCA m)": sliced_curve(trained["sliced_knn"], "pca", k)[m],
                    "random init (first m dims)": sliced_curve(random["sliced_knn"], "sliced", k)[m],
                    "random init (PCA m)": sliced_curve(random["sliced_knn"], "pca", k)[m],
                }
                for m in trained["sliced_knn"]["dims"]
            ],
            images=[ReportImage(figures["sliced"], "Sliced vs PCA-truncated k-NN")],
        ),
        ReportSection(
            "Dense: HummingBird in-context segmentation and overclustering",
            text=(
                f"HummingBird: every val patch takes the label distributions of its {evaluation.hummingbird_k} "
                f"nearest train patches (memory bank: {trained['hummingbird']['memory_patches']} of the "
                f"{trained['hummingbird']['labelled_train_patches']} labelled patches of the "
                f"{data['eval_train_images']} train images, the same for every model), weighted by "
                f"softmax(cos / {evaluation.hummingbird_temperature}); "
                "predictions are upsampled to the mask and scored by mIoU over background + 10 shapes. "
                f"Overclustering: K-means (K = {', '.join(map(str, evaluation.overcluster_ks))}) on the standardised, "
                f"PCA-{evaluation.overcluster_pca_dim} val patch features, clusters matched to classes greedily by "
                f"precision, mIoU averaged over {len(evaluation.overcluster_seeds)} seed(s)."
            ),
            table=[
                {
                    "model": label,
                    "HummingBird mIoU": r["hummingbird"]["miou"],
                    "HummingBird pixel acc.": r["hummingbird"]["pixel_accuracy"],
                    **{
                        f"overclustering K={kk}": r["overclustering"][f"k{kk}"]["miou"]
                        for kk in evaluation.overcluster_ks
                    },
                }
                for label, r in (("trained", trained), ("random init", random))
            ],
        ),
        ReportSection(
            "RASA: removing absolute position from the patch features",
            text=(
                f"RASA on the trained backbone: {evaluation.rasa_iterations} iterations, each training a linear "
                f"position predictor sigmoid(W z) ({evaluation.rasa_epochs} epochs on the patch features of "
                f"{metrics['rasa']['settings']['train_items']} train images, AdamW lr {evaluation.rasa_lr:g} with a "
                "cosine decay) and projecting its two directions out. Position R² is that of a fresh least-squares "
                "read-out (with bias) of the patch position, 2-fold cross-validated on the val images; the predictor "
                "R² is that of each iteration's trained predictor on the val features with the earlier removals "
                "applied. With the official (non-orthogonal) removal steps only the first step lowers what a linear "
                "read-out recovers; the later ones are injective on the already projected features (see franca.rasa)."
            ),
            table=[
                {
                    "metric": "position R² (linear read-out, val)",
                    "without RASA": metrics["rasa"]["position_r2_before"],
                    "with RASA": metrics["rasa"]["position_r2_after"],
                },
                {
                    "metric": "HummingBird mIoU, %",
                    "without RASA": trained["hummingbird"]["miou"],
                    "with RASA": metrics["hummingbird_rasa"]["miou"],
                },
            ],
            images=[ReportImage(figures["rasa"], "RASA: position R² and MSE per iteration")],
        ),
        ReportSection(
            "RASA iterations",
            table=_rasa_section_rows(metrics["rasa"]),
        ),
        ReportSection(
            "PCA feature maps",
            text=(
                "The first three principal components of the patch features of these val images (fitted jointly "
                "per model) as RGB; the mask column shows the ground truth (black = background)."
            ),
            images=[ReportImage(figures["pca"], "PCA maps of val images")],
        ),
    ]
    ablation = metrics.get("ablation")
    if ablation:
        sections.append(ablation_section(ablation))
    targets = metrics["targets"]
    sections.append(
        ReportSection(
            "Targets",
            text=(
                f"k-NN top-1: trained beats random init by {targets['knn_points']:+.1f} points (target >= "
                f"{TARGET_KNN_POINTS:g}): {'met' if targets['knn_met'] else 'NOT met'}. HummingBird mIoU: "
                f"{targets['hummingbird_points']:+.1f} points (target >= {TARGET_HUMMINGBIRD_POINTS:g}): "
                f"{'met' if targets['hummingbird_met'] else 'NOT met'}."
            ),
        )
    )
    facts = default_facts(
        total_time_s=total_s,
        device=metrics["settings"]["device"],
        seed=settings.seed,
        **{f"time: {name}": format_duration(seconds) for name, seconds in metrics["timings"].items()},
    )
    return render_report(
        Path(settings.output_dir) / "report.html",
        title="Franca demo: tiny pre-training on synthetic shapes",
        subtitle=(
            f"Trained ViT-tiny/8 ({training['iteration']} iterations) vs the same backbone at random initialisation, "
            f"on the synthetic val split ({data['num_val']} images)."
        ),
        summary_rows=rows,
        sections=sections,
        facts=facts,
    )


def plateau_note(training: dict[str, Any]) -> str | None:
    """One line when the run's DINO loss ended at its uniform value (the run has not learned clusters), else None."""
    if not training.get("dino_on_plateau"):
        return None
    return (
        f"the DINO loss ended at {training['final_dino_loss']:.3f}, within "
        f"{100 * PLATEAU_FRACTION:.0f}% of its uniform value sum_j ln K_j = {training['uniform_dino_loss']:.3f}: "
        "the run has not started to learn image-level clusters (see docs/demo-learning.md)"
    )


def unfinished_text(training: dict[str, Any]) -> str:
    """Words for a run that did not reach its last iteration (stopped by the budget, or evaluated as it was)."""
    where = f"iteration {training['iteration']} of {training['iterations']}"
    if training.get("stopped_by_time_budget"):
        return f"stopped by the time budget at {where}"
    return f"unfinished: evaluated at {where}"


def format_value_or_dash(value: Any) -> str:
    """``12.3456`` -> ``"12.3"``; None -> ``"-"``."""
    return "-" if value is None else f"{float(value):.1f}"
