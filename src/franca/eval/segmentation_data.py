"""Semantic segmentation data sets for the dense evaluations: images with per-pixel label masks.

:class:`SegmentationDataset` reads three layouts (``layout="auto"`` picks the first that matches, in this order):

- ``"synth"``: the procedural data set of :mod:`franca.data.synth` (``DIR/classes.json`` written by ``franca data
  synth``; images ``DIR/<split>/<class>/<stem>.png``, masks ``DIR/masks/<split>/<class>/<stem>.png``, 0 =
  background, class id + 1 = object, 255 = ignore). ``root`` may also be the split folder itself (``DIR/val``).
  Number of classes: 1 + the number of shape classes.
- ``"voc"``: Pascal VOC (``JPEGImages/<stem>.jpg``, ``SegmentationClass/<stem>.png`` palette PNGs whose palette
  indices are the labels, ``ImageSets/Segmentation/<split>.txt``); ``root`` may be ``VOC2012`` or a folder holding
  ``VOC2012`` or ``VOCdevkit/VOC2012``. Masks missing from ``SegmentationClass`` are looked up in
  ``SegmentationClassAug`` (the usual "trainaug" set-up). Number of classes: 21.
- ``"plain"``: ``images/`` and ``masks/`` folders with the same file stems, either flat or with ``<split>``
  sub-folders (``images/<split>/`` or ``<split>/images/``); an optional ``classes.txt`` (one name a line) names the
  classes. Number of classes: inferred as 1 + the largest label found in the masks (all masks are read once).

Every sample is ``(image [3, S, S] float, ImageNet-normalised, mask [S, S] int64)`` with 255 = ignore. Image and
mask get the same geometric transform: ``resize_mode="resize"`` resizes both to S x S (the open-hummingbird-eval and
Leopart protocols), ``"crop"`` resizes the shorter side to S and centre-crops S x S (DINOv2's evaluation crop);
images are resized bilinearly with antialiasing, masks with nearest neighbour so labels are never blended.

Label 0 is a class (background, the VOC convention) unless ``ignore_background=True``, which maps 0 to ignore and
shifts the other labels down by one (mmsegmentation's ``reduce_zero_label``; used e.g. for COCO-Thing in Leopart).

Robustness: an unreadable image or mask (missing, empty, corrupt) is skipped: ``dataset[i]`` returns ``None`` after
one warning, and :func:`franca.data.images.collate_skip_none` drops and counts it (load it with
:func:`franca.eval.common.make_loader`; :func:`franca.eval.common.dataset_features` extracts its features with the
masks as targets); list entries without a file are dropped at listing time and counted in
:attr:`SegmentationDataset.num_missing`. A mask whose size differs from its image's, a colour (RGB) mask, or a label
outside ``[0, num_classes)`` is a :class:`~franca.core.errors.DataError` naming the files, since it means the data set
itself is inconsistent.

What the dense protocols (HummingBird, linear segmentation, overclustering, PCA maps) share beyond the data is here
too: :func:`patch_token` (which :mod:`franca.features` token their ``--tokens`` choice names), :func:`dense_split`
(a split's patch grids and masks, from tensors or :class:`~franca.features.Features`) and
:func:`segmentation_classes` (the number and names of the classes).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from franca.core.constants import IMAGENET_MEAN, IMAGENET_STD
from franca.core.errors import ConfigError, DataError, check_choice
from franca.core.progress import ProgressBar
from franca.data.images import UnreadableImageError, load_image
from franca.data.synth import list_samples, read_synth_info
from franca.eval import defaults
from franca.features import Features

IGNORE_INDEX = 255
LAYOUTS = defaults.LAYOUTS
RESIZE_MODES = defaults.RESIZE_MODES
TOKEN_CHOICES = defaults.TOKEN_CHOICES
VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".pgm", ".ppm")


class UnreadableMaskError(DataError):
    """A mask file cannot be opened or fully decoded."""


@dataclass(frozen=True)
class SegmentationSample:
    """One image file and its label-mask file."""

    image: Path
    mask: Path


@dataclass
class SegmentationListing:
    """What a layout reader found: the samples, how many listed entries had no file, and class information."""

    samples: list[SegmentationSample]
    layout: str
    root: Path
    split: str = "val"
    num_missing: int = 0
    num_classes: int | None = None  # None: infer from the masks
    class_names: tuple[str, ...] | None = None


# ------------------------------------------------------------------------------------------------ layouts
def _synth_root(root: Path, split: str) -> tuple[Path, str] | None:
    """(synthetic data set root, split) when ``root`` is one (or one of its split folders), else None."""
    if _is_synth_output(root):
        return root, split
    if root.name in ("train", "val") and _is_synth_output(root.parent):
        return root.parent, root.name
    return None


def _is_synth_output(root: Path) -> bool:
    """Whether ``root/classes.json`` was written by ``franca data synth``."""
    if not (root / "classes.json").is_file():
        return False
    try:
        read_synth_info(root)
    except DataError:
        return False
    return True


def _voc_root(root: Path) -> Path | None:
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "SegmentationClass").is_dir():
            return candidate
    return None


def _plain_dirs(root: Path, split: str) -> tuple[Path, Path] | None:
    """(images folder, masks folder) of a plain layout, preferring ``<split>`` sub-folders when they exist."""
    for images, masks in (
        (root / "images" / split, root / "masks" / split),
        (root / split / "images", root / split / "masks"),
        (root / "images", root / "masks"),
    ):
        if images.is_dir() and masks.is_dir():
            return images, masks
    return None


def detect_layout(root: str | os.PathLike, split: str = "val") -> str:
    """Name of the layout of ``root`` ("synth", "voc" or "plain"); DataError when none matches."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"segmentation data folder {root} does not exist; give the data set root")
    if _synth_root(root, split) is not None:
        return "synth"
    if _voc_root(root) is not None:
        return "voc"
    if _plain_dirs(root, split) is not None:
        return "plain"
    raise DataError(
        f"{root}: not a segmentation data set; expected a synthetic data set (classes.json from `franca data synth`), "
        "Pascal VOC (JPEGImages/ + SegmentationClass/ + ImageSets/Segmentation/) or images/ + masks/ folders"
    )


