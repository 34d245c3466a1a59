"""Plumbing shared by every evaluation protocol: model loading, data, features, labels and result files.

Each protocol's entry (``franca.eval.knn.evaluate_knn``, ``franca.eval.hummingbird.evaluate_hummingbird``, ...) takes
a model from :func:`load_model`, extracts features with :func:`dataset_features` (the one extractor,
:func:`franca.features.extract_features`) and its results go to :func:`write_results`, so that every protocol writes
the same kind of JSON file. The image-level protocols' scoring functions read a split's features and labels with
:func:`feature_rows` and record where the features came from with :class:`Provenance`. The command line's options and
printed tables live in :mod:`franca.cli.eval_protocols`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from franca import __version__
from franca.core.errors import CheckpointError, ConfigError, DataError
from franca.core.io import atomic_write_text, ensure_output_dir, output_dir_problem
from franca.core.runtime import resolve_device
from franca.data.augmentations import eval_transform
from franca.data.datasets import ImageFolderDataset
from franca.data.images import collate_skip_none
from franca.eval.defaults import DEFAULT_OUTPUT_ROOT, EXTRACT_BATCH_SIZE
from franca.eval.output import format_table
from franca.features import Features, extract_features
from franca.models.checkpoints import load_backbone

__all__ = [
    "DEFAULT_OUTPUT_ROOT",
    "Provenance",
    "check_input_size",
    "classification_datasets",
    "count_classes",
    "dataset_classes",
    "dataset_features",
    "ensure_output_dir",
    "feature_rows",
    "flatten_scalars",
    "format_table",
    "labels_of",
    "load_model",
    "make_loader",
    "model_device",
    "output_dir_problem",
    "provenance_dict",
    "split_features",
    "write_results",
]


# --------------------------------------------------------------------------------------------------- model
def check_input_size(size: int, patch_size: int, option: str = "--size") -> None:
    """Raise ConfigError unless ``size`` is a positive multiple of ``patch_size``."""
    if size <= 0 or size % patch_size:
        lower = max(patch_size, size // patch_size * patch_size)
        raise ConfigError(
            f"{option} {size} is not a multiple of the patch size {patch_size}; use e.g. {lower} or {lower + patch_size}"
        )


def load_model(
    checkpoint: str | os.PathLike,
    rasa: str | os.PathLike | bool | None = None,
    device: str | torch.device | None = "auto",
    size: int | None = None,
) -> tuple[torch.nn.Module, torch.device]:
    """Load the backbone ``checkpoint`` (with a RASA head attached), move it to ``device`` in eval mode, frozen.

    ``rasa``: a file with the head or a folded DxD matrix, ``"checkpoint"`` (or True) for the ``rasa_head.*``
    tensors stored in ``checkpoint``, or None. ``device``: "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
    With ``size``, checks that it is a multiple of the patch size, so the error comes before any data is read.
    Returns (model, device).
    """
    if isinstance(rasa, str) and rasa == "checkpoint" and not Path(rasa).exists():
        rasa = True
    elif isinstance(rasa, (str, os.PathLike)) and not Path(rasa).exists():
        raise CheckpointError(
            f"--rasa {os.fspath(rasa)}: no such file; give a RASA head file or 'checkpoint'"
        )
    resolved = resolve_device(device if device is not None else "auto")
    model = load_backbone(checkpoint, rasa=rasa)
    if size is not None:
        check_input_size(int(size), int(model.patch_size))
    model = model.to(resolved).eval()
    model.requires_grad_(False)
    return model, resolved


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int = 64,
    num_workers: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader for evaluation that skips unreadable samples (``franca.data.images.collate_skip_none``)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
    )


def model_device(model: torch.nn.Module, device: torch.device | str | None = None) -> torch.device:
    """``device`` as a torch device, or the device of ``model``'s parameters when it is None."""
    return torch.device(device) if device is not None else next(model.parameters()).device


# --------------------------------------------------------------------------------------------------- data
def classification_datasets(train_root: str, val_root: str, size: int) -> tuple[Any, Any]:
    """ImageFolder train and val data sets with the evaluation transform (resize, center-crop ``size``, ImageNet norm).

    The val classes must be the train classes (same folder names), so labels mean the same thing in both.
    """
    transform = eval_transform(size=size)
    train = ImageFolderDataset(train_root, transform=transform)
    val = ImageFolderDataset(val_root, transform=transform)
    if list(train.classes) != list(val.classes):
        missing = sorted(set(val.classes) - set(train.classes)) or sorted(
            set(train.classes) - set(val.classes)
        )
        raise ConfigError(
            f"{val_root}: its class folders differ from those of {train_root} (e.g. {missing[:3]}); "
            "both must have the same class subfolders"
        )
    return train, val


def dataset_classes(dataset: object) -> int | None:
    """The number of classes a data set names (``len(dataset.classes)``), or None when it names none."""
    return len(getattr(dataset, "classes", [])) or None


def count_classes(*labels: Tensor) -> int:
    """The number of classes the label tensors imply: their largest label + 1."""
    return int(max(int(part.max()) for part in labels if part.numel()) + 1)


# --------------------------------------------------------------------------------------------------- features
def dataset_features(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    tokens: Sequence[str],
    batch_size: int = EXTRACT_BATCH_SIZE,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    n_blocks: int = 1,
    desc: str = "features",
    progress: bool = True,
) -> Features:
    """The ``tokens`` of every image of ``dataset`` (items ``(image tensor, label)``, None for an unreadable file)
    as :class:`~franca.features.Features` with the labels as ``targets`` and the unreadable files counted."""
    loader = make_loader(dataset, batch_size, num_workers)
    return extract_features(model, loader, tokens, device, n_blocks, desc=desc, progress=progress)


