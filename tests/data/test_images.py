"""Tests of franca.data.images: listing inputs, decoding every PIL mode, skipping unreadable files."""

from __future__ import annotations

import os
import socket
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from franca.core.errors import DataError
from franca.data.images import (
    IMAGE_EXTENSIONS,
    TRANSPARENT_BACKGROUND,
    ImageFileDataset,
    SkipCounter,
    UnreadableImageError,
    collate_skip_none,
    list_images,
    load_image,
)

BACKGROUND = np.array((124, 116, 104), dtype=np.float64)  # ImageNet mean x 255, rounded


def _save_rgb(path: Path, value: int = 100, size: tuple[int, int] = (6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def _abs(path: Path) -> Path:
    return Path(os.path.abspath(path))


# ----------------------------------------------------------------------------------------------------------- listing


def test_extensions_cover_the_documented_formats() -> None:
    for ext in ("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm"):
        assert f".{ext}" in IMAGE_EXTENSIONS
    assert tuple(TRANSPARENT_BACKGROUND) == (124, 116, 104)


def test_list_images_folder_is_recursive_sorted_and_skips_hidden_and_non_images(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    b = _save_rgb(root / "b.png")
    a_upper = _save_rgb(root / "a" / "z.JPG")
    a_nested = _save_rgb(root / "a" / "deep" / "x.bmp")
    _save_rgb(root / ".hidden" / "h.png")
    _save_rgb(root / "a" / ".secret.png")
    (root / "notes.txt").write_text("not an image")
    # sorted by path components: a/deep/x.bmp < a/z.JPG < b.png
    assert list_images(root) == [_abs(a_nested), _abs(a_upper), _abs(b)]
    assert list_images(str(root)) == list_images([root])


def test_list_images_glob_with_double_star(tmp_path: Path) -> None:
    top = _save_rgb(tmp_path / "top.png")
    sub = _save_rgb(tmp_path / "s1" / "s2" / "deep.png")
    _save_rgb(tmp_path / "s1" / "other.jpg")
    assert list_images(str(tmp_path / "**" / "*.png")) == [_abs(sub), _abs(top)]
    assert list_images(str(tmp_path / "*.png")) == [_abs(top)]


def test_list_images_list_file_resolves_relative_paths_and_skips_comments(tmp_path: Path) -> None:
    one = _save_rgb(tmp_path / "data" / "one.png")
    two = _save_rgb(tmp_path / "elsewhere" / "two.jpg")
    listing = tmp_path / "data" / "train.txt"
    listing.write_text(f"# header comment\n\none.png\n   \n{two}\n# one.png again below\none.png\n")
    assert list_images(listing) == [_abs(one), _abs(two)]


def test_list_images_list_file_with_missing_entries_warns_and_skips(tmp_path: Path) -> None:
    one = _save_rgb(tmp_path / "one.png")
    listing = tmp_path / "list.txt"
    listing.write_text("one.png\nmissing.png\n")
    with pytest.warns(UserWarning, match="1 listed file"):
        assert list_images(listing) == [_abs(one)]


def test_list_images_mixed_inputs_keep_order_and_remove_duplicates(tmp_path: Path) -> None:
    a = _save_rgb(tmp_path / "f" / "a.png")
    b = _save_rgb(tmp_path / "f" / "b.png")
    single = _save_rgb(tmp_path / "single.webp")
    listing = tmp_path / "l.txt"
    listing.write_text("f/b.png\nsingle.webp\n")
    assert list_images([single, tmp_path / "f", listing]) == [_abs(single), _abs(a), _abs(b)]


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope"):
        list_images(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no images found in .*empty.*\.jpg"):
        list_images(empty)
    with pytest.raises(DataError, match="no images found"):
        list_images(str(tmp_path / "*.png"))
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes([0xFF, 0xFE, 0x00, 0x80, 0x81]))
    with pytest.raises(DataError, match="blob.bin"):
        list_images(binary)


def _within(seconds: float, function, *args):
    """``function(*args)`` run in a daemon thread; fails (instead of hanging the test run) if it takes too long.

    Returns ``(result, warnings recorded in the thread)`` and re-raises what the function raised.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                outcome["result"] = function(*args)
            except BaseException as error:  # handed to the test thread
                outcome["error"] = error
        outcome["warnings"] = [str(w.message) for w in caught]

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), (
        f"{function.__name__} did not return within {seconds} s (blocked on a FIFO?)"
    )
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"], outcome["warnings"]


def _make_socket(path: Path) -> bool:
    """A UNIX socket file at ``path`` (False when the platform or the path length does not allow one)."""
    if not hasattr(socket, "AF_UNIX") or len(os.fsencode(path)) >= 100:
        return False
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(os.fspath(path))
    finally:
        server.close()
    return True


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_list_images_skips_fifos_and_sockets_but_keeps_symlinks_to_files(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    real = _save_rgb(root / "a.png")
    os.mkfifo(root / "x.jpg")  # opening it for reading would block forever
    (root / "link.png").symlink_to(real)
    (root / "link_to_fifo.png").symlink_to(root / "x.jpg")
    (root / "dangling.png").symlink_to(root / "gone.png")  # kept: reported as unreadable when loaded
    has_socket = _make_socket(root / "s.png")
    found, caught = _within(30, list_images, root)
    assert found == [_abs(real), _abs(root / "dangling.png"), _abs(root / "link.png")]
    special = 3 if has_socket else 2
    assert any(f"{special} entries that are not regular files" in message for message in caught), caught
    assert any("first: " + str(root / "link_to_fifo.png") in message for message in caught), caught
    # the same rule for the class folders of training / ImageFolder data sets, which use the same walk
    from franca.data.images import _walk_images

    assert _within(30, _walk_images, root)[0] == [root / "a.png", root / "dangling.png", root / "link.png"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_list_images_fifo_given_directly_or_listed_is_not_opened(tmp_path: Path) -> None:
    one = _save_rgb(tmp_path / "one.png")
    os.mkfifo(tmp_path / "pipe.jpg")
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(DataError, match=r"pipe\.jpg is not a regular file"):
        _within(30, list_images, tmp_path / "pipe.jpg")
    with pytest.raises(DataError, match=r"pipe\.txt is not a regular file"):
        _within(30, list_images, tmp_path / "pipe.txt")  # would be read as a list file
    listing = tmp_path / "list.txt"
    listing.write_text("one.png\npipe.jpg\n")
    found, caught = _within(30, list_images, listing)
    assert found == [_abs(one)]
    assert any("pipe.jpg" in message and "not regular files" in message for message in caught), caught
    with pytest.raises(DataError, match="no images found"):
        _within(30, list_images, str(tmp_path / "*.jpg"))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_load_image_refuses_a_fifo_without_opening_it(tmp_path: Path) -> None:
    """Listings skip FIFOs, but any path handed to load_image (a segmentation pair, a file list) must not block."""
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(UnreadableImageError, match="not a regular file"):
        _within(30, load_image, tmp_path / "pipe.png")
    with pytest.raises(UnreadableImageError, match="not a regular file"):
        _within(30, load_image, tmp_path)  # a folder


# ----------------------------------------------------------------------------------------------------------- loading


def _roundtrip(tmp_path: Path, image: Image.Image, name: str, **save_kwargs) -> Image.Image:
    path = tmp_path / name
    image.save(path, **save_kwargs)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.size == image.size
    return loaded


def test_load_rgb_is_unchanged(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    loaded = _roundtrip(tmp_path, Image.fromarray(pixels), "rgb.png")
    np.testing.assert_array_equal(np.asarray(loaded), pixels)


def test_load_rgba_composites_onto_the_background(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = [200, 40, 0]
    rgba[..., 3] = [[0, 128, 255], [255, 64, 0]]
    loaded = np.asarray(_roundtrip(tmp_path, Image.fromarray(rgba, "RGBA"), "rgba.png")).astype(np.float64)
    alpha = rgba[..., 3:4] / 255.0
    expected = rgba[..., :3] * alpha + BACKGROUND * (1 - alpha)
    np.testing.assert_allclose(loaded, expected, atol=1.0)


def test_load_la_composites_gray_with_alpha(tmp_path: Path) -> None:
    la = np.zeros((1, 2, 2), dtype=np.uint8)
    la[0, :, 0] = 60
    la[0, :, 1] = [255, 0]
    loaded = np.asarray(_roundtrip(tmp_path, Image.fromarray(la, "LA"), "la.png")).astype(np.float64)
    np.testing.assert_allclose(loaded[0, 0], [60, 60, 60], atol=1.0)
    np.testing.assert_allclose(loaded[0, 1], BACKGROUND, atol=1.0)


def test_load_gray_and_bilevel_replicate_the_channel(tmp_path: Path) -> None:
    gray = np.array([[0, 17, 255]], dtype=np.uint8)
    loaded = np.asarray(_roundtrip(tmp_path, Image.fromarray(gray, "L"), "l.png"))
    np.testing.assert_array_equal(loaded, np.repeat(gray[..., None], 3, axis=2))
    bilevel = Image.fromarray(np.array([[0, 255, 255, 0]], dtype=np.uint8)).convert("1")
    loaded = np.asarray(_roundtrip(tmp_path, bilevel, "one.png"))
    np.testing.assert_array_equal(loaded[0, :, 0], [0, 255, 255, 0])


def test_load_palette_with_and_without_transparency(tmp_path: Path) -> None:
    palette_image = Image.new("P", (3, 1))
    palette = [10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (256 * 3 - 9)
    palette_image.putpalette(palette)
    palette_image.putdata([0, 1, 2])
    loaded = np.asarray(_roundtrip(tmp_path, palette_image, "p.png"))
    np.testing.assert_array_equal(loaded[0], [[10, 20, 30], [200, 100, 50], [0, 255, 0]])
    loaded = np.asarray(_roundtrip(tmp_path, palette_image, "p_t.png", transparency=1)).astype(np.float64)
    np.testing.assert_array_equal(loaded[0, 0], [10, 20, 30])
    np.testing.assert_allclose(loaded[0, 1], BACKGROUND, atol=1.0)
    np.testing.assert_array_equal(loaded[0, 2], [0, 255, 0])
    gif = np.asarray(_roundtrip(tmp_path, palette_image, "p_t.gif", transparency=1)).astype(np.float64)
    np.testing.assert_allclose(gif[0, 1], BACKGROUND, atol=1.0)


def test_load_cmyk(tmp_path: Path) -> None:
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [30, 100, 200, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    loaded = np.asarray(_roundtrip(tmp_path, Image.fromarray(cmyk, "CMYK"), "cmyk.tif")).astype(np.int64)
    # with K = 0 every CMYK->RGB formula gives 255 - C, 255 - M, 255 - Y; full K is black
    np.testing.assert_array_equal(loaded[0, :3], 255 - cmyk[0, :3, :3].astype(np.int64))
    np.testing.assert_array_equal(loaded[0, 3], [0, 0, 0])


def test_load_16bit_scales_by_the_actual_maximum(tmp_path: Path) -> None:
    values = np.linspace(0, 4095, 64).round().astype(np.uint16).reshape(8, 8)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    path = tmp_path / "sixteen.png"
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode in ("I;16", "I")
    loaded = np.asarray(load_image(path))
    expected = np.floor(values.astype(np.float64) * 255.0 / 4095.0 + 0.5)
    np.testing.assert_array_equal(loaded[..., 0], expected)
    np.testing.assert_array_equal(loaded[..., 2], expected)
    assert loaded.max() == 255 and loaded.min() == 0  # no clipping: 4095 -> 255, not 255 -> 255
    assert len(np.unique(loaded)) > 50  # the gradient survives


def test_load_32bit_integer_with_negative_values_uses_min_max(tmp_path: Path) -> None:
    values = np.array([[-1000, 0, 1000, 3000]], dtype=np.int32)
    loaded = np.asarray(_roundtrip(tmp_path, Image.fromarray(values, "I"), "int.tif"))[0, :, 0]
    np.testing.assert_array_equal(loaded, [0, 64, 128, 255])  # (v + 1000) * 255 / 4000, rounded


def test_load_float_images(tmp_path: Path) -> None:
    unit = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    loaded = np.asarray(_roundtrip(tmp_path, Image.fromarray(unit, "F"), "unit.tif"))[0, :, 0]
    np.testing.assert_array_equal(loaded, [0, 64, 128, 255])  # x * 255, rounded half up
    wide = np.array([[0.0, 10.0, 400.0]], dtype=np.float32)
    loaded = np.asarray(_roundtrip(tmp_path, Image.fromarray(wide, "F"), "wide.tif"))[0, :, 0]
    np.testing.assert_array_equal(loaded, [0, 6, 255])  # x * 255 / 400


def test_load_applies_exif_orientation(tmp_path: Path) -> None:
    stored = np.zeros((2, 4, 3), dtype=np.uint8)
    stored[0, 0] = [255, 0, 0]
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "oriented.png"
    image.save(path, exif=exif)
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (4, 2, 3)
    # rotating 90 degrees clockwise sends the top-left pixel to the top-right corner
    np.testing.assert_array_equal(loaded[0, 1], [255, 0, 0])
    assert loaded[..., 0].sum() == 255


def test_unreadable_files_raise_with_path_and_reason(tmp_path: Path) -> None:
    noisy = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good_png = tmp_path / "good.png"
    Image.fromarray(noisy).save(good_png)
    truncated_png = tmp_path / "truncated.png"
    truncated_png.write_bytes(good_png.read_bytes()[: good_png.stat().st_size // 2])
    good_jpg = tmp_path / "good.jpg"
    Image.fromarray(noisy).save(good_jpg, quality=95)
    truncated_jpg = tmp_path / "truncated.jpg"
    truncated_jpg.write_bytes(good_jpg.read_bytes()[: good_jpg.stat().st_size // 2])
    random_jpg = tmp_path / "random.jpg"
    random_jpg.write_bytes(np.random.default_rng(2).integers(0, 256, 500, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path in (truncated_png, truncated_jpg, random_jpg, empty, tmp_path / "missing.png"):
        with pytest.raises(UnreadableImageError, match=path.name):
            load_image(path)
    with pytest.raises(UnreadableImageError, match="0 bytes"):
        load_image(empty)
    with pytest.raises(UnreadableImageError, match="truncated"):
        load_image(truncated_png)
    assert isinstance(UnreadableImageError("x"), DataError)


# ----------------------------------------------------------------------------------------------- data set and collate


def _pixel_transform(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _dataset_with_one_bad(tmp_path: Path, labels: list[int] | None = None) -> ImageFileDataset:
    paths = [_save_rgb(tmp_path / f"{i}.png", value=10 * (i + 1)) for i in range(3)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    paths.insert(1, bad)
    return ImageFileDataset(paths, transform=_pixel_transform, labels=labels)


def test_image_file_dataset_returns_targets_and_none_for_unreadable(tmp_path: Path) -> None:
    dataset = _dataset_with_one_bad(tmp_path)
    assert len(dataset) == 4
    image, target = dataset[2]
    assert target == 2 and image.shape == (3, 4, 6) and int(image[0, 0, 0]) == 20
    with pytest.warns(UserWarning, match="bad.png"):
        assert dataset[1] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second read of the same file is silent
        assert dataset[1] is None
    labelled = _dataset_with_one_bad(tmp_path, labels=[7, 8, 9, 5])
    assert labelled[3][1] == 5
    with pytest.raises(DataError, match="labels"):
        ImageFileDataset([tmp_path / "0.png"], labels=[1, 2])


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
@pytest.mark.parametrize("workers", [0, 1])
def test_collate_skip_none_counts_dropped_samples(tmp_path: Path, workers: int) -> None:
    dataset = _dataset_with_one_bad(tmp_path)
    loader = DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=collate_skip_none)
    counter = SkipCounter()
    batches = list(loader)
    assert len(batches) == 1
    batch = batches[0]
    assert counter.update(batch) is True
    assert batch.num_skipped == 1 and len(batch) == 3
    assert batch.inputs.shape == (3, 3, 4, 6)
    assert batch.targets.tolist() == [0, 2, 3]
    assert batch.inputs[:, 0, 0, 0].tolist() == [10, 20, 30]
    assert (counter.num_loaded, counter.num_skipped) == (3, 1)
    assert counter.global_counts() == (3, 1)


def test_collate_all_unreadable_gives_an_empty_batch() -> None:
    batch = collate_skip_none([None, None])
    assert batch.empty and len(batch) == 0 and batch.num_skipped == 2
    counter = SkipCounter()
    assert counter.update(batch) is False
    assert (counter.num_loaded, counter.num_skipped, counter.num_empty_batches) == (0, 2, 1)
    nested = collate_skip_none([({"a": [torch.zeros(2), torch.ones(2)]}, 4), None])
    assert nested.num_skipped == 1 and nested.targets.tolist() == [4]
    assert nested.inputs["a"][1].shape == (1, 2)
