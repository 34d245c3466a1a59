"""Tests of the procedural synthetic data set (franca.data.synth) and of `franca data synth`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import franca.cli as cli
from franca.core.errors import ConfigError, DataError
from franca.data import synth

NUM_CLASSES = 10
VALID_LABELS = set(range(NUM_CLASSES + 1)) | {255}


def _files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root."""
    return {
        str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
    }


def _images(root: Path, split: str) -> list[Path]:
    return sorted((root / split).glob("*/*.png"))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthInfo]:
    root = tmp_path_factory.mktemp("synth") / "data"
    info = synth.generate_synthetic_dataset(root, num_train=23, num_val=10, size=32, seed=3, progress=False)
    return root, info


def test_same_seed_gives_identical_files_for_any_worker_count_and_other_seed_differs(tmp_path: Path) -> None:
    kwargs = {"num_train": 12, "num_val": 4, "size": 32, "progress": False}
    synth.generate_synthetic_dataset(tmp_path / "a", seed=7, workers=1, **kwargs)
    synth.generate_synthetic_dataset(tmp_path / "b", seed=7, workers=2, **kwargs)
    synth.generate_synthetic_dataset(tmp_path / "c", seed=8, workers=1, **kwargs)
    files_a, files_b, files_c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(files_a) == 2 * (12 + 4) + 2
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()  # same layout ...
    images_a = {name: data for name, data in files_a.items() if name.startswith(("train/", "val/"))}
    differing = [name for name in images_a if files_c[name] != images_a[name]]
    assert len(differing) == len(images_a)  # ... but every image differs


def test_layout_counts_and_metadata(small_dataset: tuple[Path, synth.SynthInfo]) -> None:
    root, info = small_dataset
    meta = json.loads((root / "classes.json").read_text())
    assert meta["classes"] == list(synth.CLASS_NAMES) and len(meta["classes"]) == NUM_CLASSES
    assert meta["label_ids"] == {name: index + 1 for index, name in enumerate(meta["classes"])}
    assert (meta["num_train"], meta["num_val"], meta["size"], meta["seed"]) == (23, 10, 32, 3)
    assert meta["complete"] is True and meta["ignore_label"] == 255 and meta["background_label"] == 0
    assert "masks/<split>/<class>" in (root / "README.txt").read_text()
    assert sorted(p.name for p in root.iterdir()) == ["README.txt", "classes.json", "masks", "train", "val"]
    for split, expected in (("train", 23), ("val", 10)):
        images = _images(root, split)
        assert len(images) == expected
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(synth.CLASS_NAMES)
        masks = sorted((root / "masks" / split).glob("*/*.png"))
        assert len(masks) == expected
        for image_path in images:
            expected_mask = root / "masks" / split / image_path.parent.name / image_path.name
            assert expected_mask.is_file()
            assert synth.mask_path_for(image_path) == expected_mask
        assert sorted(image.stem for image in images) == [f"{split}_{index:06d}" for index in range(expected)]
    assert (info.num_train, info.num_val, info.size, info.seed) == (23, 10, 32, 3)
    assert info.train_dir == root / "train" and info.mask_dir("val") == root / "masks" / "val"


def test_classes_are_balanced_in_each_split(small_dataset: tuple[Path, synth.SynthInfo]) -> None:
    root, info = small_dataset
    for split, total in (("train", 23), ("val", 10)):
        counts = {name: len(list((root / split / name).glob("*.png"))) for name in synth.CLASS_NAMES}
        assert sum(counts.values()) == total
        assert max(counts.values()) - min(counts.values()) <= 1
        assert min(counts.values()) == total // NUM_CLASSES
        assert info.class_counts[split] == counts


