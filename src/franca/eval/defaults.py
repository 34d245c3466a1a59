"""Default values and choices of the evaluation protocols, in one torch-free module.

The protocol modules (:mod:`franca.eval.knn`, :mod:`franca.eval.hummingbird`, ...) use these as their defaults and
re-export them under their historical names (``franca.eval.knn.DEFAULT_KS``, ...); the command line
(:mod:`franca.cli.eval_protocols`) reads them to define its options without importing torch, so that
``franca --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_OUTPUT_ROOT = Path("runs") / "eval"  # results of protocol P go to runs/eval/P unless told otherwise

# k-NN (DINOv2 protocol) and its Matryoshka-sliced variant
KNN_KS: tuple[int, ...] = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
SLICED_KS: tuple[int, ...] = (20,)
SLICED_FRACTIONS: tuple[int, ...] = (16, 8, 4, 2, 1)

# linear probe (DINOv2's learning-rate grid and feature sets)
DINOV2_LRS: tuple[float, ...] = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
LINEAR_FEATURE_SETS: tuple[str, ...] = ("cls1", "cls4", "cls1+avgpool", "cls4+avgpool")

# logistic regression (fine-grained protocol)
OFFICIAL_C_COUNT = 45
C_POWER_RANGE: tuple[float, float] = (-6.0, 5.0)
NORMALIZATIONS: tuple[str, ...] = ("none", "l2", "standardize")

# dense protocols: which patch tokens, and the segmentation data sets
TOKEN_CHOICES: tuple[str, ...] = ("auto", "patch", "rasa")
LAYOUTS: tuple[str, ...] = ("auto", "voc", "plain", "synth")
RESIZE_MODES: tuple[str, ...] = ("resize", "crop")

# HummingBird in-context segmentation
HUMMINGBIRD_K = 30
HUMMINGBIRD_TEMPERATURE = 0.02
SEARCH_CHOICES: tuple[str, ...] = ("auto", "torch", "faiss")

# linear segmentation head
SEG_OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")

# overclustering (Leopart protocol)
MATCHING: tuple[str, ...] = ("auto", "greedy", "hungarian")
KMEANS_BACKENDS: tuple[str, ...] = ("auto", "faiss", "sklearn")
DEFAULT_CLUSTERS: tuple[int, ...] = (100, 300)
DEFAULT_PCA_DIM = 50
DEFAULT_MASK_SIZE = 100

# image-level protocols (k-NN, linear probe, logistic regression, sliced k-NN)
EXTRACT_BATCH_SIZE = 64  # images per forward pass when extracting features
KNN_CHUNK_SIZE = 1024  # test samples searched at once
KNN_TRAIN_CHUNK_SIZE = 65536  # train samples scanned at once by the torch search
HOLDOUT_FRACTION = 0.1  # fraction of train held out to choose a linear head or a C
LINEAR_EPOCHS = 10
LINEAR_BATCH_SIZE = 256
LOGREG_FEATURES: tuple[str, ...] = ("cls", "avgpool")
LOGREG_METRICS: tuple[str, ...] = ("top1", "mean_per_class")
LOGREG_MAX_ITER = 1000
LOGREG_TOL = 1e-12
