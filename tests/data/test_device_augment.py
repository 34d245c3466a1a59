"""The batched on-device photometric augmentation against torchvision's per-image functions."""

from __future__ import annotations

import colorsys

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from franca.core.errors import ConfigError
from franca.data import device_augment as DA
from franca.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from franca.data.batch import TrainBatch


@pytest.fixture
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    smooth = torch.rand(6, 3, 5, 5, generator=generator)
    base = torch.nn.functional.interpolate(smooth, size=(20, 24), mode="bilinear", align_corners=False)
    noise = torch.rand(6, 3, 20, 24, generator=generator)
    out = (0.7 * base + 0.3 * noise).clamp(0, 1)
    out[0, :, :4] = 0.5  # a gray band (equal channels: hue undefined) and saturated pixels
    out[1, 0] = 1.0
    return out


def _per_image(function, images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return torch.stack([function(image, float(factor)) for image, factor in zip(images, factors)])


@pytest.mark.parametrize(
    ("ours", "reference", "low", "high"),
    [
        (DA.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
        (DA.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
        (DA.adjust_saturation, TF.adjust_saturation, 0.8, 1.2),
        (DA.adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_jitter_ops_match_torchvision_per_image(ours, reference, low, high, images: torch.Tensor) -> None:
    factors = torch.linspace(low, high, images.shape[0])
    expected = _per_image(reference, images, factors)
    assert torch.allclose(ours(images.clone(), factors), expected, atol=2e-5)


def test_grayscale_blur_and_solarize_match_torchvision(images: torch.Tensor) -> None:
    assert torch.allclose(DA.rgb_to_grayscale(images, 3), TF.rgb_to_grayscale(images, 3), atol=1e-6)
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    expected = torch.stack(
        [TF.gaussian_blur(image, [9, 9], [float(s), float(s)]) for image, s in zip(images, sigmas)]
    )
    assert torch.allclose(DA.gaussian_blur(images, sigmas), expected, atol=1e-5)
    # uint8 threshold 128: a pixel of value 128/255 is inverted, 127/255 is not
    pixels = torch.tensor([127, 128, 200], dtype=torch.uint8).reshape(1, 3, 1, 1)
    solarized = DA.solarize(pixels.float() / 255.0)
    assert torch.equal((solarized * 255).round().to(torch.uint8), TF.solarize(pixels, 128))


def _uint8_batch(batch_size: int, n_local: int, seed: int = 0) -> TrainBatch:
    generator = torch.Generator().manual_seed(seed)
    globals_ = torch.randint(0, 256, (2 * batch_size, 3, 16, 16), dtype=torch.uint8, generator=generator)
    locals_ = torch.randint(0, 256, (n_local * batch_size, 3, 8, 8), dtype=torch.uint8, generator=generator)
    empty = torch.zeros(0, dtype=torch.long)
    return TrainBatch(
        globals_, locals_, torch.zeros(2 * batch_size, 4, dtype=torch.bool), empty, empty.float(), batch_size
    )


def test_batch_augmentation_shapes_determinism_and_normalisation() -> None:
    augment = DA.DeviceMultiCropAugmentation(blur="effective", solarize_prob=0.2)
    batch = _uint8_batch(4, 3)
    first = augment(batch, torch.Generator().manual_seed(1))
    again = augment(batch, torch.Generator().manual_seed(1))
    other = augment(batch, torch.Generator().manual_seed(2))
    assert first.global_crops.dtype == torch.float32 and first.global_crops.shape == (8, 3, 16, 16)
    assert first.local_crops.shape == (12, 3, 8, 8)
    assert torch.equal(first.global_crops, again.global_crops) and torch.equal(
        first.local_crops, again.local_crops
    )
    assert not torch.equal(first.global_crops, other.global_crops)
    # With every random operation switched off, the output is exactly the ImageNet normalisation of x / 255.
    plain = DA.DeviceMultiCropAugmentation(
        blur="effective", solarize_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0
    )
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    crops = batch.global_crops[:4]
    out = plain.crops(crops, 0.0, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(out, (crops.float() / 255.0 - mean) / std, atol=1e-6)


def test_random_choices_follow_the_configured_probabilities() -> None:
    augment = DA.DeviceMultiCropAugmentation(solarize_prob=0.0)
    # Constant-colour crops: grayscale makes the three channels equal, which jitter alone almost never does.
    colours = torch.tensor([[230, 40, 90]], dtype=torch.uint8).reshape(1, 3, 1, 1).expand(4000, 3, 4, 4)
    out = augment.crops(colours, 0.0, 0.0, torch.Generator().manual_seed(0))
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    pixels = (out * std + mean)[:, :, 0, 0]
    gray = (pixels.max(dim=1).values - pixels.min(dim=1).values) < 1e-5
    assert abs(gray.float().mean().item() - 0.2) < 0.03  # the paper's grayscale probability is the default
    unchanged = (pixels - colours[:, :, 0, 0].float() / 255.0).abs().amax(dim=1) < 1e-6
    assert abs(unchanged.float().mean().item() - (1 - 0.8) * (1 - 0.2)) < 0.03  # jitter p=0.8 by default
    # Configured probabilities and strengths: grayscale always; jitter with zero strengths changes nothing.
    always_gray = DA.DeviceMultiCropAugmentation(
        solarize_prob=0.0, grayscale_prob=1.0, color_jitter=(0, 0, 0, 0)
    )
    out = always_gray.crops(colours[:500], 0.0, 0.0, torch.Generator().manual_seed(0))
    pixels = (out * std + mean)[:, :, 0, 0]
    luma = (torch.tensor([0.2989, 0.587, 0.114]) * torch.tensor([230.0, 40.0, 90.0]) / 255.0).sum()
    assert torch.allclose(pixels, luma.expand_as(pixels), atol=1e-5)
    # A full-range hue jitter (0.5 turns) moves the hue of most crops far; the paper's 0.1 never beyond 0.1 turns.
    for hue, far_fraction in ((0.5, 0.5), (0.1, 0.0)):
        hue_only = DA.DeviceMultiCropAugmentation(
            solarize_prob=0.0, grayscale_prob=0.0, color_jitter=(0, 0, 0, hue), color_jitter_prob=1.0
        )
        out = hue_only.crops(colours[:1000], 0.0, 0.0, torch.Generator().manual_seed(0))
        rgb = (out * std + mean)[:, :, 0, 0]
        hue_after = torch.tensor([colorsys.rgb_to_hsv(*pixel)[0] for pixel in rgb.tolist()])
        start = colorsys.rgb_to_hsv(230 / 255, 40 / 255, 90 / 255)[0]
        shift = torch.remainder(hue_after - start + 0.5, 1.0) - 0.5  # signed shift in turns
        assert shift.abs().max() <= hue + 1e-4
        assert (shift.abs() > 0.1 + 1e-3).float().mean() >= far_fraction * 0.9
    for bad in ((0.4, 0.4, 0.2, 0.6), (0.4, -0.1, 0.2, 0.1), (0.4, 0.4, 0.2)):
        with pytest.raises(ConfigError, match="color_jitter"):
            DA.DeviceMultiCropAugmentation(color_jitter=bad)
    with pytest.raises(ConfigError, match="grayscale_prob"):
        DA.DeviceMultiCropAugmentation(grayscale_prob=1.5)
    with pytest.raises(ConfigError, match="blur mode"):
        DA.DeviceMultiCropAugmentation(blur="sometimes")


def test_blur_sigma_range_reaches_both_pipelines(tmp_path) -> None:
    from franca.train.config import load_config
    from franca.train.data import build_multicrop

    config = load_config("tiny_cpu", [f"data.path={tmp_path}", "crops.blur_sigma=[0.05,0.05]"])
    assert build_multicrop(config).blur_sigma == (0.05, 0.05)
    # A sigma of 0.05 px leaves an image unchanged to 1e-6 (the neighbour weight is exp(-200)); 2 px does not.
    augment = DA.DeviceMultiCropAugmentation(blur_sigma=tuple(config.crops.blur_sigma))
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=generator)
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    plain = (pixels.float() / 255.0 - mean) / std
    augment.color_jitter_prob = augment.grayscale_prob = 0.0
    sharp = augment.crops(pixels, 1.0, 0.0, torch.Generator().manual_seed(1))
    wide = DA.DeviceMultiCropAugmentation(color_jitter_prob=0.0, grayscale_prob=0.0)
    blurred = wide.crops(pixels, 1.0, 0.0, torch.Generator().manual_seed(1))
    assert torch.allclose(sharp, plain, atol=1e-5)
    assert (blurred - plain).abs().max() > 0.1


def test_float_input_is_left_untouched_and_bad_sigma_is_refused(images: torch.Tensor) -> None:
    augment = DA.DeviceMultiCropAugmentation(solarize_prob=1.0)
    before = images.clone()
    out = augment.crops(images, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(images, before) and not torch.allclose(out, before)
    for sigma in ((0.0, 1.0), (2.0, 1.0)):
        with pytest.raises(ConfigError, match="blur_sigma"):
            DA.DeviceMultiCropAugmentation(blur_sigma=sigma)
