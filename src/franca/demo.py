"""``franca demo``: synthetic data, a tiny Franca pre-training, evaluation against its random init, a report.

The flow (each phase prints one line with the elapsed time; tqdm bars show progress inside):

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

``--ablation`` also trains the Matryoshka heads in ``project`` and ``tied`` modes and the single-head DINOv2 baseline
(``heads.mode=dinov2``) with the same budget (the main run is the ``slice`` mode) and compares them.

Output layout::

    <output-dir>/data/                 synthetic data set (unless --data points elsewhere)
    <output-dir>/train/                the main run (config.yaml, metrics.jsonl, checkpoints/, teacher_backbone...)
    <output-dir>/ablation/<mode>/      the ablation runs (project, tied, dinov2)
    <output-dir>/figures/*.png         the plots embedded in the report
    <output-dir>/report.html, metrics.json (and ablation.json with --ablation)
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from franca.core.errors import ConfigError, DataError, check_choice
from franca.data.synth import CLASS_NAMES
from franca.eval.hummingbird import HummingbirdSettings, LabelBank, label_bank, score_hummingbird
from franca.eval.knn import knn_classify
from franca.eval.linear import train_linear_probe
from franca.eval.overclustering import OverclusteringSettings, score_overclustering
from franca.eval.pca_maps import score_pca
from franca.eval.segmentation_data import seeded_subset
from franca.eval.sliced import sliced_knn
from franca.features import Features, TensorImages, extract_features
from franca.train.callbacks import Callback, TimeBudget

PRESET = "tiny_cpu"
NUM_SHAPE_CLASSES = 10
IGNORE_INDEX = 255
ABLATION_MODES: tuple[str, ...] = ("slice", "project", "tied", "dinov2")
MODE_DESCRIPTIONS = {
    "slice": "Franca: one head per nesting level on the first m_j dims (paper)",
    "project": "Franca v1.0 code: one head per level on Linear(d -> m_j) of the full token",
    "tied": "one shared head, sliced per level",
    "dinov2": "DINOv2 baseline: a single head, no nesting",
}
# Issue targets on the synthetic val split: trained minus random init, in points.
TARGET_KNN_POINTS = 15.0
TARGET_HUMMINGBIRD_POINTS = 10.0
MASK_PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
    ],
    dtype=np.uint8,
)


# ---------------------------------------------------------------------------------------------------- settings
@dataclass
class EvalSettings:
    """Evaluation knobs, picked so that the whole evaluation of two models takes ~2-3 minutes on 2 CPU cores.

    ``train_images``: the train images whose features serve as k-NN memory, linear-probe training data and
    HummingBird memory (a seeded uniform subset of the train split, the same for every model; None = all of them,
    the default on CUDA): feature extraction is the most expensive evaluation step on CPU.
    ``hummingbird_memory_patches``: memory-bank size (a seeded uniform subset of the labelled patches of those
    images, the same for every model); None keeps every patch (the default on CUDA).
    """

    train_images: int | None = 5000
    batch_size: int = 256
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_epochs: int = 10
    linear_batch_size: int = 1024  # few optimiser steps: on 2 busy cores each tiny step costs tens of ms
    linear_lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
    linear_feature_sets: tuple[str, ...] = ("cls1", "cls1+avgpool")
    linear_holdout: float = 0.1
    hummingbird_k: int = 30
    hummingbird_temperature: float = 0.02
    hummingbird_memory_patches: int | None = 32768
    overcluster_ks: tuple[int, ...] = (20, 50)
    overcluster_seeds: tuple[int, ...] = (0, 1)
    overcluster_pca_dim: int = 50
    kmeans_iterations: int = 50
    kmeans_restarts: int = 1
    rasa_iterations: int = 5
    rasa_epochs: int = 5
    rasa_train_images: int = 1000
    rasa_batch_size: int = 64
    # The paper's 2e-3 comes with ImageNet-sized epochs; with ~80 steps per iteration here the position predictor
    # stays far from converged at 2e-3 (measured on random-init ViT-tiny features of the synthetic data: predictor
    # R^2 0.02, first removal 0.40 -> 0.37 position R^2), while 5e-2 (cosine to 0) fits it (0.12; 0.40 -> 0.26).
    rasa_lr: float = 5e-2
    pca_images: int = 6


@dataclass
class DemoSettings:
    """Everything ``franca demo`` does, resolved from the command line by :mod:`franca.cli.demo`."""

    output_dir: Path = Path("runs/demo")
    data_dir: Path | None = None  # default: output_dir / "data"
    num_images: int = 10000
    val_images: int = 1000
    size: int = 32
    iterations: int | None = None  # default: the preset's (CPU) or CUDA_ITERATIONS (CUDA)
    batch_size: int | None = None  # default: the preset's (CPU) or CUDA_BATCH_SIZE (CUDA)
    time_budget_min: float = 10.0
    ablation: bool = False
    device: str = "auto"
    quick: bool = False
    eval_only: bool = False  # evaluate the run directories as they are, without training
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    data_seed: int = 0
    style: str = "textured-large"  # synthetic data preset (franca.data.synth.STYLES): a texture per class, large objects
    workers: int | None = None  # data generation / loading processes (default: CPU count, at most 4)
    progress: bool = True
    eval: EvalSettings = field(default_factory=EvalSettings)

    @property
    def data_path(self) -> Path:
        """Root of the synthetic data set."""
        return Path(self.data_dir) if self.data_dir is not None else Path(self.output_dir) / "data"


CUDA_ITERATIONS = 2500
CUDA_BATCH_SIZE = 128
QUICK = {"num_images": 2000, "val_images": 500, "iterations": 60}


def quick_eval_settings() -> EvalSettings:
    """Smaller evaluation for ``--quick``: fewer k-means restarts and RASA steps."""
    return EvalSettings(
        linear_epochs=5, overcluster_seeds=(0,), rasa_iterations=3, rasa_epochs=2, rasa_train_images=500
    )


# ---------------------------------------------------------------------------------------------------- progress
class PhaseLog:
    """Prints ``[demo 1m23s] message`` lines (through tqdm, so bars are not broken) and records phase timings."""

    def __init__(self, enabled: bool = True) -> None:
        self.start = time.perf_counter()
        self.enabled = enabled
        self.timings: dict[str, float] = {}
        self._phase: tuple[str, float] | None = None

    def elapsed(self) -> float:
        """Seconds since the demo started."""
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        """Print one progress line with the elapsed time."""
        if not self.enabled:
            return
        from franca.core.progress import ProgressBar

        ProgressBar.write(f"[demo {format_duration(self.elapsed())}] {message}", file=sys.stdout)
        sys.stdout.flush()

    def phase(self, name: str, message: str) -> None:
        """Close the running phase (recording its duration) and start ``name``."""
        self.end_phase()
        self._phase = (name, time.perf_counter())
        self(message)

    def end_phase(self) -> None:
        """Record the duration of the running phase, if any."""
        if self._phase is not None:
            name, started = self._phase
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started
            self._phase = None


def format_duration(seconds: float) -> str:
    """``83.2`` -> ``"1m23s"``, ``7.5`` -> ``"7.5s"``, ``3725`` -> ``"1h02m05s"``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s"


