"""Patch-feature extraction for the dense protocols (HummingBird, linear segmentation, overclustering, PCA maps).

Features are the backbone's final-norm patch tokens ``x_norm_patchtokens`` reshaped to the patch grid
``[B, h, w, D]`` (row-major, h = H / patch, w = W / patch), or the RASA tokens ``x_norm_patchtokens_rasa`` when a
RASA head is attached (``tokens="auto"`` picks them then, as the paper evaluates dense tasks with RASA). On CUDA the
forward runs under bf16 autocast (:func:`franca.core.runtime.autocast_context`); features are returned in fp32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from franca.core.errors import ConfigError, DataError
from franca.eval import defaults

TOKEN_CHOICES = defaults.TOKEN_CHOICES


def resolve_token_key(model: nn.Module, tokens: str = "auto") -> str:
    """Output key of ``forward_features`` to use: "auto" -> RASA tokens when the model has a RASA head, else patch."""
    if tokens not in TOKEN_CHOICES:
        raise ConfigError(f"tokens {tokens!r} is not one of {', '.join(TOKEN_CHOICES)}")
    has_rasa = getattr(model, "rasa", None) is not None
    if tokens == "rasa" and not has_rasa:
        raise ConfigError("--tokens rasa: the model has no RASA head; attach one with --rasa HEAD")
    if tokens == "rasa" or (tokens == "auto" and has_rasa):
        return "x_norm_patchtokens_rasa"
    return "x_norm_patchtokens"


@torch.no_grad()
def extract_patch_grid(
    model: nn.Module, images: Tensor, tokens: str = "auto", n_last_blocks: int = 1
) -> Tensor:
    """Patch features of ``images`` [B, 3, H, W] as a grid [B, H/p, W/p, D'] in fp32 (D' = D * n_last_blocks).

    ``n_last_blocks`` > 1 concatenates the final-normed patch tokens of the last blocks along channels
    (``get_intermediate_layers``); it is only defined for the raw patch tokens, not for RASA ones.
    """
    from franca.core.runtime import autocast_context

    patch = int(model.patch_size)
    batch, _, height, width = images.shape
    if height % patch or width % patch:
        raise ConfigError(
            f"input {height}x{width} is not a multiple of the patch size {patch}; change --size"
        )
    key = resolve_token_key(model, tokens)
    with autocast_context(images.device):
        if n_last_blocks > 1:
            if key != "x_norm_patchtokens":
                raise ConfigError(
                    "several last blocks (--n-last-blocks > 1) cannot be combined with RASA tokens"
                )
            layers = model.get_intermediate_layers(images, n=n_last_blocks, norm=True)
            flat = torch.cat([layer.float() for layer in layers], dim=-1)
        else:
            flat = model.forward_features(images)[key].float()
    return flat.reshape(batch, height // patch, width // patch, flat.shape[-1])


def compact_masks(masks: Tensor, num_classes: int) -> Tensor:
    """Store label masks compactly on the CPU: uint8 when every label (and 255 = ignore) fits, else int32."""
    return masks.to("cpu", torch.uint8 if num_classes <= 255 else torch.int32)


def iterate_dense_batches(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    tokens: str = "auto",
    n_last_blocks: int = 1,
    counter: object | None = None,
    desc: str = "features",
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (patch features [B, h, w, D] fp32 on ``device``, masks [B, S, S] int64 on ``device``) per batch.

    ``loader`` yields :class:`franca.data.images.Batch` objects (see ``make_segmentation_loader``); unreadable
    samples are counted by ``counter`` (a :class:`franca.data.images.SkipCounter`) and empty batches skipped.
    """
    from franca.core.progress import ProgressBar
    from franca.data.images import SkipCounter

    counter = counter if counter is not None else SkipCounter()
    for batch in ProgressBar(loader, desc=desc, unit="batch", leave=False):
        if not counter.update(batch):
            continue
        images = batch.inputs.to(device, non_blocking=True)
        masks = batch.targets.to(device, non_blocking=True)
        yield extract_patch_grid(model, images, tokens, n_last_blocks), masks


def collect_dense_features(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    tokens: str = "auto",
    n_last_blocks: int = 1,
    counter: object | None = None,
    desc: str = "features",
) -> tuple[Tensor, Tensor]:
    """All patch features [N, h, w, D] (fp32, CPU) and masks [N, S, S] (compact, CPU) of a loader, in order."""
    features, masks = [], []
    for batch_features, batch_masks in iterate_dense_batches(
        model, loader, device, tokens, n_last_blocks, counter, desc
    ):
        features.append(batch_features.cpu())
        masks.append(compact_masks(batch_masks, num_classes))
    if not features:
        raise DataError("no readable image in the data set; every sample was skipped")
    return torch.cat(features), torch.cat(masks)


def seed_list(base_seed: int, count: int) -> list[int]:
    """``count`` consecutive seeds starting at ``base_seed`` (the ``--seed`` / ``--seeds`` options)."""
    if count < 1:
        raise ConfigError(f"--seeds must be at least 1 (got {count})")
    return [base_seed + index for index in range(count)]
