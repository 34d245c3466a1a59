"""``franca eval logreg``: L-BFGS logistic regression with a C sweep (fine-grained protocol); writes ``logreg.json``,
prints the sweep and the chosen C."""

from __future__ import annotations

import argparse
from typing import Any

from franca.cli.eval_protocols import common
from franca.eval import defaults
from franca.eval.output import format_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``franca eval logreg``."""
    common.add_common_arguments(parser, "logreg")
    common.add_classification_data_arguments(parser)
    group = parser.add_argument_group("logistic regression")
    group.add_argument(
        "--c-values",
        type=int,
        default=defaults.OFFICIAL_C_COUNT,
        metavar="COUNT",
        help="number of C values, log-spaced over 10^-6 .. 10^5 (official: 45; e.g. 12 for a quick sweep)",
    )
    group.add_argument(
        "--cs", type=float, nargs="+", default=None, help="explicit C values (override --c-values)"
    )
    group.add_argument(
        "--feature", choices=defaults.LOGREG_FEATURES, default="cls", help="image feature (official: cls)"
    )
    group.add_argument(
        "--normalize", choices=defaults.NORMALIZATIONS, default="none", help="feature normalisation"
    )
    group.add_argument(
        "--metric", choices=defaults.LOGREG_METRICS, default="top1", help="metric that chooses C"
    )
    group.add_argument(
        "--holdout",
        type=float,
        default=defaults.HOLDOUT_FRACTION,
        help="train fraction held out to choose C (0: on val)",
    )
    group.add_argument(
        "--max-iter", type=int, default=defaults.LOGREG_MAX_ITER, help="L-BFGS iterations per fit"
    )
    group.add_argument(
        "--tol", type=float, default=defaults.LOGREG_TOL, help="L-BFGS tolerance (official 1e-12)"
    )
    group.add_argument("--jobs", type=int, default=1, help="C values fitted in parallel (joblib)")


def settings_of(args: argparse.Namespace) -> Any:
    """The :class:`franca.eval.logreg.LogregSettings` of the options (checked when built, before the model is
    read); --cs wins over --c-values."""
    from franca.eval.logreg import LogregSettings, c_grid

    return LogregSettings(
        c_values=tuple(args.cs) if args.cs else tuple(c_grid(args.c_values)),
        feature=args.feature,
        holdout_fraction=args.holdout,
        normalize=args.normalize,
        metric=args.metric,
        max_iter=args.max_iter,
        tol=args.tol,
        seed=args.seed,
        n_jobs=args.jobs,
    )


def sweep_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per C of the sweep: C, its selection top-1, whether the fit converged."""
    return [
        {"C": f"{row['C']:.3g}", "selection_top1": row["top1"], "converged": row["converged"]}
        for row in results["sweep"]
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Sweep C, re-fit, report val accuracy (:func:`franca.eval.logreg.evaluate_logreg`); writes ``logreg.json``."""
    from franca.eval.logreg import evaluate_logreg

    settings = settings_of(args)
    model, device = common.load_model(args)
    train, val = common.classification_data(args)
    results = evaluate_logreg(
        model, train, val, settings, **common.extraction_options(args, device)
    ).to_dict()
    print(format_table(sweep_rows(results)))
    print(
        f"chosen C = {results['best_C']:.4g} (on {results['selected_on']}): val top-1 {results['top1']:.2f}  "
        f"top-5 {results['top5']:.2f}  mean per-class {results['mean_per_class']:.2f}"
    )
    common.finish(results, args, "logreg", table=False)
    return results
