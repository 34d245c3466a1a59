"""One way to run a frozen backbone over images and keep the tokens asked for (see :mod:`franca.features.tokens`).

:func:`forward_tokens` computes the tokens of one batch, :func:`iterate_features` streams them batch by batch (for
protocols that must not hold every feature, e.g. HummingBird queries or augmented linear-probe epochs), and
:func:`extract_features` collects them into a :class:`Features` of fp32 CPU tensors. Everything that turns images
into features (``franca embed``, every evaluation protocol, RASA, the demo) goes through these three.

Loaders may yield :class:`franca.data.images.Batch` objects (from ``collate_skip_none``; unreadable files are
dropped there and counted here), ``(images, targets)`` pairs, or image tensors. uint8 images [B, 3, H, W] are
scaled to [0, 1] and ImageNet-normalised on the device (cheaper to move than floats); float images are used as
they come. The forward runs under ``torch.no_grad`` with bf16 autocast on CUDA (as the official evaluations) and in
fp32 elsewhere; ``autocast=False`` keeps fp32 on CUDA too.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from franca.core.constants import IMAGENET_MEAN, IMAGENET_STD
from franca.core.errors import ConfigError, DataError
from franca.core.progress import ProgressBar
from franca.core.runtime import autocast_context
from franca.data.images import SkipCounter
from franca.features.tokens import RASA_TOKENS, canonical_tokens

logger = logging.getLogger(__name__)
Grid = tuple[int, int]


@dataclass
class Features:
    """Tokens of N images (fp32, CPU unless built otherwise), in the vocabulary of :mod:`franca.features.tokens`.

    Each token field is None unless it was asked for: ``cls`` [N, D], ``cls_blocks`` [N, n*D], ``registers``
    [N, R, D], ``patch`` / ``patch_rasa`` [N, h, w, D], ``patch_blocks`` [N, h, w, n*D], ``pooled`` /
    ``pooled_rasa`` [N, D]. ``targets`` are what the loader paired with the images: labels [N] int64, sample indices
    [N] (when it gave none, the running image index), or label masks [N, S, S] (uint8 when every value fits, else
    int32). ``num_skipped`` counts the unreadable images the loader dropped.
    """

    targets: Tensor
    cls: Tensor | None = None
    cls_blocks: Tensor | None = None
    registers: Tensor | None = None
    patch: Tensor | None = None
    patch_blocks: Tensor | None = None
    patch_rasa: Tensor | None = None
    pooled: Tensor | None = None
    pooled_rasa: Tensor | None = None
    num_skipped: int = 0

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, token: str) -> Tensor:
        """The tensor of ``token`` (aliases such as ``avgpool`` accepted); ConfigError when it was not extracted."""
        (name,) = canonical_tokens([token])
        value = getattr(self, name)
        if value is None:
            raise ConfigError(
                f"the features hold no {token!r} tokens; extract them with tokens=[{token!r}, ...]"
            )
        return value

    @property
    def tokens(self) -> dict[str, Tensor]:
        """The extracted tokens by name, in vocabulary order."""
        return {
            field.name: value for field in _TOKEN_FIELDS if (value := getattr(self, field.name)) is not None
        }

    @property
    def grid(self) -> Grid | None:
        """The patch grid (h, w), when patch tokens were extracted."""
        for value in (self.patch, self.patch_rasa, self.patch_blocks):
            if value is not None:
                return int(value.shape[1]), int(value.shape[2])
        return None

    def subset(self, rows: Tensor | Sequence[int]) -> Features:
        """The features of the images at ``rows`` (a [K] index tensor or list), in that order."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        picked = {name: value[rows] for name, value in self.tokens.items()}
        return Features(targets=self.targets[rows], num_skipped=self.num_skipped, **picked)


_TOKEN_FIELDS = [
    field for field in dataclasses.fields(Features) if field.name not in ("targets", "num_skipped")
]


def _normalise(images: Tensor) -> Tensor:
    """uint8 images -> ImageNet-normalised floats (on their device); float images are returned unchanged."""
    if images.dtype != torch.uint8:
        return images
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - mean) / std