def test_masks_are_valid_and_contain_the_main_class(small_dataset: tuple[Path, synth.SynthInfo]) -> None:
    root, _ = small_dataset
    for split in ("train", "val"):
        for image_path in _images(root, split):
            image = Image.open(image_path)
            mask_image = Image.open(root / "masks" / split / image_path.parent.name / image_path.name)
            assert image.mode == "RGB" and mask_image.mode == "L"
            assert image.size == mask_image.size == (32, 32)
            mask = np.asarray(mask_image)
            assert set(np.unique(mask).tolist()) <= VALID_LABELS
            main_label = synth.CLASS_NAMES.index(image_path.parent.name) + 1
            assert np.count_nonzero(mask == main_label) >= 20  # a visible main object, not a stray pixel
            assert np.count_nonzero(mask == 0) > 0  # some background
            assert np.count_nonzero(mask == 255) <= 0.01 * mask.size


def test_list_samples_and_read_info(small_dataset: tuple[Path, synth.SynthInfo]) -> None:
    root, _ = small_dataset
    samples = synth.list_samples(root, "val")
    assert len(samples) == 10
    for image_path, mask_path, class_id in samples:
        assert image_path.parent.name == synth.CLASS_NAMES[class_id]
        assert mask_path.is_file() and mask_path.parts[-4:-2] == ("masks", "val")
    assert synth.read_synth_info(root).classes == synth.CLASS_NAMES
    with pytest.raises(DataError, match="classes.json"):
        synth.read_synth_info(root / "train")


def test_render_sample_is_deterministic_and_consistent() -> None:
    image_a, mask_a, class_a = synth.render_sample(123, size=48, class_id=4)
    image_b, mask_b, class_b = synth.render_sample(np.random.default_rng(123), size=48, class_id=4)
    assert class_a == class_b == 4
    assert np.array_equal(np.asarray(image_a), np.asarray(image_b)) and np.array_equal(mask_a, mask_b)
    assert image_a.size == (48, 48) and mask_a.shape == (48, 48) and mask_a.dtype == np.uint8
    image_c, _, _ = synth.render_sample(124, size=48, class_id=4)
    assert not np.array_equal(np.asarray(image_a), np.asarray(image_c))
    # Without distractors the only object label is the main class.
    for seed in range(10):
        _, mask, class_id = synth.render_sample(seed, size=40, class_id=seed % NUM_CLASSES, num_distractors=0)
        assert set(np.unique(mask).tolist()) - {0, 255} == {class_id + 1}
    with pytest.raises(ConfigError):
        synth.render_sample(0, size=8)
    with pytest.raises(ConfigError):
        synth.render_sample(0, class_id=NUM_CLASSES)


def test_mask_is_aligned_with_the_drawn_object() -> None:
    # Objects are drawn >= 0.45 (RGB distance, in [0, 1]) away from the background's mean colour, so the mean
    # colour under the object label must differ clearly from the mean colour under the background label; a mask
    # that were shifted, flipped or transposed relative to the image would mix the two.
    for seed in range(20):
        image, mask, class_id = synth.render_sample(
            seed, size=48, class_id=seed % NUM_CLASSES, num_distractors=0
        )
        pixels = np.asarray(image, dtype=np.float64) / 255.0
        inside, outside = mask == class_id + 1, mask == 0
        assert inside.sum() > 0.05 * mask.size and outside.sum() > 0.2 * mask.size
        assert np.linalg.norm(pixels[inside].mean(axis=0) - pixels[outside].mean(axis=0)) >= 0.15


def _boundary_distance_ok(mismatch: np.ndarray, signed_distance: np.ndarray) -> bool:
    """Pixels may disagree with the analytic shape only where their centre is within 0.02 px of its boundary."""
    return bool(np.all(np.abs(signed_distance[mismatch]) < 0.02))


