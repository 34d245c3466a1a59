"""k-NN monitoring of a pre-training run, as DINOv2 users know it: how well the teacher's CLS features classify.

Every ``eval.every`` iterations (and at the end of a fit) the teacher backbone's CLS features of a labelled train and
val folder are extracted (:func:`franca.features.extract_features`) and the val images are classified by a weighted
k-NN vote over the train images (:func:`franca.eval.knn.knn_classify`, the DINOv2 protocol: cosine similarity,
``softmax(sim / T)`` weights). :func:`knn_monitor` builds the callback from a run's ``eval:`` config section (see
:class:`franca.train.config.EvalConfig`); ``franca train`` attaches it when ``eval.every`` > 0, and in Python::

    from franca.apps.monitor import knn_monitor
    from franca.train.trainer import train

    train(config, callbacks=[knn_monitor(config)])

Each evaluation is a ``metrics.jsonl`` record ``{"iteration", "knn_top1", "knn_top5", "knn_time_s"}`` (percent) and
a log line (:class:`franca.train.callbacks.PeriodicEvaluation`).

Several ranks: every rank extracts the features of every image and scores them; rank 0 writes the record. Under
FSDP2 the teacher's forward is a collective, so every rank must run the same number of forward passes; splitting the
images between ranks would save time, but a rank whose batch was all unreadable would then skip a forward and leave
the others waiting. Reading the same images on every rank takes what one process takes; bound it with
``eval.max_images_per_split``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.utils.data import Dataset, Subset

from franca.core.errors import ConfigError, DataError
from franca.data.augmentations import eval_transform
from franca.data.datasets import ImageFolderDataset
from franca.eval.common import make_loader, model_device
from franca.eval.knn import knn_classify
from franca.features import extract_features
from franca.train.callbacks import PeriodicEvaluation
from franca.train.config import TrainConfig

logger = logging.getLogger(__name__)


class KnnMonitor:
    """``monitor(backbone) -> {"top1", "top5"}``: the weighted k-NN accuracy (percent) of the val images.

    ``train`` and ``val`` yield ``(image tensor, label)`` (None for an unreadable file, skipped) with labels in
    ``[0, num_classes)``; ``k`` neighbours (clipped to the train size), vote temperature ``temperature``. Features
    are extracted on the backbone's device, ``batch_size`` images at a time.
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset,
        num_classes: int,
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        self.train, self.val, self.num_classes = train, val, num_classes
        self.k, self.temperature = k, temperature
        self.batch_size, self.num_workers = batch_size, num_workers

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        device = model_device(backbone)
        train, val = (
            extract_features(
                backbone,
                make_loader(dataset, self.batch_size, self.num_workers),
                ("cls",),
                device,
                desc=f"k-NN {split} features",
                progress=False,
            )
            for split, dataset in (("train", self.train), ("val", self.val))
        )
        result = knn_classify(
            train["cls"],
            train.targets,
            val["cls"],
            val.targets,
            ks=(self.k,),
            temperature=self.temperature,
            num_classes=self.num_classes,
            device=device,
        )
        accuracy = result[f"k{self.k}"]
        return {"top1": float(accuracy["top1"]), "top5": float(accuracy["top5"])}


def evenly_spaced(dataset: Dataset, limit: int | None) -> Dataset:
    """``dataset`` itself, or ``limit`` of its items evenly spaced over it (item ``i * n // limit`` for i < limit).

    An ImageFolder's items are sorted by class, so the subset keeps the classes' proportions.
    """
    size = len(dataset)  # type: ignore[arg-type]
    if limit is None or size <= limit:
        return dataset
    return Subset(dataset, [index * size // limit for index in range(limit)])


def _image_folder(key: str, path: str | None, transform: Any) -> ImageFolderDataset:
    """The ImageFolder tree at ``path`` (config key ``key``); ConfigError naming the key when there is none."""
    if not path:
        raise ConfigError(f"config key '{key}' is required for k-NN monitoring: give an ImageFolder tree")
    try:
        return ImageFolderDataset(path, transform=transform)
    except DataError as error:
        raise ConfigError(f"config key '{key}': {error}") from None


def _same_classes(train: Sequence[str], val: Sequence[str]) -> None:
    if list(train) != list(val):
        differ = sorted(set(train) ^ set(val))[:3]
        raise ConfigError(
            f"config key 'eval.val_path' has other class folders than eval.train_path (e.g. {differ}); both "
            "must have the same class subfolders"
        )


def knn_monitor(config: TrainConfig) -> PeriodicEvaluation:
    """The k-NN monitoring callback of ``config.eval`` (its ``every``, folders, k, temperature, sizes).

    Both folders are read now, so that a bad one stops the run before training: ConfigError naming the key when a
    path is missing, not a folder, holds no class folder or no image, or when the val classes differ from the train
    classes (labels must mean the same in both), and when ``eval.every`` is 0 (monitoring off).
    """
    settings = config.eval
    if settings.every < 1:
        raise ConfigError(
            "config key 'eval.every' is 0 (k-NN monitoring off); set it to a period in iterations"
        )
    size = settings.image_size or config.crops.global_size
    transform = eval_transform(size)
    train = _image_folder("eval.train_path", settings.train_path, transform)
    val = _image_folder("eval.val_path", settings.val_path, transform)
    _same_classes(train.classes, val.classes)
    limit = settings.max_images_per_split
    monitor = KnnMonitor(
        evenly_spaced(train, limit),
        evenly_spaced(val, limit),
        len(train.classes),
        settings.knn_k,
        settings.knn_temperature,
        settings.batch_size,
        settings.num_workers,
    )
    logger.info(
        "k-NN monitor: every %d iterations, %d train and %d val images of %d classes at %d px, k=%d, T=%g",
        settings.every,
        len(monitor.train),  # type: ignore[arg-type]
        len(monitor.val),  # type: ignore[arg-type]
        len(train.classes),
        size,
        settings.knn_k,
        settings.knn_temperature,
    )
    return PeriodicEvaluation(settings.every, monitor, name="knn")
