"""Segmentation data sets: the VOC, plain and synthetic layouts, joint resizing, label handling and robustness; the
dense protocols' shared helpers (token choice, splits from tensors or Features, classes)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from franca.core.constants import IMAGENET_MEAN, IMAGENET_STD
from franca.core.errors import ConfigError, DataError
from franca.data.images import SkipCounter
from franca.eval.common import make_loader
from franca.eval.segmentation_data import (
    SegmentationDataset,
    dense_split,
    detect_layout,
    patch_token,
    resize_square,
    segmentation_classes,
)
from franca.features import Features


def _save_rgb(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode="RGB").save(path)


def _save_mask(path: Path, mask: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        image.putpalette([value for index in range(256) for value in (index, 255 - index, (7 * index) % 256)])
    image.save(path)


def _quadrant_mask(size: int, labels: tuple[int, int, int, int]) -> np.ndarray:
    half = size // 2
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:half, :half], mask[:half, half:], mask[half:, :half], mask[half:, half:] = labels
    return mask


def make_voc_tree(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    stems = ["2007_000001", "2007_000002", "2007_000003"]
    for index, stem in enumerate(stems):
        _save_rgb(voc / "JPEGImages" / f"{stem}.jpg", np.full((16, 16, 3), 40 * index))
        mask = _quadrant_mask(16, (0, index + 1, 255, 20))
        _save_mask(
            voc / ("SegmentationClassAug" if index == 2 else "SegmentationClass") / f"{stem}.png", mask, True
        )
    (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2007_000001\n2007_000003\n2007_999999\n")
    (sets / "val.txt").write_text("2007_000002\n")
    return root


def test_voc_layout_reads_palette_indices_and_aug_masks(tmp_path: Path) -> None:
    root = make_voc_tree(tmp_path)
    assert detect_layout(root) == "voc"
    with pytest.warns(UserWarning, match="1 listed image"):
        train = SegmentationDataset(root, split="train", size=16)
    assert train.layout == "voc" and train.num_classes == 21 and train.class_names[15] == "person"
    assert len(train) == 2 and train.num_missing == 1  # 2007_999999 has no files
    image, mask = train[1]  # 2007_000003, mask from SegmentationClassAug
    assert image.shape == (3, 16, 16) and mask.dtype == torch.int64
    assert torch.equal(mask, torch.from_numpy(_quadrant_mask(16, (0, 3, 255, 20)).astype(np.int64)))
    val = SegmentationDataset(root / "VOCdevkit" / "VOC2012", split="val", size=16)
    assert len(val) == 1
    with pytest.raises(DataError, match="trainaug"):
        SegmentationDataset(root, split="trainaug", size=16)


def test_plain_layout_flat_and_split_folders_and_class_inference(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    for index in range(3):
        _save_rgb(flat / "images" / f"a{index}.png", np.zeros((8, 8, 3)))
        _save_mask(flat / "masks" / f"a{index}.png", _quadrant_mask(8, (0, 1, 2 + index, 255)))
    _save_rgb(flat / "images" / "no_mask.png", np.zeros((8, 8, 3)))
    with pytest.warns(UserWarning):
        dataset = SegmentationDataset(flat, size=8)
    assert dataset.layout == "plain" and len(dataset) == 3 and dataset.num_missing == 1
    assert dataset.num_classes == 5  # largest label 4 (index 2: 2 + 2), 255 ignored
    assert dataset.class_names == tuple(f"class_{i}" for i in range(5))

    split = tmp_path / "split"
    for name, count in (("train", 2), ("val", 1)):
        for index in range(count):
            _save_rgb(split / "images" / name / f"{name}{index}.jpg", np.zeros((8, 8, 3)))
            _save_mask(split / "masks" / name / f"{name}{index}.png", _quadrant_mask(8, (0, 1, 1, 0)))
    (split / "classes.txt").write_text("sky\nroad\n")
    train = SegmentationDataset(split, split="train", size=8)
    val = SegmentationDataset(split, split="val", size=8)
    assert (len(train), len(val)) == (2, 1)
    assert train.class_names == ("sky", "road") and train.num_classes == 2


def test_synth_layout_from_root_and_split_folder(tmp_path: Path) -> None:
    from franca.data.synth import generate_synthetic_dataset

    root = tmp_path / "synth"
    generate_synthetic_dataset(root, num_train=3, num_val=2, size=16, seed=0, progress=False)
    assert detect_layout(root) == "synth"
    train = SegmentationDataset(root, split="train", size=16)
    assert train.layout == "synth" and len(train) == 3
    assert train.num_classes == 11 and train.class_names[:2] == ("background", "circle")
    val = SegmentationDataset(root / "val", split="ignored", size=16)  # the split folder names the split
    assert len(val) == 2 and val.split == "val" and all("val" in str(s.image) for s in val.samples)
    image, mask = val[0]
    reference = np.asarray(Image.open(val.samples[0].mask)).astype(np.int64)
    assert torch.equal(mask, torch.from_numpy(reference))
    expected = (np.asarray(Image.open(val.samples[0].image).convert("RGB"), dtype=np.float32) / 255.0)[..., 0]
    assert torch.allclose(
        image[0], (torch.from_numpy(expected) - IMAGENET_MEAN[0]) / IMAGENET_STD[0], atol=1e-5
    )
    background_free = SegmentationDataset(root, split="train", size=16, ignore_background=True)
    assert background_free.num_classes == 10 and background_free.class_names[0] == "circle"


def test_joint_resize_uses_nearest_for_masks_and_crop_mode(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    mask = np.array([[0, 1], [2, 255]], dtype=np.uint8)  # 2x2 -> each label becomes a 4x4 block at 8 px
    _save_rgb(root / "images" / "x.png", np.array([[[0] * 3, [255] * 3], [[255] * 3, [0] * 3]]))
    _save_mask(root / "masks" / "x.png", mask)
    _, resized = SegmentationDataset(root, size=8, num_classes=3)[0]
    expected = torch.from_numpy(np.kron(mask.astype(np.int64), np.ones((4, 4), dtype=np.int64)))
    assert torch.equal(resized, expected)

    wide = tmp_path / "wide"
    wide_mask = np.zeros((4, 8), dtype=np.uint8)
    wide_mask[:, 2:6] = 1  # the centre 4 columns
    _save_rgb(wide / "images" / "w.png", np.zeros((4, 8, 3)))
    _save_mask(wide / "masks" / "w.png", wide_mask)
    image, cropped = SegmentationDataset(wide, size=4, resize_mode="crop", num_classes=2)[0]
    assert image.shape == (3, 4, 4) and torch.equal(cropped, torch.ones(4, 4, dtype=torch.long))
    _, squashed = SegmentationDataset(wide, size=4, resize_mode="resize", num_classes=2)[0]
    assert torch.equal(squashed[0], torch.tensor([0, 1, 1, 0]))


def test_ignore_background_remaps_labels(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    _save_rgb(root / "images" / "x.png", np.zeros((4, 4, 3)))
    _save_mask(root / "masks" / "x.png", _quadrant_mask(4, (0, 1, 3, 255)))
    dataset = SegmentationDataset(root, size=4, ignore_background=True)
    assert dataset.num_classes == 3  # labels 1..3 -> 0..2
    _, mask = dataset[0]
    assert torch.equal(mask, torch.from_numpy(_quadrant_mask(4, (255, 0, 2, 255)).astype(np.int64)))


def test_mismatched_mask_size_names_both_files(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    _save_rgb(root / "images" / "bad.png", np.zeros((8, 8, 3)))
    _save_mask(root / "masks" / "bad.png", np.zeros((6, 8)))
    dataset = SegmentationDataset(root, size=8, num_classes=2)
    with pytest.raises(DataError) as error:
        dataset[0]
    message = str(error.value)
    assert str(root / "images" / "bad.png") in message and str(root / "masks" / "bad.png") in message
    assert "\n" not in message


def test_label_beyond_num_classes_is_a_data_error(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    _save_rgb(root / "images" / "x.png", np.zeros((4, 4, 3)))
    _save_mask(root / "masks" / "x.png", _quadrant_mask(4, (0, 1, 7, 255)))
    with pytest.raises(DataError, match="--num-classes"):
        SegmentationDataset(root, size=4, num_classes=3)[0]


def test_unreadable_image_and_mask_are_skipped_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    for index in range(4):
        _save_rgb(root / "images" / f"x{index}.png", np.full((8, 8, 3), 10 * index))
        _save_mask(root / "masks" / f"x{index}.png", np.ones((8, 8)))
    (root / "images" / "x1.png").write_bytes(b"not a png")
    (root / "masks" / "x3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    dataset = SegmentationDataset(root, size=8, num_classes=2)
    counter = SkipCounter()
    seen = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in make_loader(dataset, batch_size=3):
            if counter.update(batch):
                assert batch.inputs.shape[1:] == (3, 8, 8) and batch.targets.shape[1:] == (8, 8)
                seen += batch.inputs.shape[0]
    assert (seen, counter.num_loaded, counter.num_skipped) == (2, 2, 2)


def test_unknown_folder_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "something").mkdir()
    with pytest.raises(DataError, match="not a segmentation data set"):
        SegmentationDataset(tmp_path / "something")
    with pytest.raises(DataError, match="does not exist"):
        SegmentationDataset(tmp_path / "missing")


def test_resize_square_resizes_or_crops_images_and_label_maps() -> None:
    labels = torch.tensor([[[0, 1], [2, 3]]], dtype=torch.int64)
    blocks = resize_square(labels, 4, nearest=True)  # each label becomes a 2x2 block, never blended
    assert torch.equal(blocks[0], torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]))
    wide = torch.arange(8, dtype=torch.int64).repeat(4, 1)[None]  # [1, 4, 8]: column index
    cropped = resize_square(wide, 4, "crop", nearest=True)  # shorter side already 4: the centre 4 columns
    assert torch.equal(cropped[0], torch.tensor([2, 3, 4, 5]).repeat(4, 1))
    image = torch.full((3, 6, 10), 200, dtype=torch.uint8)
    assert resize_square(image, 5).shape == (3, 5, 5) and bool((resize_square(image, 5) == 200).all())
    with pytest.raises(ConfigError, match="resize mode"):
        resize_square(image, 5, "stretch")


class _Model(torch.nn.Module):
    def __init__(self, rasa: object = None) -> None:
        super().__init__()
        self.rasa = rasa


def test_patch_token_follows_the_tokens_choice_and_the_rasa_head() -> None:
    plain, with_rasa = _Model(), _Model(rasa=torch.nn.Identity())
    assert patch_token(plain) == "patch" and patch_token(with_rasa) == "patch_rasa"
    assert patch_token(with_rasa, "patch") == "patch" and patch_token(with_rasa, "rasa") == "patch_rasa"
    assert patch_token(plain, "patch", n_blocks=4) == "patch_blocks"
    with pytest.raises(ConfigError, match="no RASA head"):
        patch_token(plain, "rasa")
    with pytest.raises(ConfigError, match="cannot be combined with RASA"):
        patch_token(with_rasa, "auto", n_blocks=2)
    with pytest.raises(ConfigError, match="tokens"):
        patch_token(plain, "cls")


def test_dense_split_from_tensors_and_features() -> None:
    grids, masks = torch.zeros(2, 3, 3, 5), torch.zeros(2, 12, 12, dtype=torch.uint8)
    assert dense_split(grids, masks, "val") == (grids, masks)
    features = Features(targets=masks, patch=grids, patch_rasa=grids + 1)
    got, got_masks = dense_split(features, None, "val")
    assert torch.equal(got, grids + 1) and got_masks is masks  # the RASA tokens when both were extracted
    with pytest.raises(ConfigError, match="masks are missing"):
        dense_split(grids, None, "train")
    with pytest.raises(ConfigError, match="no patch tokens"):
        dense_split(Features(targets=masks, cls=torch.zeros(2, 5)), None, "val")
    with pytest.raises(DataError, match=r"patch grids \(2, 3, 3, 5\) do not match"):
        dense_split(grids, masks[:1], "val")


def test_segmentation_classes_take_the_larger_count_and_the_val_names() -> None:
    class Data:
        def __init__(self, num_classes: int, names: tuple[str, ...] = ()) -> None:
            self.num_classes, self.class_names = num_classes, names

    assert segmentation_classes(Data(2, ("a", "b")), Data(3)) == (3, ("class_0", "class_1", "class_2"))
    assert segmentation_classes(Data(2, ("a", "b"))) == (2, ("a", "b"))
    assert segmentation_classes(Data(2, ("a", "b")), num_classes=2) == (2, ("a", "b"))
    with pytest.raises(ConfigError, match="number of classes is unknown"):
        segmentation_classes(object())


def test_max_images_is_a_seeded_uniform_sample_not_the_first_classes(tmp_path: Path) -> None:
    """A sorted class-foldered listing cut to its first N files holds whole classes; the sample must not."""
    from franca.eval.segmentation_data import seeded_subset

    listing = [f"class{label}/{index:02d}.png" for label in range(4) for index in range(25)]  # sorted, 4 x 25
    picked = seeded_subset(listing, 20, seed=0)
    assert len(picked) == 20 and len(set(picked)) == 20 and set(picked) <= set(listing)
    assert picked == sorted(picked, key=listing.index)  # listed order kept
    assert picked != listing[:20]
    assert (
        len({name.split("/")[0] for name in picked}) >= 3
    )  # P(<= 2 of 4 classes in 20 uniform draws) < 1e-6
    assert seeded_subset(listing, 20, seed=0) == picked and seeded_subset(listing, 20, seed=1) != picked
    assert seeded_subset(listing, None) == listing and seeded_subset(listing, 500) == listing
    with pytest.raises(ConfigError, match="--max-images"):
        seeded_subset(listing, 0)

    from franca.data.synth import generate_synthetic_dataset

    root = tmp_path / "synth"
    generate_synthetic_dataset(root, num_train=6, num_val=2, size=16, seed=0, progress=False)
    full = SegmentationDataset(root, split="train", size=16)
    sample = SegmentationDataset(root, split="train", size=16, max_samples=3)
    assert sample.samples == seeded_subset(full.samples, 3, seed=0)
    facts = sample.describe()
    assert facts["num_samples"] == 3 and facts["num_listed"] == 6 and "seed 0" in facts["subset"]
    assert full.describe()["subset"] == "all"
