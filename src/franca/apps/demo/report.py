"""The demo's HTML report: its figures, and one short function per section, from :class:`DemoResults`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from franca.apps.demo.ablation_report import ablation_section
from franca.apps.demo.evaluation import BackboneEvaluation, DemoResults, PcaPanels
from franca.apps.demo.progress import format_duration
from franca.apps.demo.settings import (
    NUM_SHAPE_CLASSES,
    PRESET,
    TARGET_HUMMINGBIRD_POINTS,
    TARGET_KNN_POINTS,
)
from franca.apps.demo.training import PLATEAU_FRACTION, uniform_dino_losses
from franca.report import (
    ReportImage,
    ReportSection,
    default_facts,
    plot_image_grid,
    plot_loss_curves,
    plot_rasa_r2,
    plot_sliced_knn,
    render_report,
)


def make_figures(results: DemoResults, pca_rows: list[list[Any]]) -> dict[str, Path]:
    """The report's plots in ``<output-dir>/figures``: loss curves, sliced k-NN, RASA R^2 and the PCA maps
    (``pca_rows``: :meth:`PcaPanels.rows`); returns {name: PNG path}."""
    figures_dir = Path(results.settings.output_dir) / "figures"
    k = results.settings.eval.knn_k
    outcome = results.outcome
    curves = {
        label: {"sliced": r.sliced("sliced", k), "pca": r.sliced("pca", k)}
        for label, r in (("trained", results.trained), ("random init", results.random))
    }
    return {
        "loss": plot_loss_curves(
            outcome.run_dir / "metrics.jsonl",
            figures_dir / "loss_curves.png",
            results.levels,
            uniform_losses=uniform_dino_losses(outcome.config),
        ),
        "sliced": plot_sliced_knn(
            curves,
            figures_dir / "sliced_knn.png",
            title=f"k-NN top-1 (k={k}) on the first m dims (solid) and on m PCA directions (dashed)",
        ),
        "rasa": plot_rasa_r2(results.rasa.result.curve(), figures_dir / "rasa_r2.png"),
        "pca": plot_image_grid(
            pca_rows,
            figures_dir / "pca_maps.png",
            column_titles=list(PcaPanels.COLUMNS),
            row_titles=[f"val {i + 1}" for i in range(len(pca_rows))],
        ),
    }


def _models(results: DemoResults) -> tuple[tuple[str, BackboneEvaluation], ...]:
    return (("trained", results.trained), ("random init", results.random))


def _data_section(results: DemoResults, figures: dict[str, Path]) -> ReportSection:
    data, outcome = results.data, results.outcome
    training = outcome.summary()
    status = "completed" if outcome.completed else unfinished_text(training)
    plateau_text = plateau_note(training)
    return ReportSection(
        "Data and pre-training",
        text=(
            f"Synthetic shapes data set ({data.style} style): {data.num_train} train / {data.num_val} val images of "
            f"{data.size} px, {NUM_SHAPE_CLASSES} shape classes (the class of the largest object), with "
            "per-pixel masks (background is a class for the dense protocols).\n\n"
            f"Pre-training: the {PRESET} preset (ViT-tiny/8, {outcome.config.heads.mode} Matryoshka heads, "
            f"levels {results.levels}), {outcome.iterations} iterations of batch "
            f"{outcome.config.train.batch_size_per_device} on {results.device}: {status}. "
            f"Median throughput {format_value_or_dash(outcome.images_per_s)} images/s. "
            "The curves show the total loss, the DINO and iBOT losses of each Matryoshka level (dashed: "
            "the uniform value ln K_j that a student predicting nothing scores), and the learning rate."
            + (f"\n\nNote: {plateau_text}." if plateau_text else "")
        ),
        images=[ReportImage(figures["loss"], "Training losses per Matryoshka level")],
    )


def _classification_section(results: DemoResults) -> ReportSection:
    evaluation, data = results.settings.eval, results.data
    k = evaluation.knn_k
    memory = (
        "the whole train split"
        if data.eval_train_images >= data.num_train
        else f"{data.eval_train_images} train images (a seeded subset of the {data.num_train})"
    )
    return ReportSection(
        "Classification: k-NN and linear probe",
        text=(
            f"k-NN: CLS token, cosine similarity, k={k}, T={evaluation.knn_temperature}, {memory} as memory. "
            "Linear probe: linear heads on the precomputed CLS (and CLS + mean patch) features of the same images, "
            f"{evaluation.linear_epochs} epochs of SGD, learning rates {list(evaluation.linear_lrs)}, the head "
            f"chosen on a held-out {evaluation.linear_holdout:.0%} of train, reported on val."
        ),
        table=[
            {
                "model": label,
                "k-NN top-1": r.knn_top1,
                "k-NN top-5": r.knn[f"k{k}"]["top5"],
                "linear top-1": r.linear["top1"],
                "linear head": f"{r.linear['best']['feature_set']} lr {r.linear['best']['lr']:g}",
            }
            for label, r in _models(results)
        ],
    )


def _sliced_section(results: DemoResults, figures: dict[str, Path]) -> ReportSection:
    k = results.settings.eval.knn_k
    trained, random = results.trained, results.random
    series = {
        "trained (first m dims)": trained.sliced("sliced", k),
        "trained (PCA m)": trained.sliced("pca", k),
        "random init (first m dims)": random.sliced("sliced", k),
        "random init (PCA m)": random.sliced("pca", k),
    }
    return ReportSection(
        "Matryoshka-sliced k-NN",
        text=(
            "k-NN top-1 using only the first m dims of the CLS token (the nested representation Franca trains "
            "for) and, as a baseline, its top-m PCA directions fitted on the train features."
        ),
        table=[
            {"dims": m, **{name: curve[m] for name, curve in series.items()}}
            for m in trained.sliced_knn["dims"]
        ],
        images=[ReportImage(figures["sliced"], "Sliced vs PCA-truncated k-NN")],
    )


def _dense_section(results: DemoResults) -> ReportSection:
    evaluation, hummingbird = results.settings.eval, results.trained.hummingbird
    return ReportSection(
        "Dense: HummingBird in-context segmentation and overclustering",
        text=(
            f"HummingBird: every val patch takes the label distributions of its {evaluation.hummingbird_k} "
            f"nearest train patches (memory bank: {hummingbird['memory_patches']} of the "
            f"{hummingbird['labelled_train_patches']} labelled patches of the "
            f"{results.data.eval_train_images} train images, the same for every model), weighted by "
            f"softmax(cos / {evaluation.hummingbird_temperature}); "
            "predictions are upsampled to the mask and scored by mIoU over background + 10 shapes. "
            f"Overclustering: K-means (K = {', '.join(map(str, evaluation.overcluster_ks))}) on the standardised, "
            f"PCA-{evaluation.overcluster_pca_dim} val patch features, clusters matched to classes greedily by "
            f"precision, mIoU averaged over {len(evaluation.overcluster_seeds)} seed(s)."
        ),
        table=[
            {
                "model": label,
                "HummingBird mIoU": r.hummingbird_miou,
                "HummingBird pixel acc.": r.hummingbird["pixel_accuracy"],
                **{f"overclustering K={kk}": r.overclustering_miou(kk) for kk in evaluation.overcluster_ks},
            }
            for label, r in _models(results)
        ],
    )


def _rasa_section(results: DemoResults, figures: dict[str, Path]) -> ReportSection:
    evaluation, rasa = results.settings.eval, results.rasa
    return ReportSection(
        "RASA: removing absolute position from the patch features",
        text=(
            f"RASA on the trained backbone: {evaluation.rasa_iterations} iterations, each training a linear "
            f"position predictor sigmoid(W z) ({evaluation.rasa_epochs} epochs on the patch features of "
            f"{rasa.result.settings['train_items']} train images, AdamW lr {evaluation.rasa_lr:g} with a "
            "cosine decay) and projecting its two directions out. Position R² is that of a fresh least-squares "
            "read-out (with bias) of the patch position, 2-fold cross-validated on the val images; the predictor "
            "R² is that of each iteration's trained predictor on the val features with the earlier removals "
            "applied. With the official (non-orthogonal) removal steps only the first step lowers what a linear "
            "read-out recovers; the later ones are injective on the already projected features (see franca.rasa)."
        ),
        table=[
            {
                "metric": "position R² (linear read-out, val)",
                "without RASA": rasa.position_r2_before,
                "with RASA": rasa.position_r2_after,
            },
            {
                "metric": "HummingBird mIoU, %",
                "without RASA": results.trained.hummingbird_miou,
                "with RASA": rasa.hummingbird["miou"],
            },
        ],
        images=[ReportImage(figures["rasa"], "RASA: position R² and MSE per iteration")],
    )


def _rasa_iterations_section(results: DemoResults) -> ReportSection:
    result = results.rasa.result
    rows: list[dict[str, Any]] = [
        {
            "iteration": 0,
            "position R² (linear, held-out)": result.baseline["linear_r2"],
            "predictor R²": None,
            "train loss": None,
        }
    ]
    rows += [
        {
            "iteration": entry["iteration"],
            "position R² (linear, held-out)": entry["linear_r2"],
            "predictor R²": entry["predictor_r2"],
            "train loss": entry["train_loss"],
        }
        for entry in result.metrics
    ]
    return ReportSection("RASA iterations", table=rows)


def _pca_section(figures: dict[str, Path]) -> ReportSection:
    return ReportSection(
        "PCA feature maps",
        text=(
            "The first three principal components of the patch features of these val images (fitted jointly "
            "per model) as RGB; the mask column shows the ground truth (black = background)."
        ),
        images=[ReportImage(figures["pca"], "PCA maps of val images")],
    )


def _targets_section(results: DemoResults) -> ReportSection:
    targets = results.targets()
    return ReportSection(
        "Targets",
        text=(
            f"k-NN top-1: trained beats random init by {targets['knn_points']:+.1f} points (target >= "
            f"{TARGET_KNN_POINTS:g}): {'met' if targets['knn_met'] else 'NOT met'}. HummingBird mIoU: "
            f"{targets['hummingbird_points']:+.1f} points (target >= {TARGET_HUMMINGBIRD_POINTS:g}): "
            f"{'met' if targets['hummingbird_met'] else 'NOT met'}."
        ),
    )


def write_report(results: DemoResults, figures: dict[str, Path]) -> Path:
    """Render ``report.html`` (self-contained) in the output folder from the results and the figures
    (:func:`make_figures`); ``results.timings`` must hold the phase timings and the ``total``."""
    sections = [
        _data_section(results, figures),
        _classification_section(results),
        _sliced_section(results, figures),
        _dense_section(results),
        _rasa_section(results, figures),
        _rasa_iterations_section(results),
        _pca_section(figures),
    ]
    if results.ablation:
        sections.append(ablation_section(results.ablation))
    sections.append(_targets_section(results))
    facts = default_facts(
        total_time_s=results.timings["total"],
        device=str(results.device),
        seed=results.settings.seed,
        **{f"time: {name}": format_duration(seconds) for name, seconds in results.timings.items()},
    )
    return render_report(
        Path(results.settings.output_dir) / "report.html",
        title="Franca demo: tiny pre-training on synthetic shapes",
        subtitle=(
            f"Trained ViT-tiny/8 ({results.outcome.iteration} iterations) vs the same backbone at random "
            f"initialisation, on the synthetic val split ({results.data.num_val} images)."
        ),
        summary_rows=results.summary_rows(),
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