# ---------------------------------------------------------------------------------------------------- data
def prepare_data(settings: DemoSettings, log: PhaseLog) -> Any:
    """Reuse the complete synthetic data set in ``settings.data_path`` or generate it; returns its SynthInfo.

    A complete data set of other sizes is never overwritten: that raises ConfigError naming the mismatch.
    """
    from franca.data.synth import STYLES, generate_synthetic_dataset, read_synth_info

    check_choice("--style", settings.style, STYLES)
    style = STYLES[settings.style]
    root = settings.data_path
    existing = None
    if (root / "classes.json").is_file():
        try:
            existing = read_synth_info(root)
        except DataError:
            existing = None  # an interrupted or foreign data set: generation replaces or refuses it
    wanted = (settings.num_images, settings.val_images, settings.size, settings.data_seed)
    if existing is not None:
        found = (existing.num_train, existing.num_val, existing.size, existing.seed)
        if found == wanted and existing.style != style:
            found_style = next(
                (name for name, preset in STYLES.items() if preset == existing.style), "custom"
            )
            raise ConfigError(
                f"{root} holds a synthetic data set of style {found_style!r}, not the requested "
                f"{settings.style!r}; pass --style {found_style}, another --data or --output-dir, or delete it"
            )
        if found != wanted:
            raise ConfigError(
                f"{root} holds a synthetic data set of {found[0]} train / {found[1]} val images at {found[2]} px "
                f"(seed {found[3]}), not the requested {wanted[0]} / {wanted[1]} at {wanted[2]} px (seed {wanted[3]}); "
                "pass matching --num-images/--val-images/--size, another --data or --output-dir, or delete it"
            )
        log(
            f"data: reusing {root} ({existing.num_train} train / {existing.num_val} val images, {existing.size} px)"
        )
        return existing
    workers = settings.workers or max(1, min(4, os.cpu_count() or 1))
    log(
        f"data: generating {settings.num_images} train / {settings.val_images} val synthetic images "
        f"({settings.size} px, style {settings.style}) in {root} with {workers} process(es)"
    )
    return generate_synthetic_dataset(
        root,
        num_train=settings.num_images,
        num_val=settings.val_images,
        size=settings.size,
        seed=settings.data_seed,
        workers=workers,
        progress=settings.progress,
        style=style,
    )


@dataclass
class SplitData:
    """One split held in memory: images uint8 [N, 3, S, S], masks uint8 [N, S, S], class labels int64 [N]."""

    images: Tensor
    masks: Tensor
    labels: Tensor
    paths: list[Path]
    num_skipped: int = 0


class _SplitDataset(torch.utils.data.Dataset):
    """(image uint8 [3, S, S], mask uint8 [S, S], class id, index) of a synthetic split; None when unreadable."""

    def __init__(self, root: Path, split: str, size: int) -> None:
        from franca.eval.segmentation_data import SegmentationDataset

        self.segmentation = SegmentationDataset(root, split=split, layout="synth", size=size)
        names = list(self.segmentation.class_names)  # ("background", shape classes...)
        self.class_of_folder = {name: index - 1 for index, name in enumerate(names) if index > 0}
        self.size = size

    def __len__(self) -> int:
        return len(self.segmentation)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int, int] | None:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        from franca.data.images import UnreadableImageError
        from franca.eval.segmentation_data import UnreadableMaskError

        try:
            image, mask = self.segmentation.load_pair(index)
        except (UnreadableImageError, UnreadableMaskError):
            return None
        image_tensor = TF.pil_to_tensor(image)
        mask_tensor = torch.from_numpy(mask).unsqueeze(0)
        if tuple(image_tensor.shape[-2:]) != (self.size, self.size):
            image_tensor = TF.resize(
                image_tensor, [self.size, self.size], InterpolationMode.BILINEAR, antialias=True
            )
            mask_tensor = TF.resize(mask_tensor, [self.size, self.size], InterpolationMode.NEAREST)
        label = self.class_of_folder[self.segmentation.samples[index].image.parent.name]
        return image_tensor, mask_tensor[0].to(torch.uint8), label, index


