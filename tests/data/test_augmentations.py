"""Tests of franca.data.augmentations: multi-crop layout and probabilities, the evaluation transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from franca.core.errors import ConfigError
from franca.data.augmentations import MultiCropAugmentation, eval_transform

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _find(pipeline: v2.Compose, kind: type) -> list[nn.Module]:
    """Transforms of type ``kind`` in a Compose, looking inside RandomApply, returned as (wrapper or itself)."""
    return [
        step
        for step in pipeline.transforms
        if isinstance(step, kind)
        or (isinstance(step, v2.RandomApply) and any(isinstance(inner, kind) for inner in step.transforms))
    ]


def test_multicrop_layout_shapes_and_dtypes() -> None:
    augmentation = MultiCropAugmentation(global_size=64, local_size=32, n_local_crops=3)
    crops = augmentation(_noise_image(80, 100))
    assert set(crops) == {"global_crops", "global_crops_teacher", "local_crops"}
    assert len(crops["global_crops"]) == 2 and len(crops["local_crops"]) == 3
    for crop in crops["global_crops"]:
        assert type(crop) is torch.Tensor and crop.dtype == torch.float32 and crop.shape == (3, 64, 64)
    for crop in crops["local_crops"]:
        assert type(crop) is torch.Tensor and crop.dtype == torch.float32 and crop.shape == (3, 32, 32)
    for student, teacher in zip(crops["global_crops"], crops["global_crops_teacher"]):
        assert torch.equal(student, teacher)
    assert not torch.equal(crops["global_crops"][0], crops["global_crops"][1])  # two different random views
    # normalised: the range of (x - mean) / std for x in [0, 1]
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
    for crop in crops["global_crops"] + crops["local_crops"]:
        assert bool((crop >= low - 1e-5).all()) and bool((crop <= high + 1e-5).all())


def test_multicrop_defaults_and_tiny_source_image() -> None:
    augmentation = MultiCropAugmentation()
    assert (augmentation.global_size, augmentation.local_size, augmentation.n_local_crops) == (224, 98, 8)
    assert augmentation.global_scale == (0.32, 1.0) and augmentation.local_scale == (0.05, 0.32)
    crops = augmentation(_noise_image(20, 20))  # smaller than both crop sizes: RandomResizedCrop upsamples
    assert [tuple(c.shape) for c in crops["global_crops"]] == [(3, 224, 224)] * 2
    assert [tuple(c.shape) for c in crops["local_crops"]] == [(3, 98, 98)] * 8


def test_multicrop_accepts_uint8_tensors() -> None:
    image = torch.from_numpy(np.array(_noise_image(40, 30))).permute(2, 0, 1).contiguous()
    crops = MultiCropAugmentation(global_size=28, local_size=14, n_local_crops=2)(image)
    assert crops["global_crops"][1].shape == (3, 28, 28) and crops["local_crops"][0].dtype == torch.float32


@pytest.mark.parametrize(("mode", "expected"), [("effective", (0.0, 0.9, 0.5)), ("nominal", (1.0, 0.1, 0.5))])
def test_blur_probabilities_per_mode(mode: str, expected: tuple[float, float, float]) -> None:
    augmentation = MultiCropAugmentation(global_size=32, local_size=16, n_local_crops=2, blur=mode)
    assert augmentation.blur == mode
    got = (augmentation.global1_blur_prob, augmentation.global2_blur_prob, augmentation.local_blur_prob)
    assert got == pytest.approx(expected)
    pipelines = (augmentation.global1_transform, augmentation.global2_transform, augmentation.local_transform)
    for pipeline, probability in zip(pipelines, expected):
        blurs = _find(pipeline, v2.GaussianBlur)
        if probability == 0.0:
            assert blurs == []
            continue
        assert len(blurs) == 1
        wrapper = blurs[0]
        assert isinstance(wrapper, v2.RandomApply) and wrapper.p == pytest.approx(probability)
        blur = wrapper.transforms[0]
        assert list(blur.kernel_size) == [9, 9] and list(blur.sigma) == pytest.approx([0.1, 2.0])


def test_colour_and_solarize_settings() -> None:
    augmentation = MultiCropAugmentation(global_size=32, local_size=16, n_local_crops=1)
    for pipeline in (
        augmentation.global1_transform,
        augmentation.global2_transform,
        augmentation.local_transform,
    ):
        (jitter_wrapper,) = _find(pipeline, v2.ColorJitter)
        assert jitter_wrapper.p == pytest.approx(0.8)
        jitter = jitter_wrapper.transforms[0]
        assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.contrast == pytest.approx((0.6, 1.4))
        assert jitter.saturation == pytest.approx((0.8, 1.2)) and jitter.hue == pytest.approx((-0.1, 0.1))
        (gray,) = _find(pipeline, v2.RandomGrayscale)
        assert gray.p == pytest.approx(0.2)
        (flip,) = _find(pipeline, v2.RandomHorizontalFlip)
        assert flip.p == pytest.approx(0.5)
        (crop,) = _find(pipeline, v2.RandomResizedCrop)
        assert crop.interpolation == v2.InterpolationMode.BICUBIC
    (solarize,) = _find(augmentation.global2_transform, v2.RandomSolarize)
    assert solarize.p == pytest.approx(0.2) and solarize.threshold == 128
    assert _find(augmentation.global1_transform, v2.RandomSolarize) == []
    assert _find(augmentation.local_transform, v2.RandomSolarize) == []
    with pytest.raises(ConfigError, match="blur"):
        MultiCropAugmentation(blur="sometimes")


def test_configured_colour_jitter_and_grayscale_reach_both_pipelines(tmp_path) -> None:
    from franca.train.config import load_config
    from franca.train.data import build_device_augmentation, build_multicrop

    overrides = [
        f"data.path={tmp_path}",
        "crops.color_jitter=[0.3,0.5,0.4,0.5]",
        "crops.color_jitter_probability=0.6",
        "crops.grayscale_probability=0.35",
        "crops.augment_on_device=false",  # the per-image pipeline with its colour steps (tiny_cpu batches them)
    ]
    config = load_config("tiny_cpu", overrides)
    for pipeline in (build_multicrop(config).global1_transform, build_multicrop(config).local_transform):
        (jitter_wrapper,) = _find(pipeline, v2.ColorJitter)
        jitter = jitter_wrapper.transforms[0]
        assert jitter_wrapper.p == pytest.approx(0.6)
        assert jitter.brightness == pytest.approx((0.7, 1.3)) and jitter.contrast == pytest.approx((0.5, 1.5))
        assert jitter.saturation == pytest.approx((0.6, 1.4)) and jitter.hue == pytest.approx((-0.5, 0.5))
        (gray,) = _find(pipeline, v2.RandomGrayscale)
        assert gray.p == pytest.approx(0.35)
    device = build_device_augmentation(config)
    flat_ranges = [bound for pair in device.jitter_ranges for bound in pair]
    assert flat_ranges == pytest.approx([0.7, 1.3, 0.5, 1.5, 0.6, 1.4, -0.5, 0.5])
    assert (device.color_jitter_prob, device.grayscale_prob) == pytest.approx((0.6, 0.35))
    for bad, key in (
        ("crops.color_jitter=[0.4,0.4,0.2,0.7]", "crops.color_jitter"),
        ("crops.color_jitter=[0.4,0.4,0.2]", "crops.color_jitter"),
        ("crops.grayscale_probability=1.2", "crops.grayscale_probability"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config("tiny_cpu", [f"data.path={tmp_path}", bad])


class _CallCounter(nn.Module):
    """Stands in for the blur inside RandomApply and counts how often RandomApply decided to apply it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, *inputs):
        self.calls += 1
        return inputs[0] if len(inputs) == 1 else inputs