def _list_synth(root: Path, split: str) -> SegmentationListing:
    found = _synth_root(root, split)
    if found is None:
        raise DataError(
            f"{root}: no classes.json written by `franca data synth`; generate the data set first"
        )
    synth_root, synth_split = found
    if synth_split not in ("train", "val"):
        raise ConfigError(f"split {synth_split!r}: the synthetic data set has the splits 'train' and 'val'")
    info = read_synth_info(synth_root)
    samples, missing = [], 0
    for image_path, mask_path, _ in list_samples(synth_root, synth_split):
        if mask_path.is_file():
            samples.append(SegmentationSample(image_path, mask_path))
        else:
            missing += 1
    return SegmentationListing(
        samples=samples,
        layout="synth",
        root=synth_root,
        split=synth_split,
        num_missing=missing,
        num_classes=len(info.classes) + 1,
        class_names=("background", *info.classes),
    )


def _list_voc(root: Path, split: str) -> SegmentationListing:
    voc = _voc_root(root)
    if voc is None:
        raise DataError(f"{root}: not a Pascal VOC folder (needs JPEGImages/ and SegmentationClass/)")
    split_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        available = sorted(p.stem for p in (voc / "ImageSets" / "Segmentation").glob("*.txt"))
        raise DataError(
            f"{split_file} does not exist; choose a split among {available or 'none found'} or add the list file"
        )
    samples, missing = [], 0
    mask_dirs = [voc / "SegmentationClass", voc / "SegmentationClassAug"]
    for line in split_file.read_text().splitlines():
        stem = line.strip().split()[0] if line.strip() else ""
        if not stem:
            continue
        image = voc / "JPEGImages" / f"{stem}.jpg"
        mask = next((d / f"{stem}.png" for d in mask_dirs if (d / f"{stem}.png").is_file()), None)
        if image.is_file() and mask is not None:
            samples.append(SegmentationSample(image, mask))
        else:
            missing += 1
    return SegmentationListing(
        samples=samples,
        layout="voc",
        root=voc,
        split=split,
        num_missing=missing,
        num_classes=21,
        class_names=VOC_CLASSES,
    )