def _collate_split(batch: Sequence[tuple[Tensor, Tensor, int, int] | None]) -> tuple[Any, ...]:
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, None, None, skipped
    images, masks, labels, indices = zip(*kept)
    return torch.stack(images), torch.stack(masks), torch.tensor(labels), torch.tensor(indices), skipped


def load_split(
    root: Path,
    split: str,
    size: int,
    workers: int = 0,
    progress: bool = True,
    max_images: int | None = None,
    seed: int = 0,
) -> SplitData:
    """Read the images and masks of a synthetic split once into memory (unreadable pairs skipped and counted).

    ``max_images`` keeps a seeded uniform subset of the split (in path order), e.g. to bound feature extraction.
    """
    from franca.core.progress import ProgressBar

    dataset: torch.utils.data.Dataset = _SplitDataset(root, split, size)
    samples = dataset.segmentation.samples
    if max_images is not None and max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, seeded_subset(range(len(dataset)), max_images, seed))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=256, num_workers=workers, collate_fn=_collate_split, shuffle=False
    )
    images, masks, labels, indices, skipped = [], [], [], [], 0
    for batch_images, batch_masks, batch_labels, batch_indices, batch_skipped in ProgressBar(
        loader, desc=f"load {split}", unit="batch", disable=not progress, leave=False
    ):
        skipped += batch_skipped
        if batch_images is None:
            continue
        images.append(batch_images)
        masks.append(batch_masks)
        labels.append(batch_labels)
        indices.append(batch_indices)
    if not images:
        raise DataError(f"{root}: no readable {split} image; regenerate the data set (delete the folder)")
    order = torch.cat(indices)
    return SplitData(
        images=torch.cat(images),
        masks=torch.cat(masks),
        labels=torch.cat(labels).long(),
        paths=[samples[int(i)].image for i in order],
        num_skipped=skipped,
    )


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class TrainOutcome:
    """What a (possibly resumed, possibly budget-stopped) training run left: where, how far, how long."""

    mode: str
    run_dir: Path
    iteration: int
    iterations: int
    seconds: float
    resumed_from: int
    completed: bool
    stopped_by_budget: bool
    images_per_s: float | None
    config: Any

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts of the run."""
        return {
            "mode": self.mode,
            "run_dir": str(self.run_dir),
            "iteration": self.iteration,
            "iterations": self.iterations,
            "completed": self.completed,
            "stopped_by_time_budget": self.stopped_by_budget,
            "resumed_from_iteration": self.resumed_from,
            "train_seconds_this_invocation": self.seconds,
            "images_per_s": self.images_per_s,
            **dino_plateau(self.run_dir, self.config),
        }


def _round_to(value: float, multiple: int, minimum: int) -> int:
    return max(minimum, int(round(value / multiple)) * multiple)


def training_overrides(
    settings: DemoSettings, data_path: Path, run_dir: Path, device_type: str, mode: str = "slice"
) -> list[str]:
    """Dotlist overrides of the tiny_cpu preset for this demo run (data, size, length, batch, heads mode).

    The schedule lengths (warmups, freezing of the last layer) follow the number of iterations in the preset's
    proportions (:func:`franca.train.config.load_config` scales them); on CUDA the batch and the run are larger.
    """
    from franca.train.config import load_config

    preset = load_config(PRESET)
    cuda = device_type == "cuda"
    iterations = settings.iterations or (CUDA_ITERATIONS if cuda else preset.train.iterations)
    batch = settings.batch_size or (CUDA_BATCH_SIZE if cuda else preset.train.batch_size_per_device)
    if iterations < 1 or batch < 1:
        raise ConfigError(f"--iterations and the batch size must be >= 1 (got {iterations} and {batch})")
    patch = preset.model.patch_size
    global_size = _round_to(settings.size, patch, patch)
    local_size = _round_to(settings.size / 2, patch, patch)
    chunk = min(iterations, max(20, math.ceil(iterations / 8)))  # training runs (and checkpoints) in chunks
    overrides = [
        f"data.path={data_path}",
        f"train.output_dir={run_dir}",
        f"train.seed={settings.seed}",
        f"train.iterations={iterations}",
        f"train.batch_size_per_device={batch}",
        f"train.checkpoint_every={chunk}",
        f"train.log_every={max(1, min(preset.train.log_every, iterations // 20 or 1))}",
        f"model.img_size={global_size}",
        f"crops.global_size={global_size}",
        f"crops.local_size={local_size}",
        f"heads.mode={mode}",
    ]
    if cuda:  # the tiny model outruns the CPU pipeline: workers only crop and flip, the GPU does the rest
        overrides.append(f"train.num_workers={max(1, min(8, (os.cpu_count() or 2) - 1))}")
        overrides.append("crops.augment_on_device=true")
    return overrides + list(settings.overrides)


_BOOKKEEPING_KEYS = ("output_dir", "num_workers", "log_every", "keep_last")


def _comparable(config_dict: dict[str, Any]) -> dict[str, Any]:
    train = {k: v for k, v in config_dict["train"].items() if k not in _BOOKKEEPING_KEYS}
    return {**config_dict, "train": train}


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(dict.fromkeys([*old, *new])):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{prefix[:-1]}: {old!r} in the run, {new!r} now"


def check_resumable(run_dir: Path, config: Any) -> None:
    """Raise ConfigError when ``run_dir`` holds checkpoints of a run with other settings (it would resume wrongly)."""
    from franca.train.checkpointing import list_checkpoints
    from franca.train.config import config_to_dict, load_config

    saved = run_dir / "config.yaml"
    if not list_checkpoints(run_dir) or not saved.is_file():
        return
    try:
        old = config_to_dict(load_config(saved))
    except ConfigError as error:
        raise ConfigError(
            f"{saved} cannot be read ({error}); delete {run_dir} to start the run afresh"
        ) from None
    difference = _first_difference(_comparable(old), _comparable(config_to_dict(config)))
    if difference:
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({difference}); use another --output-dir or delete "
            f"{run_dir} to train afresh"
        )


def train_with_budget(
    config: Any, run_dir: Path, budget_s: float, log: PhaseLog, progress: bool = True, mode: str = "slice"
) -> TrainOutcome:
    """Train ``config`` into ``run_dir`` within ``budget_s`` seconds (:class:`~franca.train.callbacks.TimeBudget`).

    The run stops when its next step would end past the budget (the first step always runs), with a checkpoint and
    exported backbone of the iteration reached, so a re-run continues the schedule; a line is logged at every
    checkpoint. A run directory with checkpoints of the same settings is resumed (a finished run is not touched).
    """
    from franca.train.checkpointing import list_checkpoints
    from franca.train.trainer import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    check_resumable(run_dir, config)
    total = config.train.iterations
    checkpoints = list_checkpoints(run_dir)
    start_iteration = checkpoints[-1][0] if checkpoints else 0
    backbone = run_dir / "teacher_backbone.safetensors"
    if start_iteration >= total and backbone.is_file():
        log(f"train[{mode}]: {run_dir} is already trained ({total} iterations); reusing it")
        return TrainOutcome(
            mode,
            run_dir,
            start_iteration,
            total,
            0.0,
            start_iteration,
            True,
            False,
            _last_rate(run_dir),
            config,
        )
    if start_iteration:
        log(f"train[{mode}]: resuming {run_dir} at iteration {start_iteration}/{total}")
    started = time.perf_counter()
    watchers = [TimeBudget(budget_s), _ChunkLog(log, mode, total)]
    result = Trainer(config, run_dir, progress=progress, callbacks=watchers).fit()
    if result.stopped is not None:
        log(
            f"train[{mode}]: time budget of {format_duration(budget_s)} used up at iteration {result.iteration}/"
            f"{total}; evaluating this checkpoint (the schedule is cut short; re-run the same command to continue "
            "training)"
        )
    return TrainOutcome(
        mode,
        run_dir,
        result.iteration,
        total,
        time.perf_counter() - started,
        start_iteration,
        result.iteration >= total,
        result.stopped is not None,
        _last_rate(run_dir),
        config,
    )


class _ChunkLog(Callback):
    """One line per checkpoint: iteration, loss, images/s, time so far and left."""

    def __init__(self, log: PhaseLog, mode: str, total: int) -> None:
        self.log, self.mode, self.total = log, mode, total
        self.started, self.first, self.last = 0.0, 0, {}

    def on_fit_start(self, trainer: Any) -> None:
        self.started, self.first = time.perf_counter(), trainer.iteration

    def on_log(self, trainer: Any, record: dict[str, Any]) -> None:
        self.last = record

    def on_checkpoint(self, trainer: Any, path: Path | None) -> None:
        iteration, elapsed = trainer.iteration, time.perf_counter() - self.started
        eta = elapsed / max(iteration - self.first, 1) * (self.total - iteration)
        loss, rate = self.last.get("loss"), self.last.get("images_per_s")
        loss_text = f", loss {loss:.3f}" if isinstance(loss, float) and math.isfinite(loss) else ""
        rate_text = f", {rate:.1f} img/s" if isinstance(rate, float) else ""
        left = f", ~{format_duration(eta)} left" if iteration < self.total else ""
        self.log(
            f"train[{self.mode}]: iteration {iteration}/{self.total}{loss_text}{rate_text}, "
            f"{format_duration(elapsed)} so far{left}"
        )


# A final DINO loss within this fraction of its uniform value sum_j ln K_j counts as "still on the plateau".
PLATEAU_FRACTION = 0.02


def uniform_dino_losses(config: Any) -> list[float]:
    """``ln K_j`` per level: the DINO loss of a student that predicts the uniform distribution (any targets)."""
    from franca.models.heads import matryoshka_prototype_counts
    from franca.models.vision_transformer import ARCHITECTURES

    heads = config.heads
    if heads.mode == "dinov2":
        return [math.log(heads.n_prototypes)]
    embed_dim = config.model.embed_dim or ARCHITECTURES[config.model.arch]["embed_dim"]
    widths = heads.level_widths(embed_dim)
    return [math.log(k) for k in matryoshka_prototype_counts(widths, heads.n_prototypes)]


def dino_plateau(run_dir: Path, config: Any, last: int = 5) -> dict[str, Any]:
    """How far the DINO loss got below its uniform value ``sum_j ln K_j`` (median of the last ``last`` logs).

    A student whose predictions are uniform scores exactly ``sum_j ln K_j`` whatever the targets, so a final loss
    at that value means the run has not started to learn image-level clusters (docs/demo-learning.md).
    """
    from franca.report import load_metrics_records

    uniform = sum(uniform_dino_losses(config))
    path = run_dir / "metrics.jsonl"
    values = [r.get("dino_loss") for r in load_metrics_records(path)] if path.is_file() else []
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)][-last:]
    final = float(np.median(values)) if values else None
    return {
        "uniform_dino_loss": uniform,
        "final_dino_loss": final,
        "dino_nats_below_uniform": None if final is None else uniform - final,
        "dino_on_plateau": None if final is None else uniform - final < PLATEAU_FRACTION * uniform,
    }


def _last_rate(run_dir: Path) -> float | None:
    """Median images/s over the logged steps of a run (None when nothing was logged)."""
    from franca.report import load_metrics_records

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = [r.get("images_per_s") for r in load_metrics_records(path) if r.get("iteration", 0) > 1]
    rates = [float(r) for r in rates if isinstance(r, (int, float)) and math.isfinite(r)]
    return float(np.median(rates)) if rates else None


def existing_run(run_dir: Path, log: PhaseLog, mode: str = "slice") -> TrainOutcome:
    """The run in ``run_dir`` as it is (``--eval-only``): its own config.yaml and exported backbone, no training."""
    from franca.core.errors import CheckpointError
    from franca.train.checkpointing import list_checkpoints
    from franca.train.config import load_config

    config_path, backbone = run_dir / "config.yaml", run_dir / "teacher_backbone.safetensors"
    checkpoints = list_checkpoints(run_dir)
    if not (config_path.is_file() and backbone.is_file() and checkpoints):
        raise CheckpointError(
            f"--eval-only: {run_dir} holds no trained run (config.yaml, checkpoints/, teacher_backbone.safetensors); "
            "run the demo without --eval-only first"
        )
    config = load_config(config_path)
    iteration, total = checkpoints[-1][0], config.train.iterations
    log(f"train[{mode}]: --eval-only: evaluating {run_dir} as it is (iteration {iteration}/{total})")
    return TrainOutcome(
        mode,
        run_dir,
        iteration,
        total,
        0.0,
        iteration,
        iteration >= total,
        False,
        _last_rate(run_dir),
        config,
    )


def obtain_run(
    settings: DemoSettings, config: Any, run_dir: Path, log: PhaseLog, mode: str = "slice"
) -> TrainOutcome:
    """Train (or resume) ``config`` in ``run_dir`` within the time budget, or take the run as it is (eval-only)."""
    if settings.eval_only:
        return existing_run(run_dir, log, mode)
    return train_with_budget(config, run_dir, settings.time_budget_min * 60.0, log, settings.progress, mode)


def random_init_backbone(config: Any) -> nn.Module:
    """The backbone at the run's initial weights, built exactly as the trainer builds it (seed, then the pair)."""
    from franca.train.ssl_model import build_student_teacher

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        _, teacher = build_student_teacher(config)
    backbone = teacher.backbone
    backbone.requires_grad_(False)
    return backbone.eval()