def test_blur_is_applied_at_the_effective_rate() -> None:
    augmentation = MultiCropAugmentation(global_size=16, local_size=16, n_local_crops=1)
    counters = {}
    for name in ("global2_transform", "local_transform"):
        (wrapper,) = _find(getattr(augmentation, name), v2.GaussianBlur)
        counters[name] = wrapper.transforms[0] = _CallCounter()
    image = _noise_image(24, 24)
    trials = 400
    for _ in range(trials):
        augmentation(image)
    # binomial(400, p): 5 standard deviations are 30 for p=0.9 and 50 for p=0.5
    assert abs(counters["global2_transform"].calls - 0.9 * trials) < 30
    assert abs(counters["local_transform"].calls - 0.5 * trials) < 50


# ---------------------------------------------------------------------------------------------------- eval_transform


def test_eval_transform_constant_grey_maps_to_the_normalisation_formula() -> None:
    value = 100
    output = eval_transform()(Image.new("RGB", (300, 260), (value, value, value)))
    assert output.shape == (3, 224, 224) and output.dtype == torch.float32
    expected = (value / 255.0 - MEAN) / STD
    torch.testing.assert_close(output, expected.expand(3, 224, 224), atol=1e-5, rtol=0)


def test_eval_transform_resizes_the_shorter_side_then_center_crops() -> None:
    # 448 x 224 (W x H): black left quarter. Shorter side -> 256 makes it 512 x 256 with black in x < 128; the
    # centre crop of 224 starts at x = 144, so the output is white everywhere.
    pixels = np.full((224, 448, 3), 255, dtype=np.uint8)
    pixels[:, :112] = 0
    output = eval_transform(224)(Image.fromarray(pixels))
    white = (1.0 - MEAN) / STD
    torch.testing.assert_close(output, white.expand(3, 224, 224), atol=1e-4, rtol=0)
    # 280 x 224 with black in x < 40, resize_size = size = 224 (no resampling): the centre crop starts at x = 28, so
    # crop columns 0..11 are black and the rest white
    pixels = np.full((224, 280, 3), 255, dtype=np.uint8)
    pixels[:, :40] = 0
    output = eval_transform(224, resize_size=224)(Image.fromarray(pixels))
    black = (0.0 - MEAN) / STD
    torch.testing.assert_close(output[:, :, :12], black.expand(3, 224, 12), atol=1e-5, rtol=0)
    torch.testing.assert_close(output[:, :, 12:], white.expand(3, 224, 212), atol=1e-5, rtol=0)


def test_eval_transform_sizes_and_options() -> None:
    image = _noise_image(700, 600)
    assert eval_transform(518)(image).shape == (3, 518, 518)
    assert eval_transform(112, interpolation="bilinear")(image).shape == (3, 112, 112)
    tensor_image = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    assert eval_transform(56)(tensor_image).shape == (3, 56, 56)
    with pytest.raises(ConfigError, match="interpolation"):
        eval_transform(224, interpolation="cubic-ish")
    with pytest.raises(ConfigError, match="resize_size"):
        eval_transform(224, resize_size=200)
    resize = eval_transform(224).transforms[0]
    assert list(resize.size) == [256]
    assert list(eval_transform(518).transforms[0].size) == [592]  # round(518 * 256 / 224)
