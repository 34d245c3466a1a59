"""``franca demo``: synthetic data, a tiny Franca pre-training, evaluation against its random init, a report.

The flow (each phase logs one line with the elapsed time on the ``franca.demo`` logger; tqdm bars show progress
inside; :mod:`franca.cli.demo` shows the lines on stdout):

1. **data**: the procedural synthetic shapes data set (:mod:`franca.data.synth`) in ``--data`` (default
   ``<output-dir>/data``); a complete data set already there with the requested sizes is reused.
2. **train**: the ``tiny_cpu`` preset (:file:`franca/configs/tiny_cpu.yaml`) with dotlist overrides for the data
   path, the image size and the run length (on CUDA: a bigger batch and more iterations). Training runs in chunks that
   each end with a checkpoint, so that a time budget can stop it cleanly and a re-run resumes where it stopped.
3. **features**: every train and val image goes through each backbone ONCE (:mod:`franca.features`: CLS token,
   patch-token grid, mean patch token); every protocol then scores those tensors with the scoring functions of
   :mod:`franca.eval` (never the high-level ``evaluate_*`` helpers, which would each re-extract the features).
4. **evaluate** the trained teacher backbone and the same architecture at its random initialisation (built exactly as
   the trainer builds it): k-NN, linear probe, HummingBird in-context segmentation, overclustering,
   Matryoshka-sliced k-NN (plus PCA-truncated); RASA on the trained backbone (position R^2 per iteration, HummingBird
   with and without it); PCA maps of a few validation images.
5. **report**: ``report.html`` (self-contained, :mod:`franca.report`) and ``metrics.json`` in ``--output-dir``.

``--ablation`` also runs the head-mode study (:mod:`franca.apps.demo.ablation`): the Matryoshka heads in ``slice``
(the main run), ``project`` and ``tied`` modes and the single-head DINOv2 baseline (``heads.mode=dinov2``), each for
``--seeds`` training seeds, at equal iterations and at equal wall time, compared seed by seed in its own report.

Modules, in the order of the flow: ``settings`` (what to do), ``progress`` (phase lines), ``data`` (the data set and
the splits in memory), ``training`` (resumable, time-budgeted runs), ``protocols`` (the demo's settings for the
scoring functions of :mod:`franca.eval`), ``evaluation`` (one backbone: features once, every protocol; the
dataclasses the phases pass on), ``report`` (the HTML report, one function per section), ``ablation`` and
``ablation_report`` (the head-mode study), ``flow`` (:func:`run_demo`, one short function per phase).

Output layout::

    <output-dir>/data/                 synthetic data set (unless --data points elsewhere)
    <output-dir>/train/                the main run (config.yaml, metrics.jsonl, checkpoints/, teacher_backbone...)
    <output-dir>/ablation/             the head-mode study: its runs, step_times.json, ablation.json, report.html
    <output-dir>/figures/*.png         the plots embedded in the report
    <output-dir>/report.html, metrics.json
"""

from franca.apps.demo.data import DemoData, SplitData, load_split, prepare_data
from franca.apps.demo.evaluation import (
    BackboneEvaluation,
    DemoResults,
    RasaEvaluation,
    score_backbone,
)
from franca.apps.demo.flow import run_demo, summary_text
from franca.apps.demo.protocols import run_hummingbird
from franca.apps.demo.settings import QUICK, DemoSettings, EvalSettings, apply_quick
from franca.apps.demo.training import dino_plateau, random_init_backbone, training_overrides

__all__ = [
    "QUICK",
    "BackboneEvaluation",
    "DemoData",
    "DemoResults",
    "DemoSettings",
    "EvalSettings",
    "RasaEvaluation",
    "SplitData",
    "apply_quick",
    "dino_plateau",
    "load_split",
    "prepare_data",
    "random_init_backbone",
    "run_demo",
    "run_hummingbird",
    "score_backbone",
    "summary_text",
    "training_overrides",
]