def test_rasterized_circle_and_square_match_analytic_shapes() -> None:
    size = 64
    cols, rows = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)  # pixel centres
    cx, cy, radius = 30.3, 27.8, 17.5
    circle = synth.rasterize_shape(synth.ShapeSpec("circle", (cx, cy), radius), size)
    distance = np.hypot(cols - cx, rows - cy) - radius
    assert _boundary_distance_ok(circle != (distance <= 0), distance)
    assert abs(int(circle.sum()) - math.pi * radius**2) < 0.02 * math.pi * radius**2

    angle = 30.0  # counter-clockwise on screen
    square = synth.rasterize_shape(synth.ShapeSpec("square", (cx, cy), radius, angle), size)
    theta = math.radians(angle)
    dx, dy = cols - cx, -(rows - cy)  # y up for the usual rotation formula
    u = dx * math.cos(theta) + dy * math.sin(theta)  # coordinates in the square's own frame
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    half_side = radius / math.sqrt(2.0)
    square_distance = np.maximum(np.abs(u), np.abs(v)) - half_side
    assert _boundary_distance_ok(square != (square_distance <= 0), square_distance)
    assert abs(int(square.sum()) - (2 * half_side) ** 2) < 0.02 * (2 * half_side) ** 2

    ring = synth.rasterize_shape(synth.ShapeSpec("ring", (cx, cy), radius, 0.0, (0.5,)), size)
    inside_hole = np.hypot(cols - cx, rows - cy) < 0.5 * radius - 1
    assert (
        not ring[inside_hole].any() and ring[np.abs(np.hypot(cols - cx, rows - cy) - 0.75 * radius) < 2].all()
    )

    # Supersampling: scale 3 on a 3x canvas covers the same region.
    fine = synth.rasterize_shape(synth.ShapeSpec("circle", (cx, cy), radius), 3 * size, scale=3)
    fine_cols, fine_rows = np.meshgrid((np.arange(3 * size) + 0.5) / 3, (np.arange(3 * size) + 0.5) / 3)
    fine_distance = np.hypot(fine_cols - cx, fine_rows - cy) - radius
    assert _boundary_distance_ok(fine != (fine_distance <= 0), fine_distance)


def test_majority_labels_match_a_per_pixel_reference() -> None:
    rng = np.random.default_rng(0)
    size, scale = 12, 3
    # Blocky labels with random edges, so both majorities and 3-way ties occur.
    labels = rng.choice([0, 2, 5, 7], size=(size * scale, size * scale), p=[0.55, 0.15, 0.15, 0.15]).astype(
        np.uint8
    )
    result = synth._majority_labels(labels, size, scale, [0, 2, 5, 7])
    for row in range(size):
        for col in range(size):
            block = labels[row * scale : (row + 1) * scale, col * scale : (col + 1) * scale].ravel()
            counts = np.bincount(block, minlength=256)
            winner = int(counts.argmax())
            expected = winner if counts[winner] * 2 > scale * scale else 255
            assert result[row, col] == expected
    assert (result == 255).any() and (result != 255).any()


