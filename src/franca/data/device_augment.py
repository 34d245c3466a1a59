"""The photometric half of the multi-crop augmentation, on whole batches on the training device.

On a GPU the CPU data pipeline is the bottleneck: at 224/98 px (2 global + 8 local crops) the full per-image
torchvision pipeline runs at ~27 images/s per core, its geometric part alone (random resized crop + flip, uint8) at
~208 (benchmarks/RESULTS.md, ``bench_augment.py``). With
``crops.augment_on_device=true`` the data workers only crop and flip (:class:`~franca.data.augmentations.MultiCropAugmentation`
with ``geometry_only=True``, uint8 crops) and :class:`DeviceMultiCropAugmentation` applies the rest on the batch,
after it has moved to the device: colour jitter (``color_jitter`` strengths with probability ``color_jitter_prob``,
0.8 by default, the four operations in a random order per crop), grayscale (``grayscale_prob``, 0.2), Gaussian blur
(kernel 9, sigma uniform in ``blur_sigma``, per-crop probability), solarisation (second global crop) and
ImageNet normalisation, with the same distributions as the per-image pipeline and one random draw per crop.

Every operation takes float images ``[B, 3, H, W]`` in [0, 1] and one factor per image ``[B]``, and matches the
torchvision function of the same name applied image by image (tests/data/test_device_augment.py). One difference to
the per-image pipeline remains: that one runs on PIL images and rounds to uint8 after every operation; this one stays
in float.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from franca.core.constants import IMAGENET_MEAN, IMAGENET_STD
from franca.data.augmentations import (
    BLUR_KERNEL_SIZE,
    BLUR_SIGMA,
    COLOR_JITTER,
    COLOR_JITTER_PROBABILITY,
    GRAYSCALE_PROBABILITY,
    SOLARIZE_THRESHOLD,
    blur_probabilities,
    check_blur_sigma,
    check_color_jitter,
    check_probability,
)
from franca.data.batch import TrainBatch

__all__ = [
    "DeviceMultiCropAugmentation",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "gaussian_blur",
    "rgb_to_grayscale",
    "solarize",
]


def jitter_ranges(color_jitter: Sequence[float]) -> tuple[tuple[float, float], ...]:
    """ColorJitter strengths (brightness, contrast, saturation, hue) as factor ranges, in torchvision's op order:
    [max(0, 1 - s), 1 + s] for the first three, [-h, h] for the hue."""
    brightness, contrast, saturation, hue = check_color_jitter(color_jitter)
    return (
        *((max(0.0, 1.0 - s), 1.0 + s) for s in (brightness, contrast, saturation)),
        (-hue, hue),
    )


_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's ITU-R 601-2 luma weights


def _per_image(factor: Tensor) -> Tensor:
    return factor.reshape(-1, 1, 1, 1)


def _blend(image: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    ratio = _per_image(ratio)
    return (image * ratio + other * (1.0 - ratio)).clamp_(0.0, 1.0)


def rgb_to_grayscale(image: Tensor, num_output_channels: int = 1) -> Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` of ``[B, 3, H, W]`` -> ``[B, num_output_channels, H, W]``."""
    r, g, b = image.unbind(dim=-3)
    gray = (r * _GRAY_WEIGHTS[0] + g * _GRAY_WEIGHTS[1] + b * _GRAY_WEIGHTS[2]).unsqueeze(-3)
    return (
        gray.expand(*gray.shape[:-3], num_output_channels, *gray.shape[-2:])
        if num_output_channels > 1
        else gray
    )


def adjust_brightness(image: Tensor, factor: Tensor) -> Tensor:
    """``clamp(image * factor, 0, 1)`` per image."""
    return (image * _per_image(factor)).clamp_(0.0, 1.0)


def adjust_contrast(image: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with the mean of its grayscale version."""
    mean = rgb_to_grayscale(image).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(image, mean, factor)


def adjust_saturation(image: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with its grayscale version."""
    return _blend(image, rgb_to_grayscale(image), factor)


def _rgb_to_hsv(image: Tensor) -> Tensor:
    r, g, b = image.unbind(dim=-3)
    maxc, minc = image.amax(dim=-3), image.amin(dim=-3)
    equal = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    saturation = chroma / torch.where(equal, ones, maxc)
    divisor = torch.where(equal, ones, chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_r & (maxc != g)
    hue = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    return torch.stack((hue, saturation, maxc), dim=-3)


def _hsv_to_rgb(image: Tensor) -> Tensor:
    hue, saturation, value = image.unbind(dim=-3)
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = sector.to(torch.int64) % 6
    p = (value * (1.0 - saturation)).clamp_(0.0, 1.0)
    q = (value * (1.0 - saturation * fraction)).clamp_(0.0, 1.0)
    t = (value * (1.0 - saturation * (1.0 - fraction))).clamp_(0.0, 1.0)
    # (r, g, b) per sector 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    table = torch.stack(
        [
            torch.stack((value, q, p, p, t, value), dim=-3),
            torch.stack((t, value, value, q, p, p), dim=-3),
            torch.stack((p, p, t, value, value, q), dim=-3),
        ],
        dim=-4,
    )  # [..., 3, 6, H, W]
    index = sector.unsqueeze(-3).unsqueeze(-4).expand(*table.shape[:-3], 1, *table.shape[-2:])
    return table.gather(-3, index).squeeze(-3)


def adjust_hue(image: Tensor, factor: Tensor) -> Tensor:
    """Rotate the hue of each image by ``factor`` (in turns, [-0.5, 0.5]) through HSV."""
    hsv = _rgb_to_hsv(image)
    hue = torch.remainder(hsv[:, 0] + factor.reshape(-1, 1, 1), 1.0)
    return _hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))