# ---------------------------------------------------------------------------------------------------- protocols
# The features of a split come from franca.features (TensorImages over the uint8 images, ImageNet-normalised on the
# device) and every protocol is franca.eval's scoring; the functions below only pick the demo's settings.
FEATURE_TOKENS: tuple[str, ...] = ("cls", "patch", "pooled")
SEGMENTATION_CLASS_NAMES: tuple[str, ...] = ("background", *CLASS_NAMES)


def _search_device(device: torch.device) -> torch.device:
    """Where the nearest-neighbour searches run: the GPU when the demo runs on one, else the CPU (with the exact
    torch search for HummingBird: on CPU it beat faiss ``IndexFlatIP`` by ~2x for the shapes here, tens of thousands
    of queries against a 32k bank)."""
    return device if device.type == "cuda" else torch.device("cpu")


def run_knn(train: Features, val: Features, settings: EvalSettings, device: torch.device) -> dict[str, Any]:
    """k-NN top-1/top-5 on the CLS token (train split as memory; the features' targets are the class labels)."""
    results = knn_classify(
        train.cls,
        train.targets,
        val.cls,
        val.targets,
        ks=(settings.knn_k,),
        temperature=settings.knn_temperature,
        num_classes=NUM_SHAPE_CLASSES,
        device=_search_device(device),
    )
    return {**results, "top1": results[f"k{settings.knn_k}"]["top1"]}