def test_refuses_foreign_non_empty_folder_and_replaces_previous_output(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        synth.generate_synthetic_dataset(foreign, num_train=3, num_val=1, size=24, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # nothing written
    synth.generate_synthetic_dataset(foreign, num_train=3, num_val=1, size=24, overwrite=True, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    # A previous synthetic data set is replaced without --overwrite, and stale images disappear.
    synth.generate_synthetic_dataset(foreign, num_train=12, num_val=2, size=24, progress=False)
    synth.generate_synthetic_dataset(foreign, num_train=4, num_val=1, size=24, progress=False)
    assert (
        len(_images(foreign, "train")) == 4 and len(list((foreign / "masks" / "train").glob("*/*.png"))) == 4
    )
    with pytest.raises(ConfigError):
        synth.generate_synthetic_dataset(tmp_path / "x", num_train=0, progress=False)
    with pytest.raises(ConfigError):
        synth.generate_synthetic_dataset(tmp_path / "y", num_train=2, size=8, progress=False)


def test_interrupted_run_is_detected_and_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "partial"
    real_render_and_save = synth._render_and_save
    calls = []

    def interrupted(task: tuple) -> int:
        calls.append(task)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real_render_and_save(task)

    monkeypatch.setattr(synth, "_render_and_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synth.generate_synthetic_dataset(out, num_train=10, num_val=2, size=24, progress=False)
    monkeypatch.setattr(synth, "_render_and_save", real_render_and_save)
    assert len(_images(out, "train")) == 3
    with pytest.raises(DataError, match="did not finish"):
        synth.read_synth_info(out)
    synth.generate_synthetic_dataset(
        out, num_train=10, num_val=2, size=24, progress=False
    )  # no --overwrite needed
    assert synth.read_synth_info(out).num_train == 10 and len(_images(out, "train")) == 10


@pytest.fixture
def data_only_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register only the `data` command, so that these tests do not depend on the other commands' modules."""
    monkeypatch.setattr(cli, "COMMANDS", {"data": cli.COMMANDS["data"]})


@pytest.mark.usefixtures("data_only_cli")
def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["data", "synth", "--out", str(out), "--num-images", "15", "--val-images", "5", "--size", "24"]
    assert cli.main([*argv, "--seed", "2", "--workers", "2"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "15 train + 5 val" in summary and str(out) in summary
    assert len(_images(out, "train")) == 15 and len(_images(out, "val")) == 5
    assert Image.open(_images(out, "val")[0]).size == (24, 24)
    api = tmp_path / "api"
    synth.generate_synthetic_dataset(api, num_train=15, num_val=5, size=24, seed=2, progress=False)
    assert _files(out) == _files(api)
    # --style picks a preset, recorded in classes.json; the images change, the layout does not.
    hard = tmp_path / "hard"
    assert cli.main([*argv[:3], str(hard), *argv[4:], "--seed", "2", "--style", "hard", "--quiet"]) == 0
    meta = json.loads((hard / "classes.json").read_text())
    assert meta["style_name"] == "hard" and meta["style"]["num_distractors"] == [1, 3]
    assert synth.read_synth_info(hard).style == synth.HARD_STYLE
    hard_files = _files(hard)
    assert (
        hard_files.keys() == _files(api).keys()
        and hard_files["train/circle/train_000000.png"] != _files(api)["train/circle/train_000000.png"]
    )


@pytest.mark.usefixtures("data_only_cli")
def test_cli_reports_non_empty_folder_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "something.txt").write_text("x")
    assert cli.main(["data", "synth", "--out", str(tmp_path), "--num-images", "2", "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--overwrite" in error and str(tmp_path) in error
    assert cli.main(["data"]) == 1  # no action: prints help


def test_vectorised_hsv_colours_match_colorsys() -> None:
    import colorsys

    colours = synth._random_colours(np.random.default_rng(5), 200)
    reference_rng = np.random.default_rng(5)  # same draws in the same order: hue, saturation, value
    hue = reference_rng.random(200)
    saturation, value = reference_rng.uniform(0.25, 1.0, 200), reference_rng.uniform(0.25, 1.0, 200)
    expected = np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hue, saturation, value)])
    assert np.allclose(colours, expected, atol=1e-6)


def test_style_presets_and_validation() -> None:
    assert set(synth.STYLES) == {"default", "easy", "hard", "textured", "textured-large"}
    # textured is the default style with one texture per class, nothing else changed
    assert synth.STYLES["textured"] == dataclasses.replace(synth.DEFAULT_STYLE, class_textures=True)
    most_distractors = [synth.STYLES[name].num_distractors[1] for name in ("easy", "default", "hard")]
    assert most_distractors == sorted(most_distractors)
    # textured-large: at most one distractor and a main object covering more of the image than in textured
    main_fraction = {}
    for name in ("textured", "textured-large"):
        fractions = []
        for seed in range(24):
            _, mask, class_id = synth.render_sample(seed, size=48, style=synth.STYLES[name])
            if name == "textured-large":
                assert (
                    len(set(np.unique(mask).tolist()) - {0, 255}) <= 2
                )  # the main class and one distractor's
            fractions.append(float(np.mean(mask == class_id + 1)))
        main_fraction[name] = np.mean(fractions)
    assert (
        main_fraction["textured-large"] > 1.15 * main_fraction["textured"]
    )  # radius ratio 0.41 / 0.36 on average
    with pytest.raises(ConfigError, match="distractor_scale"):
        synth.SynthStyle(distractor_scale=(0.5, 1.2))
    with pytest.raises(ConfigError, match="texture_weights"):
        synth.SynthStyle(texture_weights=(1.0, 0.0))
    with pytest.raises(ConfigError, match="main_radius"):
        synth.SynthStyle(main_radius=(0.4, 0.3))
    # The number of distractors follows the style: with none, only the main class is labelled.
    style = synth.SynthStyle(num_distractors=(0, 0))
    _, mask, class_id = synth.render_sample(1, size=40, class_id=2, style=style)
    assert set(np.unique(mask).tolist()) - {0, 255} == {class_id + 1}


def _square_fill_of_bounding_box(mask: np.ndarray) -> float:
    """Object pixels / pixels of their bounding box: 1 for an axis-aligned square, 0.5..1 for a rotated one."""
    rows, cols = np.nonzero((mask != 0) & (mask != 255))
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    return len(rows) / box


def test_max_rotation_zero_draws_upright_shapes() -> None:
    upright = synth.SynthStyle(num_distractors=(0, 0), max_rotation_deg=0.0)
    rotated = synth.SynthStyle(num_distractors=(0, 0))
    square = synth.CLASS_NAMES.index("square")
    upright_fill = [
        _square_fill_of_bounding_box(synth.render_sample(seed, size=48, class_id=square, style=upright)[1])
        for seed in range(8)
    ]
    rotated_fill = [
        _square_fill_of_bounding_box(synth.render_sample(seed, size=48, class_id=square, style=rotated)[1])
        for seed in range(8)
    ]
    # An upright square fills its bounding box up to the anti-aliased border rows; a square turned by angle a
    # fills 1 / (|cos a| + |sin a|)^2 of it, which is below 0.8 for angles between ~7 and ~83 degrees.
    assert min(upright_fill) > 0.93
    assert min(rotated_fill) < 0.8
    with pytest.raises(ConfigError, match="max_rotation_deg"):
        synth.SynthStyle(max_rotation_deg=-1.0)


def _interior_luminance(image: Image.Image, mask: np.ndarray, label: int) -> np.ndarray:
    """Luminance (0-255) of the object's pixels whose 5x5 neighbourhood is all that object, NaN elsewhere."""
    inside = mask == label
    eroded = inside.copy()
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            eroded &= np.roll(np.roll(inside, dy, axis=0), dx, axis=1)
    luminance = np.asarray(image.convert("L"), dtype=np.float64)
    return np.where(eroded, luminance, np.nan)


def _axis_variation(luminance: np.ndarray) -> tuple[float, float]:
    """Mean absolute luminance step between horizontal neighbours and between vertical neighbours (inside only)."""
    along_x = np.nanmean(np.abs(np.diff(luminance, axis=1)))
    along_y = np.nanmean(np.abs(np.diff(luminance, axis=0)))
    return float(along_x), float(along_y)


def test_class_textures_follow_the_class_in_image_axes() -> None:
    """With class_textures, stripes run along the image axes whatever the rotation, and the texture is high-contrast."""
    style = synth.SynthStyle(num_distractors=(0, 0), class_textures=True, max_noise_std=0.0)
    assert len(synth.CLASS_TEXTURES) == NUM_CLASSES
    horizontal = synth.CLASS_TEXTURES.index("horizontal stripes")
    vertical = synth.CLASS_TEXTURES.index("vertical stripes")
    solid = synth.CLASS_TEXTURES.index("solid")
    for seed in range(4):
        size = 96
        image, mask, _ = synth.render_sample(seed, size=size, class_id=horizontal, style=style)
        along_x, along_y = _axis_variation(_interior_luminance(image, mask, horizontal + 1))
        assert along_y > 10 * max(along_x, 0.5)  # constant along rows, stepping between them
        image, mask, _ = synth.render_sample(seed, size=size, class_id=vertical, style=style)
        along_x, along_y = _axis_variation(_interior_luminance(image, mask, vertical + 1))
        assert along_x > 10 * max(along_y, 0.5)
        luminance = _interior_luminance(image, mask, vertical + 1)
        # two bands, light and dark, at least ~60 grey levels apart (first colour vs its 30%/70% shade)
        assert np.nanpercentile(luminance, 90) - np.nanpercentile(luminance, 10) > 60
        image, mask, _ = synth.render_sample(seed, size=size, class_id=solid, style=style)
        assert np.nanstd(_interior_luminance(image, mask, solid + 1)) < 1.0
    # Off by default: the default style's textures do not depend on the class (any texture for any class).
    assert not synth.DEFAULT_STYLE.class_textures


def _stripe_colours(image: Image.Image, mask: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
    """The RGB colours (0-1) of the darkest and the lightest interior pixels of a two-colour striped object."""
    luminance = _interior_luminance(image, mask, label)
    rgb = np.asarray(image, dtype=np.float64) / 255.0
    inside = ~np.isnan(luminance)
    values, pixels = luminance[inside], rgb[inside]
    return pixels[values <= np.percentile(values, 5)].mean(axis=0), pixels[
        values >= np.percentile(values, 95)
    ].mean(axis=0)


def test_texture_contrast_gives_two_independent_colours_with_a_luma_gap() -> None:
    """texture_contrast=None: one hue in a light and a dark shade; a number: two colours of (mostly) different hue
    whose luma (0.299 R + 0.587 G + 0.114 B) differs by at least that much."""
    import colorsys

    vertical = synth.CLASS_TEXTURES.index("vertical stripes")
    luma = np.array([0.299, 0.587, 0.114])
    hue_gaps = {}
    for contrast in (None, 0.4):
        style = synth.SynthStyle(
            num_distractors=(0, 0), class_textures=True, max_noise_std=0.0, texture_contrast=contrast
        )
        gaps = []
        for seed in range(12):
            image, mask, _ = synth.render_sample(seed, size=96, class_id=vertical, style=style)
            dark, light = _stripe_colours(image, mask, vertical + 1)
            if contrast is not None:
                assert (
                    light - dark
                ) @ luma >= contrast - 0.02  # box-filtered edges stay out of the 5 % tails
            hues = [colorsys.rgb_to_hsv(*colour)[0] for colour in (dark, light)]
            gap = abs(hues[0] - hues[1])
            gaps.append(min(gap, 1.0 - gap))
        hue_gaps[contrast] = np.array(gaps)
    assert hue_gaps[None].max() < 0.03  # shades of one colour keep its hue
    assert (hue_gaps[0.4] > 0.05).mean() >= 0.5
    with pytest.raises(ConfigError, match="texture_contrast"):
        synth.SynthStyle(class_textures=True, texture_contrast=0.95)


def _stripe_period(image: Image.Image, mask: np.ndarray, label: int) -> float:
    """The period (px) of vertical stripes: the strongest frequency of the interior rows' luminance."""
    luminance = _interior_luminance(image, mask, label)
    rows = [row[~np.isnan(row)] for row in luminance]
    rows = [row - row.mean() for row in rows if row.size >= 32]
    length = 512
    power = sum(np.abs(np.fft.rfft(row, n=length)) ** 2 for row in rows)
    power[:3] = 0.0  # leave out the mean and the slowest drifts
    return length / float(np.argmax(power))


def test_texture_period_jitter_sets_the_spread_of_stripe_periods() -> None:
    """Periods are size / 7 times a factor in [1 - jitter, 1 + jitter]: exactly size / 7 without jitter."""
    vertical = synth.CLASS_TEXTURES.index("vertical stripes")
    size = 112
    spreads = {}
    for jitter in (0.0, 0.4):
        style = synth.SynthStyle(
            num_distractors=(0, 0), class_textures=True, max_noise_std=0.0, texture_period_jitter=jitter
        )
        periods = []
        for seed in range(10):
            image, mask, _ = synth.render_sample(seed, size=size, class_id=vertical, style=style)
            periods.append(_stripe_period(image, mask, vertical + 1))
        periods = np.array(periods) / (size / 7.0)
        assert periods.min() >= 1.0 - jitter - 0.05 and periods.max() <= 1.0 + jitter + 0.05
        spreads[jitter] = periods.max() - periods.min()
    assert spreads[0.0] < 0.05 and spreads[0.4] > 0.3
    with pytest.raises(ConfigError, match="texture_period_jitter"):
        synth.SynthStyle(class_textures=True, texture_period_jitter=0.7)