def _files_by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """Files of ``folder`` (recursively, relative stem -> path) whose suffix is in ``suffixes``; first suffix wins."""
    found: dict[str, Path] = {}
    rank = {suffix: index for index, suffix in enumerate(suffixes)}
    for path in sorted(folder.rglob("*")):
        suffix = path.suffix.lower()
        if suffix not in rank or not path.is_file() or any(part.startswith(".") for part in path.parts):
            continue
        key = path.relative_to(folder).with_suffix("").as_posix()
        if key not in found or rank[suffix] < rank[found[key].suffix.lower()]:
            found[key] = path
    return found


def _list_plain(root: Path, split: str) -> SegmentationListing:
    dirs = _plain_dirs(root, split)
    if dirs is None:
        raise DataError(f"{root}: expected images/ and masks/ folders (flat or with {split}/ sub-folders)")
    image_dir, mask_dir = dirs
    images = _files_by_stem(image_dir, _IMAGE_SUFFIXES)
    masks = _files_by_stem(mask_dir, _MASK_SUFFIXES)
    samples = [SegmentationSample(images[key], masks[key]) for key in sorted(images) if key in masks]
    missing = len(images) - len(samples)
    class_names = None
    names_file = root / "classes.txt"
    if names_file.is_file():
        class_names = tuple(line.strip() for line in names_file.read_text().splitlines() if line.strip())
    return SegmentationListing(
        samples=samples,
        layout="plain",
        root=root,
        split=split,
        num_missing=missing,
        num_classes=len(class_names) if class_names else None,
        class_names=class_names,
    )


def list_segmentation_samples(
    root: str | os.PathLike, split: str = "val", layout: str = "auto"
) -> SegmentationListing:
    """Find the (image, mask) pairs of ``split`` under ``root`` in the given layout (see the module docstring)."""
    check_choice("layout", layout, LAYOUTS)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"segmentation data folder {root} does not exist; give the data set root")
    resolved = detect_layout(root, split) if layout == "auto" else layout
    reader = {"synth": _list_synth, "voc": _list_voc, "plain": _list_plain}[resolved]
    listing = reader(root, split)
    if not listing.samples:
        raise DataError(
            f"{root}: no image with a matching mask found for split {split!r} ({resolved} layout)"
        )
    if listing.num_missing:
        warnings.warn(
            f"{root}: {listing.num_missing} listed image(s) without an image or mask file are skipped",
            stacklevel=2,
        )
    return listing


