"""Franca / DINOv2 multi-crop augmentation for pre-training and the evaluation transform (torchvision.transforms.v2).

Both accept a PIL image or a ``[3, H, W]`` uint8 tensor and return float32 tensors normalised with the ImageNet mean
and standard deviation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from franca.core.constants import IMAGENET_MEAN, IMAGENET_STD
from franca.core.errors import ConfigError

__all__ = [
    "BLUR_PROBABILITIES",
    "blur_probabilities",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropAugmentation",
    "check_blur_sigma",
    "check_color_jitter",
    "check_probability",
    "eval_transform",
]

#: Gaussian-blur probabilities (global crop 1, global crop 2, local crops) per ``blur`` mode. "effective" is what the
#: released Franca / DINOv2 weights were trained with: DINOv2's GaussianBlur wrapper passes 1 - p to RandomApply
#: (facebookresearch/dinov2 PR #411), so the nominal (1.0, 0.1, 0.5) became (0.0, 0.9, 0.5).
BLUR_PROBABILITIES: dict[str, tuple[float, float, float]] = {
    "effective": (0.0, 0.9, 0.5),
    "nominal": (1.0, 0.1, 0.5),
}


def blur_probabilities(blur: str) -> tuple[float, float, float]:
    """The (first global, second global, local) crop blur probabilities of ``blur`` (a key of
    :data:`BLUR_PROBABILITIES`); one :class:`ConfigError` line for an unknown mode."""
    if blur not in BLUR_PROBABILITIES:
        raise ConfigError(f"unknown blur mode {blur!r}; expected one of {', '.join(BLUR_PROBABILITIES)}")
    return BLUR_PROBABILITIES[blur]


BLUR_KERNEL_SIZE = 9
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128
#: ColorJitter strengths (brightness, contrast, saturation, hue) and the probabilities of jitter and grayscale
COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)
COLOR_JITTER_PROBABILITY = 0.8
GRAYSCALE_PROBABILITY = 0.2


def check_blur_sigma(blur_sigma: Sequence[float]) -> tuple[float, float]:
    """``blur_sigma`` as a float pair; ConfigError unless 0 < min <= max (a zero sigma divides by zero)."""
    if len(blur_sigma) != 2 or not 0.0 < blur_sigma[0] <= blur_sigma[1]:
        raise ConfigError(f"blur_sigma must satisfy 0 < min <= max, got {tuple(blur_sigma)}")
    return float(blur_sigma[0]), float(blur_sigma[1])


def check_color_jitter(color_jitter: Sequence[float]) -> tuple[float, float, float, float]:
    """``color_jitter`` (brightness, contrast, saturation, hue) as floats; ConfigError unless each is >= 0 and
    hue <= 0.5 (torchvision's ColorJitter: factors uniform in [max(0, 1 - s), 1 + s], a hue shift in [-h, h] turns)."""
    if len(color_jitter) != 4 or min(color_jitter) < 0.0 or color_jitter[3] > 0.5:
        raise ConfigError(
            "color_jitter must be four strengths (brightness, contrast, saturation, hue), each >= 0 and hue <= 0.5, "
            f"got {tuple(color_jitter)}"
        )
    return tuple(float(value) for value in color_jitter)  # type: ignore[return-value]


def check_probability(name: str, value: float) -> float:
    """``value`` as a float; ConfigError naming ``name`` unless it lies in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def _interpolation(value: InterpolationMode | str) -> InterpolationMode:
    """An InterpolationMode from itself or its name ("bicubic", "bilinear", ...)."""
    if isinstance(value, InterpolationMode):
        return value
    try:
        return InterpolationMode(str(value).lower())
    except ValueError as error:
        names = ", ".join(mode.value for mode in InterpolationMode)
        raise ConfigError(f"unknown interpolation {value!r}; expected one of {names}") from error


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[Any]:
    """PIL or uint8 image -> float32 ``[3, H, W]`` in [0, 1] -> ``(x - mean) / std``."""
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ]


class MultiCropAugmentation:
    """DINOv2 / Franca multi-crop: two global and ``n_local_crops`` local views of one image.

    Every crop: RandomResizedCrop (bicubic, the given scale range, aspect ratio 3/4..4/3; a source smaller than the
    crop is upsampled), horizontal flip p=0.5, ColorJitter(``color_jitter`` = (0.4, 0.4, 0.2, 0.1) by default) with
    ``color_jitter_prob`` = 0.8, grayscale with ``grayscale_prob`` = 0.2 (the paper's values are the defaults), then
    Gaussian blur (kernel 9, sigma uniform in ``blur_sigma`` = [0.1, 2] px by default, a range meant for 224-px
    crops) with a per-crop probability, then ImageNet normalisation. The
    second global crop is also solarised (threshold 128) with ``solarize_prob``. ``blur="effective"`` (default) uses
    the probabilities the released weights were trained with, (global-1, global-2, local) = (0, 0.9, 0.5);
    ``blur="nominal"`` the intended (1.0, 0.1, 0.5) (see :data:`BLUR_PROBABILITIES`). They are readable as
    ``global1_blur_prob``, ``global2_blur_prob`` and ``local_blur_prob``.

    Calling it on a PIL image (or ``[3, H, W]`` uint8 tensor) returns a dict in DINOv2's ``DataAugmentationDINO``
    layout: ``"global_crops"``: ``[Tensor[3, G, G], Tensor[3, G, G]]``; ``"global_crops_teacher"``: the same list
    (the teacher sees the same two global crops, unmasked); ``"local_crops"``: ``n_local_crops`` x
    ``Tensor[3, L, L]``; all float32. Randomness comes from torch's global generator (seed it per DataLoader worker).

    ``geometry_only=True`` stops after the crop and the flip and returns uint8 crops: the colour, blur, solarisation
    and normalisation steps then run batched on the training device (:mod:`franca.data.device_augment`), which keeps
    a GPU fed with ~8x fewer CPU cores at 224/98 px (benchmarks/RESULTS.md).
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 98,
        n_local_crops: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        blur: str = "effective",
        solarize_prob: float = 0.2,
        interpolation: InterpolationMode | str = InterpolationMode.BICUBIC,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        geometry_only: bool = False,
        blur_sigma: tuple[float, float] = BLUR_SIGMA,
        color_jitter: Sequence[float] = COLOR_JITTER,
        color_jitter_prob: float = COLOR_JITTER_PROBABILITY,
        grayscale_prob: float = GRAYSCALE_PROBABILITY,
    ) -> None:
        if n_local_crops < 0:
            raise ConfigError(f"n_local_crops must be >= 0, got {n_local_crops}")
        for name, scale in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0.0 < scale[0] <= scale[1] <= 1.0:
                raise ConfigError(f"{name} must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        self.global_size = int(global_size)
        self.local_size = int(local_size)
        self.n_local_crops = int(n_local_crops)
        self.global_scale = (float(global_scale[0]), float(global_scale[1]))
        self.local_scale = (float(local_scale[0]), float(local_scale[1]))
        self.blur = blur
        self.global1_blur_prob, self.global2_blur_prob, self.local_blur_prob = blur_probabilities(blur)
        self.solarize_prob = float(solarize_prob)
        self.interpolation = _interpolation(interpolation)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.geometry_only = bool(geometry_only)
        self.blur_sigma = check_blur_sigma(blur_sigma)
        self.color_jitter = check_color_jitter(color_jitter)
        self.color_jitter_prob = check_probability("color_jitter_prob", color_jitter_prob)
        self.grayscale_prob = check_probability("grayscale_prob", grayscale_prob)

        self.global1_transform = self._crop_pipeline(
            self.global_size, self.global_scale, self.global1_blur_prob
        )
        self.global2_transform = self._crop_pipeline(
            self.global_size, self.global_scale, self.global2_blur_prob, solarize_prob=self.solarize_prob
        )
        self.local_transform = self._crop_pipeline(self.local_size, self.local_scale, self.local_blur_prob)

    def _crop_pipeline(
        self, size: int, scale: tuple[float, float], blur_prob: float, solarize_prob: float = 0.0
    ) -> v2.Compose:
        """One crop's transform: geometry, colour, blur (and solarise), normalisation."""
        steps: list[Any] = [
            v2.RandomResizedCrop(size, scale=scale, interpolation=self.interpolation, antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
        ]
        if self.geometry_only:  # the photometric rest runs on the device (franca.data.device_augment)
            return v2.Compose([*steps, v2.ToImage(), v2.ToPureTensor()])
        steps += [
            v2.RandomApply([v2.ColorJitter(*self.color_jitter)], p=self.color_jitter_prob),
            v2.RandomGrayscale(p=self.grayscale_prob),
        ]
        if blur_prob > 0.0:
            steps.append(
                v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL_SIZE, sigma=self.blur_sigma)], p=blur_prob)
            )
        if solarize_prob > 0.0:
            steps.append(v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=solarize_prob))
        steps.extend(_to_normalized_tensor(self.mean, self.std))
        return v2.Compose(steps)

    def __call__(self, image: Any) -> dict[str, list[torch.Tensor]]:
        """Crops of one image: ``{"global_crops", "global_crops_teacher", "local_crops"}`` (see the class doc)."""
        global_crops = [
            self.global1_transform(image),
            self.global2_transform(image),
        ]
        local_crops = [self.local_transform(image) for _ in range(self.n_local_crops)]
        return {
            "global_crops": global_crops,
            "global_crops_teacher": global_crops,
            "local_crops": local_crops,
        }

    def __repr__(self) -> str:
        return (
            f"MultiCropAugmentation(global_size={self.global_size}, local_size={self.local_size}, "
            f"n_local_crops={self.n_local_crops}, global_scale={self.global_scale}, local_scale={self.local_scale}, "
            f"blur={self.blur!r} {(self.global1_blur_prob, self.global2_blur_prob, self.local_blur_prob)}, "
            f"blur_sigma={self.blur_sigma}, solarize_prob={self.solarize_prob}, color_jitter={self.color_jitter} "
            f"p={self.color_jitter_prob}, grayscale_prob={self.grayscale_prob}"
            + (", geometry_only=True)" if self.geometry_only else ")")
        )


def eval_transform(
    size: int = 224,
    resize_size: int | None = None,
    interpolation: InterpolationMode | str = InterpolationMode.BICUBIC,
) -> Callable[[Any], torch.Tensor]:
    """Inference preprocessing: resize the shorter side to ``resize_size``, center-crop ``size``, ImageNet-normalise.

    ``resize_size`` defaults to ``round(size * 256 / 224)`` (256 for 224, the official recipe). ``size`` may be any
    multiple of the model's patch size (14 for Franca), e.g. 518. Returns a callable mapping a PIL image or
    ``[3, H, W]`` uint8 tensor to a float32 ``[3, size, size]`` tensor.
    """
    if size <= 0:
        raise ConfigError(f"size must be positive, got {size}")
    if resize_size is None:
        resize_size = round(size * 256 / 224)
    if resize_size < size:
        raise ConfigError(f"resize_size ({resize_size}) must be at least the crop size ({size})")
    return v2.Compose(
        [
            v2.Resize(resize_size, interpolation=_interpolation(interpolation), antialias=True),
            v2.CenterCrop(size),
            *_to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