def split_features(
    model: torch.nn.Module,
    train_dataset: torch.utils.data.Dataset,
    val_dataset: torch.utils.data.Dataset,
    tokens: Sequence[str],
    batch_size: int = EXTRACT_BATCH_SIZE,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    n_blocks: int = 1,
    progress: bool = True,
) -> tuple[Features, Features]:
    """:func:`dataset_features` of a train and a val data set, one pass each (train first)."""
    train, val = (
        dataset_features(
            model, dataset, tokens, batch_size, num_workers, device, n_blocks, f"{split} features", progress
        )
        for split, dataset in (("train", train_dataset), ("val", val_dataset))
    )
    return train, val


def labels_of(features: object, labels: Tensor | Sequence[int] | None, split: str) -> Tensor:
    """The labels [N] (int64, CPU) of one split: ``labels`` when given, else the ``targets`` of ``features``."""
    if labels is None:
        if not isinstance(features, Features):
            raise ConfigError(f"the {split} labels are missing: pass them along with feature tensors")
        labels = features.targets
    return torch.as_tensor(labels).long().cpu()


def feature_rows(
    features: Tensor | Features, labels: Tensor | Sequence[int] | None, token: str, split: str
) -> tuple[Tensor, Tensor]:
    """(features [N, D], labels [N] int64) of one split, from a tensor and its labels or from Features (its
    ``token``, e.g. ``cls`` or ``avgpool``, and its targets unless ``labels`` are given)."""
    rows = features[token] if isinstance(features, Features) else features
    labels = labels_of(features, labels, split)
    if rows.ndim != 2 or rows.shape[0] != labels.shape[0]:
        raise DataError(
            f"the {split} features {tuple(rows.shape)} do not match their {labels.shape[0]} labels; "
            "give one [D] feature row per label"
        )
    return rows, labels


@dataclass(frozen=True)
class Provenance:
    """Where a protocol's features came from: the token (None when implied) and the unreadable images that were
    skipped extracting the train and the val split. Recorded when a protocol scores Features."""

    feature: str | None
    skipped_train: int
    skipped_val: int

    @classmethod
    def of(cls, feature: str | None, train: object, val: object) -> Provenance | None:
        """The provenance of two splits when both are Features, else None (plain tensors carry none)."""
        if isinstance(train, Features) and isinstance(val, Features):
            return cls(feature, train.num_skipped, val.num_skipped)
        return None

    def to_dict(self) -> dict[str, Any]:
        """``{"feature"`` (when named), ``"skipped_train", "skipped_val"}``, as the result files hold them."""
        named = {"feature": self.feature} if self.feature is not None else {}
        return {**named, "skipped_train": self.skipped_train, "skipped_val": self.skipped_val}


def provenance_dict(provenance: Provenance | None) -> dict[str, Any]:
    """:meth:`Provenance.to_dict`, or ``{}`` when there is none."""
    return provenance.to_dict() if provenance is not None else {}


# --------------------------------------------------------------------------------------------------- results
def _jsonable(value: Any) -> Any:
    """Convert tensors, arrays, paths, tuples and NumPy scalars into plain JSON types (NaN/inf become null)."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist() if value.ndim else value.item())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, torch.device):
        return str(value)
    return repr(value)


def _arguments_dict(args: Any) -> dict[str, Any]:
    """The options of a run as JSON: a mapping, or an object with attributes (an ``argparse.Namespace``); names
    starting with ``_`` and callables are left out."""
    if args is None:
        return {}
    items = args.items() if isinstance(args, Mapping) else vars(args).items()
    return {key: _jsonable(value) for key, value in items if not key.startswith("_") and not callable(value)}


def flatten_scalars(results: Mapping[str, Any], prefix: str = "") -> dict[str, float | int | str]:
    """``{"k20": {"top1": 81.2}}`` -> ``{"k20/top1": 81.2}``: every scalar leaf of a nested dict, lists skipped."""
    flat: dict[str, float | int | str] = {}
    for key, value in results.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_scalars(value, name))
        elif (isinstance(value, torch.Tensor) and value.ndim == 0) or isinstance(value, np.generic):
            flat[name] = value.item()
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def write_results(
    results: Mapping[str, Any],
    output_dir: str | os.PathLike | None,
    name: str,
    args: Any = None,
) -> Path:
    """Write ``DIR/<name>.json`` and return its path (printing is the command line's business).

    The file holds ``protocol`` (= ``name``), ``checkpoint`` (from ``args`` or ``results``), ``arguments`` (the
    options: a mapping or an ``argparse.Namespace``), ``timestamp`` (UTC, ISO 8601), ``franca_version`` and
    ``metrics`` (``results`` made JSON-safe). It is written to a temporary name and renamed, so an interrupted run
    never leaves half a file. ``output_dir`` None means ``runs/eval/<name>``.
    """
    directory = ensure_output_dir(output_dir if output_dir is not None else DEFAULT_OUTPUT_ROOT / name)
    arguments = _arguments_dict(args)
    checkpoint = arguments.get(
        "checkpoint", results.get("checkpoint") if isinstance(results, Mapping) else None
    )
    payload = {
        "protocol": name,
        "checkpoint": _jsonable(checkpoint),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "franca_version": __version__,
        "arguments": arguments,
        "metrics": _jsonable(results),
    }
    path = atomic_write_text(
        directory / f"{name}.json", json.dumps(payload, indent=2, allow_nan=False) + "\n"
    )
    return path