def run_linear(
    train: Features, val: Features, settings: EvalSettings, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """Linear probe on precomputed CLS (+ mean patch) features; head chosen on a held-out part of train."""
    return train_linear_probe(
        {"cls_blocks": train.cls, "pooled": train.pooled},
        train.targets,
        {"cls_blocks": val.cls, "pooled": val.pooled},
        val.targets,
        feature_sets=settings.linear_feature_sets,
        learning_rates=settings.linear_lrs,
        epochs=settings.linear_epochs,
        batch_size=settings.linear_batch_size,
        holdout_fraction=settings.linear_holdout,
        num_classes=NUM_SHAPE_CLASSES,
        embed_dim=int(train.cls.shape[1]),
        seed=seed,
        device=device,
    )


def run_sliced(
    train: Features, val: Features, settings: EvalSettings, device: torch.device, pca: bool = True
) -> dict[str, Any]:
    """k-NN on the first m dims of the CLS token (and on its top-m PCA directions) for m = d/16 ... d."""
    return sliced_knn(
        train.cls,
        train.targets,
        val.cls,
        val.targets,
        ks=(settings.knn_k,),
        temperature=settings.knn_temperature,
        pca=pca,
        num_classes=NUM_SHAPE_CLASSES,
        device=_search_device(device),
    )


def sliced_curve(results: dict[str, Any], series: str, k: int) -> dict[int, float]:
    """{dims: top-1} of one series ("sliced" or "pca") of a :func:`franca.eval.sliced.sliced_knn` result."""
    return {int(m): float(results[series][str(m)][f"k{k}"]["top1"]) for m in results["dims"]}


def run_hummingbird(
    train_patch: Tensor,
    val_patch: Tensor,
    data: DemoData,
    settings: EvalSettings,
    device: torch.device,
    projection: Tensor | None = None,
) -> dict[str, Any]:
    """HummingBird mIoU (percent) of val patch grids [N, h, w, D] against the demo's memory bank of train patches.

    ``projection`` [D, D] (a folded RASA matrix) maps bank and query features as ``z @ projection.T`` first.
    """
    result = score_hummingbird(
        train_patch,
        data.train.masks,
        val_patch,
        data.val.masks,
        HummingbirdSettings(
            k=settings.hummingbird_k, temperature=settings.hummingbird_temperature, search="torch"
        ),
        num_classes=data.num_classes,
        bank=data.bank,
        class_names=SEGMENTATION_CLASS_NAMES,
        device=_search_device(device),
        projection=projection,
    )
    return {
        "miou": result.miou,
        "pixel_accuracy": result.pixel_accuracy,
        "per_class_iou": result.per_class_iou,
        "k": result.k,
        "temperature": result.temperature,
        "memory_patches": result.memory_patches_total,
        "labelled_train_patches": data.bank.num_labelled,
        "num_val_images": result.num_val_images,
        "tokens": "rasa" if projection is not None else "patch",
    }


def run_overclustering(
    val_patch: Tensor, val_masks: Tensor, settings: EvalSettings, num_classes: int
) -> dict[str, Any]:
    """Overclustering mIoU (percent, mean over seeds) of the val patch features for each K, at the mask size."""
    overclustering = OverclusteringSettings(
        clusters=settings.overcluster_ks,
        seeds=settings.overcluster_seeds,
        pca_dim=settings.overcluster_pca_dim,
        mask_size=int(val_masks.shape[-1]),
        niter=settings.kmeans_iterations,
        nredo=settings.kmeans_restarts,
    )
    result = score_overclustering(val_patch, val_masks, overclustering, num_classes=num_classes)
    results: dict[str, Any] = {
        f"k{k}": {"miou": score.miou, "miou_std": score.miou_std, "miou_per_seed": score.miou_per_seed}
        for k, score in result.scores.items()
    }
    results.update(
        seeds=result.seeds,
        pca_dim=result.pca_dim,
        kmeans_iterations=settings.kmeans_iterations,
        kmeans_restarts=settings.kmeans_restarts,
        num_patches=result.num_patches,
    )
    return results


def run_rasa(
    train_patch: Tensor,
    val_patch: Tensor,
    settings: EvalSettings,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
) -> Any:
    """RASA on frozen patch features: trained on a seeded subset of train images, R^2 measured on the val split."""
    from franca.rasa import train_rasa

    count, rows, cols, dim = train_patch.shape
    generator = torch.Generator().manual_seed(seed)
    subset = (
        torch.randperm(count, generator=generator)[: min(count, settings.rasa_train_images)].sort().values
    )
    return train_rasa(
        None,
        train_patch[subset].reshape(-1, rows * cols, dim),
        eval_data=val_patch.reshape(-1, rows * cols, dim),
        grid=(rows, cols),
        iterations=settings.rasa_iterations,
        epochs_per_iteration=settings.rasa_epochs,
        lr=settings.rasa_lr,
        batch_size=settings.rasa_batch_size,
        device=device,
        seed=seed,
        progress=progress,
    )


def pca_map_images(patch: Tensor, size: int) -> list[np.ndarray]:
    """RGB maps [size, size, 3] uint8 of the first 3 principal components of patch grids [n, h, w, D], fitted jointly."""
    return [np.asarray(image) for image in score_pca(patch).images(size)]


def colour_mask(mask: Tensor) -> np.ndarray:
    """A label mask [S, S] (0 background, 1..10 shapes, 255 ignore) as an RGB image [S, S, 3] uint8."""
    values = mask.numpy().astype(np.int64)
    rgb = np.full((*values.shape, 3), 255, dtype=np.uint8)
    valid = values < len(MASK_PALETTE)
    rgb[valid] = MASK_PALETTE[values[valid]]
    return rgb


# ---------------------------------------------------------------------------------------------------- evaluation
@dataclass
class DemoData:
    """Both splits in memory plus the shared HummingBird memory bank (a seeded subset of the labelled train patches)."""

    train: SplitData
    val: SplitData
    bank: LabelBank
    num_classes: int  # segmentation classes: background + shapes
    patch_size: int
    train_dir: Path  # the training images (data.path of the runs)


def evaluate_backbone(
    name: str,
    model: nn.Module,
    data: DemoData,
    settings: DemoSettings,
    device: torch.device,
    log: PhaseLog,
    full: bool = True,
) -> tuple[dict[str, Any], Features, Features]:
    """Extract features once and run every protocol on them (``full=False``: k-NN, sliced k-NN, HummingBird only).

    Returns (results, train features, val features): :class:`franca.features.Features` with the CLS token, the patch
    grid and the mean patch token, the class labels as targets.
    """
    evaluation = settings.eval
    log(
        f"evaluate[{name}]: extracting features of {len(data.train.labels)} train + {len(data.val.labels)} val images"
    )
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}

    def timed(key: str, function: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = function()
        timings[key] = time.perf_counter() - started
        return value

    def features(split: SplitData, description: str) -> Features:
        images = TensorImages(split.images, split.labels, evaluation.batch_size)
        return extract_features(
            model.to(device), images, FEATURE_TOKENS, device, desc=description, progress=settings.progress
        )

    train, val = timed(
        "features", lambda: (features(data.train, f"{name}: train"), features(data.val, f"{name}: val"))
    )
    results["knn"] = timed("knn", lambda: run_knn(train, val, evaluation, device))
    results["sliced_knn"] = timed("sliced_knn", lambda: run_sliced(train, val, evaluation, device, pca=full))
    log(
        f"evaluate[{name}]: HummingBird ({data.bank.indices.numel()} memory patches, k={evaluation.hummingbird_k})"
    )
    results["hummingbird"] = timed(
        "hummingbird", lambda: run_hummingbird(train.patch, val.patch, data, evaluation, device)
    )
    if full:
        log(
            f"evaluate[{name}]: linear probe, overclustering (K = {', '.join(map(str, evaluation.overcluster_ks))})"
        )
        results["linear"] = timed(
            "linear", lambda: run_linear(train, val, evaluation, device, seed=settings.seed)
        )
        results["linear"]["heads"] = [
            {k: v for k, v in row.items() if k != "name"} for row in results["linear"]["heads"]
        ]
        results["overclustering"] = timed(
            "overclustering",
            lambda: run_overclustering(val.patch, data.val.masks, evaluation, data.num_classes),
        )
    results["seconds"] = timings
    log(
        f"evaluate[{name}]: k-NN top-1 {results['knn']['top1']:.1f}, HummingBird mIoU "
        f"{results['hummingbird']['miou']:.1f}"
        + (f", linear top-1 {results['linear']['top1']:.1f}" if full else "")
    )
    return results, train, val


def summary_rows(
    trained: dict[str, Any], random: dict[str, Any], evaluation: EvalSettings
) -> list[dict[str, Any]]:
    """Rows (metric, trained, random init) of the summary table; all metrics in percent, higher is better."""
    smallest = str(min(int(m) for m in trained["sliced_knn"]["dims"]))
    k = evaluation.knn_k

    def sliced_small(results: dict[str, Any]) -> float:
        return results["sliced_knn"]["sliced"][smallest][f"k{k}"]["top1"]

    rows = [
        (f"k-NN top-1 (k={k}, CLS token), %", lambda r: r["knn"]["top1"]),
        ("linear probe top-1, %", lambda r: r["linear"]["top1"]),
        ("HummingBird mIoU, %", lambda r: r["hummingbird"]["miou"]),
    ]
    rows += [
        (f"overclustering mIoU K={kk}, %", lambda r, kk=kk: r["overclustering"][f"k{kk}"]["miou"])
        for kk in evaluation.overcluster_ks
    ]
    rows.append((f"sliced k-NN top-1 at {smallest} dims (d/16), %", sliced_small))
    return [
        {"metric": name, "trained": round(get(trained), 2), "random_init": round(get(random), 2)}
        for name, get in rows
    ]


# ---------------------------------------------------------------------------------------------------- report
def _figures(
    out: Path,
    outcome: TrainOutcome,
    trained: dict[str, Any],
    random: dict[str, Any],
    rasa_curve: list[dict[str, Any]],
    pca_rows: list[list[Any]],
    pca_columns: list[str],
    evaluation: EvalSettings,
    ablation: dict[str, Any] | None,
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
    if ablation:
        figures["ablation_sliced"] = plot_sliced_knn(
            {mode: {"sliced": entry["sliced_curve"]} for mode, entry in ablation["modes"].items()},
            figures_dir / "ablation_sliced_knn.png",
            title=f"Ablation: k-NN top-1 (k={k}) on the first m dims of the CLS token",
        )
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
        sections.append(_ablation_section(ablation, figures, evaluation))
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


def _ablation_section(ablation: dict[str, Any], figures: dict[str, Path], evaluation: EvalSettings):
    from franca.report import ReportImage, ReportSection

    table = []
    for mode, entry in ablation["modes"].items():
        table.append(
            {
                "heads.mode": mode,
                "what": MODE_DESCRIPTIONS[mode],
                "iterations": f"{entry['training']['iteration']}/{entry['training']['iterations']}",
                "k-NN top-1": entry["knn_top1"],
                f"sliced k-NN top-1 at {ablation['smallest_dims']} dims": entry["sliced_smallest_top1"],
                "HummingBird mIoU": entry["hummingbird_miou"],
            }
        )
    table.append(
        {
            "heads.mode": "(random init)",
            "what": "the same backbone before training",
            "iterations": "0",
            "k-NN top-1": ablation["random_init"]["knn_top1"],
            f"sliced k-NN top-1 at {ablation['smallest_dims']} dims": ablation["random_init"][
                "sliced_smallest_top1"
            ],
            "HummingBird mIoU": ablation["random_init"]["hummingbird_miou"],
        }
    )
    return ReportSection(
        "Ablation: Matryoshka head modes and the DINOv2 baseline",
        text=(
            "Each mode is trained with the same preset, iterations, batch and time budget, and evaluated with the "
            f"same protocols as above. One run per mode (seed {ablation['seed']}): the seed-to-seed spread was not "
            "measured, so small differences may be noise.\n\n" + ablation["verdict"]
        ),
        table=table,
        images=[ReportImage(figures["ablation_sliced"], "Ablation: sliced k-NN per head mode")],
    )


def ablation_verdict(modes: dict[str, Any]) -> str:
    """Plain sentences answering the two questions of the ablation from the measured numbers."""
    parts = []
    if "slice" in modes and "tied" in modes:
        s, t = modes["slice"], modes["tied"]
        better = s["sliced_smallest_top1"] - t["sliced_smallest_top1"]
        parts.append(
            "Dedicated head per nesting level (slice) vs one tied head: k-NN top-1 "
            f"{s['knn_top1']:.1f} vs {t['knn_top1']:.1f}, at the smallest level {s['sliced_smallest_top1']:.1f} vs "
            f"{t['sliced_smallest_top1']:.1f} ({better:+.1f}), HummingBird {s['hummingbird_miou']:.1f} vs "
            f"{t['hummingbird_miou']:.1f}."
        )
    if "slice" in modes and "dinov2" in modes:
        s, d = modes["slice"], modes["dinov2"]
        parts.append(
            "Franca (slice) vs the DINOv2 single-head baseline: k-NN top-1 "
            f"{s['knn_top1']:.1f} vs {d['knn_top1']:.1f} ({s['knn_top1'] - d['knn_top1']:+.1f}), at the smallest "
            f"level {s['sliced_smallest_top1']:.1f} vs {d['sliced_smallest_top1']:.1f}, HummingBird "
            f"{s['hummingbird_miou']:.1f} vs {d['hummingbird_miou']:.1f} "
            f"({s['hummingbird_miou'] - d['hummingbird_miou']:+.1f})."
        )
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------- main flow
def resolve_device(name: str) -> torch.device:
    """The demo's device; ``cpu`` also hides GPUs from the trainer (it picks CUDA whenever one is visible)."""
    from franca.core.runtime import resolve_device as resolve

    if name == "cpu" and not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read when CUDA first initialises, i.e. by the trainer
    device = resolve(name)
    if device.type == "cuda" and device.index not in (None, 0):
        raise ConfigError(
            f"--device {name}: the demo trains on the first visible GPU; use CUDA_VISIBLE_DEVICES"
        )
    return device


def _abbreviated(results: dict[str, Any], k: int) -> dict[str, Any]:
    smallest = str(min(int(m) for m in results["sliced_knn"]["dims"]))
    return {
        "knn_top1": round(results["knn"]["top1"], 2),
        "sliced_smallest_top1": round(results["sliced_knn"]["sliced"][smallest][f"k{k}"]["top1"], 2),
        "sliced_curve": sliced_curve(results["sliced_knn"], "sliced", k),
        "hummingbird_miou": round(results["hummingbird"]["miou"], 2),
    }


def run_ablation(
    settings: DemoSettings,
    main_outcome: TrainOutcome,
    main_trained: dict[str, Any],
    random_results: dict[str, Any],
    data: DemoData,
    device: torch.device,
    log: PhaseLog,
) -> dict[str, Any]:
    """Train the other head modes with the main run's budget and evaluate them (k-NN, sliced k-NN, HummingBird)."""
    from franca.models.checkpoints import load_backbone
    from franca.train.config import load_config

    k = settings.eval.knn_k
    modes: dict[str, Any] = {"slice": {**_abbreviated(main_trained, k), "training": main_outcome.summary()}}
    for mode in ABLATION_MODES:
        if mode == "slice":
            continue
        run_dir = Path(settings.output_dir) / "ablation" / mode
        log.phase(f"ablation {mode}", f"ablation[{mode}]: training ({MODE_DESCRIPTIONS[mode]})")
        config = load_config(PRESET, training_overrides(settings, data.train_dir, run_dir, device.type, mode))
        outcome = obtain_run(settings, config, run_dir, log, mode)
        model = load_backbone(run_dir / "teacher_backbone.safetensors")
        results, _, _ = evaluate_backbone(mode, model, data, settings, device, log, full=False)
        modes[mode] = {
            **_abbreviated(results, k),
            "training": outcome.summary(),
            "seconds": results["seconds"],
        }
        del model
    dims = min(int(m) for m in main_trained["sliced_knn"]["dims"])
    ablation = {
        "modes": modes,
        "random_init": _abbreviated(random_results, k),
        "smallest_dims": dims,
        "seed": settings.seed,
        "budget": {
            "iterations": main_outcome.iterations,
            "batch_size": main_outcome.config.train.batch_size_per_device,
            "time_budget_min": settings.time_budget_min,
        },
    }
    ablation["verdict"] = ablation_verdict(modes)
    return ablation


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
        ablation,
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
        write_metrics_json(out / "ablation.json", ablation)
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
        ablation_table = [
            {
                "heads.mode": mode,
                "k-NN top-1": entry["knn_top1"],
                f"k-NN @{ablation['smallest_dims']} dims": entry["sliced_smallest_top1"],
                "HummingBird mIoU": entry["hummingbird_miou"],
                "iterations": entry["training"]["iteration"],
            }
            for mode, entry in ablation["modes"].items()
        ]
        lines += ["", format_table(ablation_table, None, precision=1)]
    lines += [f"note: {note}" for note in metrics.get("notes", [])]
    metrics_path = Path(metrics["report"]).parent / "metrics.json"
    total = metrics["timings"]["total"]
    lines.append(
        f"\nreport: {metrics['report']}\nmetrics: {metrics_path}\ntotal time: {format_duration(total)}"
    )
    return "\n".join(lines)


def apply_quick(settings: DemoSettings, explicit: set[str]) -> DemoSettings:
    """``--quick``: a small data set, a short run and a lighter evaluation, unless given explicitly."""
    if not settings.quick:
        return settings
    changes = {name: value for name, value in QUICK.items() if name not in explicit}
    return replace(settings, eval=quick_eval_settings(), **changes)