def forward_tokens(
    model: nn.Module, images: Tensor, tokens: Sequence[str], n_blocks: int = 1
) -> dict[str, Tensor]:
    """The ``tokens`` of one batch of images [B, 3, H, W] (model dtype; no autocast or grad handling here).

    One ``forward_features`` pass, or one ``get_intermediate_layers(n=n_blocks, norm=True)`` pass when the tokens of
    several blocks are asked for (its last block equals ``forward_features``'s output), plus a ``forward_features``
    pass only if registers are asked for as well.
    """
    tokens = canonical_tokens(tokens)
    patch_size = int(model.patch_size)
    batch, _, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ConfigError(
            f"input {height}x{width} is not a multiple of the patch size {patch_size}; change --size"
        )
    if n_blocks < 1:
        raise ConfigError(f"n_blocks (--n-last-blocks) must be >= 1, got {n_blocks}")
    rasa = getattr(model, "rasa", None)
    if rasa is None and any(token in RASA_TOKENS for token in tokens):
        raise ConfigError("RASA tokens were requested but the model has no RASA head; pass --rasa HEAD")
    images = _normalise(images)
    several = n_blocks > 1 and ("cls_blocks" in tokens or "patch_blocks" in tokens)
    out: dict[str, Tensor] = {}
    if several:
        layers = model.get_intermediate_layers(images, n=n_blocks, return_class_token=True, norm=True)
        patch, cls = layers[-1]
        cls_blocks = torch.cat([class_token for _, class_token in layers], dim=-1)
        patch_blocks = torch.cat([layer_patch for layer_patch, _ in layers], dim=-1)
    if not several or "registers" in tokens:
        out = model.forward_features(images)
        patch, cls = out["x_norm_patchtokens"], out["x_norm_clstoken"]
        if not several:
            cls_blocks, patch_blocks = cls, patch
    if any(token in RASA_TOKENS for token in tokens):  # once, whichever RASA tokens are asked for
        patch_rasa = out.get("x_norm_patchtokens_rasa")
        patch_rasa = patch_rasa if patch_rasa is not None else rasa(patch)
    grid = (batch, height // patch_size, width // patch_size, -1)
    computed = {
        "cls": lambda: cls,
        "cls_blocks": lambda: cls_blocks,
        "registers": lambda: out["x_norm_regtokens"],
        "patch": lambda: patch.reshape(grid),
        "patch_blocks": lambda: patch_blocks.reshape(grid),
        "patch_rasa": lambda: patch_rasa.reshape(grid),
        "pooled": lambda: patch.mean(dim=1),
        "pooled_rasa": lambda: patch_rasa.mean(dim=1),
    }
    return {token: computed[token]() for token in tokens}


def _unpack(batch: object) -> tuple[Tensor | None, Tensor | None, int]:
    """(images, targets, num_skipped) of a loader batch: a franca ``Batch``, an (images, targets) pair, images, or a
    dict with an ``image``/``images`` entry and optionally a ``label``/``labels``/``target``/``targets`` one."""
    if batch is None:
        return None, None, 0
    if hasattr(batch, "inputs") and hasattr(batch, "num_skipped"):
        return batch.inputs, batch.targets, int(batch.num_skipped)  # type: ignore[attr-defined]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        targets = batch[1] if len(batch) > 1 else None
        return batch[0], (torch.as_tensor(targets) if targets is not None else None), 0
    if isinstance(batch, Tensor):
        return batch, None, 0
    if isinstance(batch, Mapping) and ("image" in batch or "images" in batch):  # {"image": ..., "label": ...}
        images = batch["image"] if "image" in batch else batch["images"]
        targets = next((batch[key] for key in ("label", "labels", "target", "targets") if key in batch), None)
        return images, (torch.as_tensor(targets) if targets is not None else None), 0
    raise DataError(
        f"feature extraction got a batch of type {type(batch).__name__}; expected (images, targets)"
    )


def _num_images(loader: Iterable) -> int | None:
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    return getattr(loader, "num_images", None)


@torch.no_grad()
def iterate_features(
    model: nn.Module,
    loader: Iterable,
    tokens: Sequence[str],
    device: torch.device | str | None = None,
    n_blocks: int = 1,
    autocast: bool = True,
    counter: SkipCounter | None = None,
    desc: str = "features",
    progress: bool = True,
) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
    """Yield ``({token: fp32 tensor on device}, targets on device)`` per non-empty batch of ``loader``.

    ``targets`` are the loader's (labels, indices or masks) or, when it gives none, the running image index.
    ``counter`` (a :class:`~franca.data.images.SkipCounter`) counts the images used and the unreadable ones dropped.
    The model is put in eval mode for the pass and its training flag restored afterwards.
    """
    tokens = canonical_tokens(tokens)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    counter = counter if counter is not None else SkipCounter()
    was_training = model.training
    model.eval()
    bar = ProgressBar(total=_num_images(loader), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for batch in loader:
            images, targets, skipped = _unpack(batch)
            counter.num_skipped += skipped
            bar.update(skipped)
            if images is None or images.shape[0] == 0:
                counter.num_empty_batches += 1
                continue
            count = images.shape[0]
            if targets is None:
                targets = torch.arange(counter.num_loaded, counter.num_loaded + count)
            images = images.to(device, non_blocking=True)
            with autocast_context(device) if autocast else torch.autocast(device.type, enabled=False):
                outputs = forward_tokens(model, images, tokens, n_blocks)
            counter.num_loaded += count
            bar.update(count)
            yield (
                {name: value.float() for name, value in outputs.items()},
                targets.to(device, non_blocking=True),
            )
    finally:
        bar.close()
        model.train(was_training)


def _compact(targets: Tensor) -> Tensor:
    """Targets on the CPU: label masks [B, S, S] as uint8 when every value fits (255 = ignore), else int32."""
    targets = targets.cpu()
    if targets.ndim < 2:
        return targets.to(torch.int64)
    fits = targets.numel() == 0 or (int(targets.min()) >= 0 and int(targets.max()) <= 255)
    return targets.to(torch.uint8 if fits else torch.int32)


def _concatenate(token: str, batches: list[Tensor], desc: str) -> Tensor:
    """The batches of one token as one tensor; DataError when their per-image shapes differ (several image sizes)."""
    shapes = sorted({tuple(batch.shape[1:]) for batch in batches})
    if len(shapes) > 1:
        raise DataError(
            f"{desc}: batches have {token} tokens of different shapes {shapes[0]} and {shapes[1]} (images of "
            "several sizes); use one image size"
        )
    return torch.cat(batches)


def extract_features(
    model: nn.Module,
    loader: Iterable,
    tokens: Sequence[str] = ("cls",),
    device: torch.device | str | None = None,
    n_blocks: int = 1,
    autocast: bool = True,
    desc: str = "features",
    progress: bool = True,
) -> Features:
    """Run ``model`` over every batch of ``loader`` and collect the ``tokens`` as a :class:`Features` (fp32, CPU).

    Unreadable images dropped by ``collate_skip_none`` are counted (``num_skipped``, logged when non-zero).
    Raises :class:`~franca.core.errors.DataError` when the loader yields no readable image at all.
    """
    tokens = canonical_tokens(tokens)
    counter = SkipCounter()
    chunks: dict[str, list[Tensor]] = {token: [] for token in tokens}
    targets: list[Tensor] = []
    stream = iterate_features(model, loader, tokens, device, n_blocks, autocast, counter, desc, progress)
    for outputs, batch_targets in stream:
        for name, value in outputs.items():
            chunks[name].append(value.cpu())
        targets.append(_compact(batch_targets))
    if not targets:
        raise DataError(
            f"{desc}: no readable image was found ({counter.num_skipped} unreadable); check the data"
        )
    if counter.num_skipped:
        logger.info(
            "%s: skipped %d unreadable image(s), used %d", desc, counter.num_skipped, counter.num_loaded
        )
    tensors = {name: _concatenate(name, values, desc) for name, values in chunks.items()}
    return Features(targets=torch.cat(targets), num_skipped=counter.num_skipped, **tensors)


class TensorImages:
    """A loader over images held in one tensor [N, 3, H, W] (uint8 or float): ``(images, targets)`` batches.

    ``targets`` default to the image indices. Use it to extract features of an in-memory data set.
    """

    def __init__(self, images: Tensor, targets: Tensor | None = None, batch_size: int = 256) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.batch_size = images, batch_size
        self.targets = targets if targets is not None else torch.arange(images.shape[0])
        self.num_images = int(images.shape[0])

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, self.num_images, self.batch_size):
            stop = start + self.batch_size
            yield self.images[start:stop], self.targets[start:stop]