def gaussian_blur(image: Tensor, sigma: Tensor, kernel_size: int = BLUR_KERNEL_SIZE) -> Tensor:
    """Separable Gaussian blur with one sigma per image, reflect padding (torchvision's kernel and border)."""
    batch, channels, height, width = image.shape
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (x / sigma.to(image.dtype).reshape(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, k]
    kernel = kernel.repeat_interleave(channels, dim=0)  # one kernel per (image, channel) group
    pad = kernel_size // 2
    flat = F.pad(image.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel.reshape(-1, 1, 1, kernel_size), groups=batch * channels)
    flat = F.conv2d(flat, kernel.reshape(-1, 1, kernel_size, 1), groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


def solarize(image: Tensor, threshold: float = SOLARIZE_THRESHOLD / 255.0) -> Tensor:
    """Invert the pixels at or above ``threshold`` (128 on the uint8 scale)."""
    return torch.where(image >= threshold, 1.0 - image, image)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _uniform(low: float, high: float, count: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.empty(count, device=device).uniform_(low, high, generator=generator)


def _chance(probability: float, count: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(count, device=device, generator=generator) < probability


class DeviceMultiCropAugmentation:
    """Colour jitter, grayscale, blur, solarisation and normalisation of a uint8 multi-crop batch, on its device.

    ``blur``, ``blur_sigma``, ``solarize_prob``, ``color_jitter``, ``color_jitter_prob`` and ``grayscale_prob`` mean
    what they mean for :class:`~franca.data.augmentations.MultiCropAugmentation`
    (blur probability per crop kind: first global, second global, local; solarisation on the second global crop).
    ``__call__(batch, generator)`` takes a :class:`~franca.train.ssl_model.TrainBatch` whose ``global_crops``
    ([2B, 3, G, G], view-major) and ``local_crops`` ([n_local*B, 3, L, L]) are uint8 and returns the same batch with
    normalised float32 crops. All random draws come from ``generator`` (on the batch's device), so a run seeded per
    iteration is reproducible and resumable.
    """

    def __init__(
        self,
        blur: str = "effective",
        solarize_prob: float = 0.2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        blur_sigma: tuple[float, float] = BLUR_SIGMA,
        color_jitter: Sequence[float] = COLOR_JITTER,
        color_jitter_prob: float = COLOR_JITTER_PROBABILITY,
        grayscale_prob: float = GRAYSCALE_PROBABILITY,
    ) -> None:
        self.global1_blur_prob, self.global2_blur_prob, self.local_blur_prob = blur_probabilities(blur)
        self.solarize_prob = float(solarize_prob)
        self.blur_sigma = check_blur_sigma(blur_sigma)
        self.jitter_ranges = jitter_ranges(color_jitter)
        self.color_jitter_prob = check_probability("color_jitter_prob", color_jitter_prob)
        self.grayscale_prob = check_probability("grayscale_prob", grayscale_prob)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def crops(
        self, crops: Tensor, blur_prob: float, solarize_prob: float, generator: torch.Generator
    ) -> Tensor:
        """Augment one kind of crop: uint8 (or [0, 1] float) ``[N, 3, H, W]`` -> normalised float32."""
        # a new tensor either way: the steps below write into it
        image = crops.float() / 255.0 if crops.dtype == torch.uint8 else crops.to(torch.float32, copy=True)
        count, device = image.shape[0], image.device
        if count == 0:
            return image
        # Colour jitter: per crop, with color_jitter_prob, the four operations in a random order with uniform factors.
        jitter = _chance(self.color_jitter_prob, count, generator, device)
        order = torch.rand(count, len(_JITTER_OPS), device=device, generator=generator).argsort(dim=1)
        factors = [_uniform(low, high, count, generator, device) for low, high in self.jitter_ranges]
        for step in range(len(_JITTER_OPS)):
            for op_index, op in enumerate(_JITTER_OPS):
                chosen = (jitter & (order[:, step] == op_index)).nonzero().squeeze(1)
                if chosen.numel():
                    image[chosen] = op(image[chosen], factors[op_index][chosen])
        gray = _chance(self.grayscale_prob, count, generator, device)
        image = torch.where(_per_image(gray), rgb_to_grayscale(image, 3), image)
        blurred = _chance(blur_prob, count, generator, device)
        sigma = _uniform(*self.blur_sigma, count, generator, device)
        chosen = blurred.nonzero().squeeze(1)
        if chosen.numel():
            image[chosen] = gaussian_blur(image[chosen], sigma[chosen])
        if solarize_prob > 0.0:
            flip = _chance(solarize_prob, count, generator, device)
            image = torch.where(_per_image(flip), solarize(image), image)
        mean = torch.tensor(self.mean, device=device).reshape(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).reshape(1, 3, 1, 1)
        return (image - mean) / std

    def __call__(self, batch: TrainBatch, generator: torch.Generator) -> TrainBatch:
        """The batch with augmented, normalised crops (see the class docstring)."""
        per_view = batch.global_crops.shape[0] // 2
        first = self.crops(batch.global_crops[:per_view], self.global1_blur_prob, 0.0, generator)
        second = self.crops(
            batch.global_crops[per_view:], self.global2_blur_prob, self.solarize_prob, generator
        )
        local = batch.local_crops
        if local is not None:
            local = self.crops(local, self.local_blur_prob, 0.0, generator)
        return replace(batch, global_crops=torch.cat([first, second]), local_crops=local)