# ------------------------------------------------------------------------------------------------ reading
def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel label mask (mode L, P, I or I;16) as an int64 array [H, W].

    Palette PNGs give their palette indices (the VOC convention). Raises :class:`UnreadableMaskError` for a missing
    or corrupt file and DataError for a colour mask, whose labels cannot be read unambiguously.
    """
    path = Path(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            mode = opened.mode
            if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                raise DataError(
                    f"mask {path} is a colour ({mode}) image; masks must be single-channel label images "
                    "(mode L or P, one label id per pixel)"
                )
            if mode in ("LA", "PA"):
                opened = opened.getchannel(0)
            array = np.asarray(opened)
    except FileNotFoundError as error:
        raise UnreadableMaskError(f"cannot read mask {path}: file not found") from error
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise UnreadableMaskError(f"cannot read mask {path}: {error or type(error).__name__}") from error
    if array.ndim != 2:
        raise DataError(f"mask {path} has shape {array.shape}; masks must be single-channel label images")
    return array.astype(np.int64)


def remap_labels(mask: np.ndarray, ignore_background: bool, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """With ``ignore_background``: 0 -> ignore and every other label l -> l - 1 (ignore stays ignore)."""
    if not ignore_background:
        return mask
    out = mask - 1
    out[(mask == 0) | (mask == ignore_index)] = ignore_index
    return out


def _transform_pair(
    image: Image.Image,
    mask: np.ndarray,
    size: int,
    resize_mode: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[Tensor, Tensor]:
    """Apply the same resize (/crop) to image and mask; normalise the image. Returns ([3,S,S] float, [S,S] int64)."""
    image_tensor = resize_square(TF.pil_to_tensor(image), size, resize_mode)  # uint8 [3, S, S]
    mask_tensor = resize_square(torch.from_numpy(mask).unsqueeze(0), size, resize_mode, nearest=True)
    image_float = TF.normalize(image_tensor.float() / 255.0, list(mean), list(std))
    return image_float, mask_tensor[0].long()


def resize_square(tensor: Tensor, size: int, resize_mode: str = "resize", nearest: bool = False) -> Tensor:
    """[C, H, W] -> [C, S, S] with the evaluation geometry: ``"resize"`` both sides to S, ``"crop"`` the shorter side
    to S then the centre S x S. Images are resized bilinearly with antialiasing, label maps (``nearest``) with nearest
    neighbour so that labels are never blended."""
    check_choice("resize mode", resize_mode, RESIZE_MODES)
    mode = InterpolationMode.NEAREST if nearest else InterpolationMode.BILINEAR
    if resize_mode == "resize":
        return TF.resize(tensor, [size, size], mode, antialias=True)
    return TF.center_crop(TF.resize(tensor, size, mode, antialias=True), [size, size])


class SegmentationDataset(Dataset):
    """(image [3, S, S] normalised float, mask [S, S] int64 with 255 = ignore) pairs of a segmentation data set.

    ``layout`` is "auto", "voc", "plain" or "synth" (module docstring); ``num_classes`` overrides the inferred number
    of classes (after the optional background removal). ``dataset[i]`` is None for an unreadable image or mask.
    Attributes: ``samples``, ``layout``, ``root``, ``num_classes``, ``class_names``, ``num_missing``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val",
        layout: str = "auto",
        size: int = 224,
        resize_mode: str = "resize",
        num_classes: int | None = None,
        ignore_background: bool = False,
        ignore_index: int = IGNORE_INDEX,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        max_samples: int | None = None,
        subset_seed: int = 0,
    ) -> None:
        check_choice("resize mode", resize_mode, RESIZE_MODES)
        if size <= 0:
            raise ConfigError(f"image size must be positive (got {size})")
        listing = list_segmentation_samples(root, split, layout)
        self.samples = seeded_subset(listing.samples, max_samples, subset_seed)
        self.num_listed, self.subset_seed = len(listing.samples), subset_seed
        self.layout = listing.layout
        self.root = listing.root
        self.split = listing.split
        self.num_missing = listing.num_missing
        self.size = size
        self.resize_mode = resize_mode
        self.ignore_background = ignore_background
        self.ignore_index = ignore_index
        self.mean, self.std = tuple(mean), tuple(std)
        self._warned: set[int] = set()
        inferred = listing.num_classes
        if inferred is not None and ignore_background:
            inferred -= 1
        if num_classes is None:
            num_classes = inferred if inferred is not None else self.infer_num_classes()
        if num_classes < 1:
            raise ConfigError(f"number of classes must be at least 1 (got {num_classes})")
        self.num_classes = int(num_classes)
        names = listing.class_names
        if names is not None and ignore_background:
            names = names[1:]
        if names is None or len(names) != self.num_classes:
            names = tuple(f"class_{index}" for index in range(self.num_classes))
        self.class_names: tuple[str, ...] = tuple(names)

    def __len__(self) -> int:
        return len(self.samples)

    def infer_num_classes(self) -> int:
        """1 + the largest non-ignored label over all masks (after background removal); reads every mask once."""
        largest = -1
        for sample in ProgressBar(self.samples, desc="scanning masks", unit="mask", leave=False):
            try:
                mask = remap_labels(load_mask(sample.mask), self.ignore_background, self.ignore_index)
            except UnreadableMaskError:
                continue
            valid = mask[mask != self.ignore_index]
            if valid.size:
                largest = max(largest, int(valid.max()))
        if largest < 0:
            raise DataError(
                f"{self.root}: every mask is empty or ignored; cannot infer the number of classes"
            )
        return largest + 1

    def load_pair(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The raw RGB image and its (remapped) int64 mask [H, W]; raises on unreadable or inconsistent files."""
        sample = self.samples[index]
        image = load_image(sample.image)
        mask = load_mask(sample.mask)
        if (mask.shape[1], mask.shape[0]) != image.size:
            raise DataError(
                f"mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]} but image {sample.image} is "
                f"{image.size[0]}x{image.size[1]}; every mask must have its image's size"
            )
        mask = remap_labels(mask, self.ignore_background, self.ignore_index)
        valid = mask[mask != self.ignore_index]
        if valid.size and (int(valid.max()) >= self.num_classes or int(valid.min()) < 0):
            bad = int(valid.max()) if int(valid.max()) >= self.num_classes else int(valid.min())
            raise DataError(
                f"mask {sample.mask} has label {bad} outside [0, {self.num_classes}); set the number of classes "
                "(--num-classes) or check the masks"
            )
        return image, mask

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor] | None:
        try:
            image, mask = self.load_pair(index)
        except (UnreadableImageError, UnreadableMaskError) as error:
            if index not in self._warned:
                self._warned.add(index)
                warnings.warn(f"skipping unreadable sample: {error}", stacklevel=2)
            return None
        return _transform_pair(image, mask, self.size, self.resize_mode, self.mean, self.std)

    def describe(self) -> dict[str, object]:
        """A JSON-friendly summary (root, layout, split, sizes, classes) for result files."""
        return {
            "root": str(self.root),
            "layout": self.layout,
            "split": self.split,
            "num_samples": len(self),
            "num_listed": self.num_listed,
            "subset": (
                f"seeded uniform sample (seed {self.subset_seed}), in listed order"
                if len(self) < self.num_listed
                else "all"
            ),
            "num_missing": self.num_missing,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "size": self.size,
            "resize_mode": self.resize_mode,
            "ignore_background": self.ignore_background,
        }


def seeded_subset(items: Sequence, count: int | None, seed: int = 0) -> list:
    """``count`` items drawn uniformly at random with ``seed`` (the same draw for every model compared), kept in their
    listed order; all items when ``count`` is None or not smaller. Never the first ``count``: a sorted listing of a
    class-foldered data set would give whole classes."""
    if count is not None and count < 1:
        raise ConfigError(f"--max-images must be at least 1 (got {count})")
    if count is None or count >= len(items):
        return list(items)
    chosen = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return [items[index] for index in chosen.tolist()]


def build_segmentation_datasets(
    val_root: str | os.PathLike,
    train_root: str | os.PathLike | None = None,
    train_split: str = "train",
    val_split: str = "val",
    layout: str = "auto",
    size: int = 224,
    resize_mode: str = "resize",
    num_classes: int | None = None,
    ignore_background: bool = False,
    max_samples: int | None = None,
) -> tuple[SegmentationDataset | None, SegmentationDataset]:
    """(train data set or None when ``train_root`` is None, val data set) with the same options.

    Without ``num_classes`` both data sets get the larger of their inferred numbers of classes, so that a class
    missing from one split's masks does not change the label space.
    """
    common = {
        "layout": layout,
        "size": size,
        "resize_mode": resize_mode,
        "num_classes": num_classes,
        "ignore_background": ignore_background,
        "max_samples": max_samples,
    }
    val_dataset = SegmentationDataset(val_root, split=val_split, **common)
    train_dataset = (
        SegmentationDataset(train_root, split=train_split, **common) if train_root is not None else None
    )
    if train_dataset is not None and train_dataset.num_classes != val_dataset.num_classes:
        larger = max((train_dataset, val_dataset), key=lambda dataset: dataset.num_classes)
        for dataset in (train_dataset, val_dataset):
            dataset.num_classes = larger.num_classes
            dataset.class_names = larger.class_names
    return train_dataset, val_dataset


# ------------------------------------------------------------------------------------------------ dense protocols
def patch_token(model: nn.Module, tokens: str = "auto", n_blocks: int = 1) -> str:
    """The :mod:`franca.features` token that a dense protocol's ``--tokens`` choice names for ``model``.

    ``"patch"``: the final-norm patch tokens (``patch``, or ``patch_blocks`` when ``n_blocks`` > 1: the last blocks
    concatenated along channels); ``"rasa"``: the RASA tokens ``patch_rasa`` (ConfigError without a RASA head);
    ``"auto"``: RASA tokens when a RASA head is attached (the paper evaluates dense tasks with RASA), else patch.
    Several blocks are only defined for the raw patch tokens.
    """
    check_choice("tokens", tokens, TOKEN_CHOICES)
    has_rasa = getattr(model, "rasa", None) is not None
    if tokens == "rasa" and not has_rasa:
        raise ConfigError("--tokens rasa: the model has no RASA head; attach one with --rasa HEAD")
    rasa = tokens == "rasa" or (tokens == "auto" and has_rasa)
    if n_blocks > 1:
        if rasa:
            raise ConfigError("several last blocks (--n-last-blocks > 1) cannot be combined with RASA tokens")
        return "patch_blocks"
    return "patch_rasa" if rasa else "patch"


def dense_split(features: Tensor | Features, masks: Tensor | None, split: str) -> tuple[Tensor, Tensor]:
    """(patch grids [N, h, w, D], label masks [N, S, S]) of one split: a grid tensor and its masks, or Features (the
    patch token it holds: ``patch_blocks``, ``patch_rasa`` or ``patch``, in that order, and its targets unless
    ``masks`` are given)."""
    grids: Tensor | None = features if isinstance(features, Tensor) else None
    if isinstance(features, Features):
        candidates = (features.patch_blocks, features.patch_rasa, features.patch)
        grids = next((grid for grid in candidates if grid is not None), None)
        masks = features.targets if masks is None else masks
    if grids is None:
        raise ConfigError(f"the {split} features hold no patch tokens; extract them with tokens=['patch']")
    if masks is None:
        raise ConfigError(f"the {split} label masks are missing: pass them along with feature tensors")
    if grids.ndim != 4 or masks.ndim != 3 or grids.shape[0] != masks.shape[0]:
        raise DataError(
            f"the {split} patch grids {tuple(grids.shape)} do not match their masks {tuple(masks.shape)}; "
            "give one [h, w, D] grid per [S, S] mask"
        )
    return grids, masks


def segmentation_classes(
    val_dataset: object, train_dataset: object = None, num_classes: int | None = None
) -> tuple[int, tuple[str, ...]]:
    """(number of classes, their names) of a dense protocol's data: ``num_classes`` or the largest ``num_classes``
    of the data sets; the val set's ``class_names`` when they fit, else ``class_0``, ``class_1``, ...
    ConfigError when the number is unknown."""
    if num_classes is None:
        datasets = [dataset for dataset in (train_dataset, val_dataset) if dataset is not None]
        num_classes = max(int(getattr(dataset, "num_classes", 0)) for dataset in datasets)
    if num_classes < 1:
        raise ConfigError("the number of classes is unknown; pass num_classes")
    names = tuple(getattr(val_dataset, "class_names", ()))
    if len(names) != num_classes:
        names = tuple(f"class_{index}" for index in range(num_classes))
    return int(num_classes), names
