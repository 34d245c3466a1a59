"""Finding and reading images robustly.

- :func:`list_images` turns folders, glob patterns, list files and single files into one ordered list of image paths;
- :func:`load_image` reads any image file as an 8-bit RGB :class:`PIL.Image.Image` (transparency composited, 16-bit and
  float images rescaled, EXIF orientation applied) or raises :class:`UnreadableImageError`;
- :class:`ImageFileDataset` is a map-style data set over a list of files that returns ``None`` for an unreadable file,
  and :func:`collate_skip_none` drops those ``None`` samples and reports how many were dropped in the :class:`Batch`
  it returns, so that the main process can tally them with a :class:`SkipCounter` (collate functions run inside the
  DataLoader worker processes, where a counter would be lost).
"""

from __future__ import annotations

import glob
import io
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, default_collate

from franca.core.distributed import all_reduce_sum
from franca.core.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "TRANSPARENT_BACKGROUND",
    "Batch",
    "ImageFileDataset",
    "SkipCounter",
    "UnreadableImageError",
    "collate_skip_none",
    "decode_image",
    "is_image_file",
    "list_images",
    "load_image",
]

#: Lower-case suffixes (with the dot) of the files treated as images; matching is case-insensitive.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)

#: RGB colour that transparent pixels are composited onto: the ImageNet mean (0.485, 0.456, 0.406) x 255, rounded, so
#: that fully transparent areas become ~0 after ImageNet normalisation, i.e. carry no signal for the network.
TRANSPARENT_BACKGROUND: tuple[int, int, int] = (124, 116, 104)

_GLOB_CHARS = ("*", "?", "[")


class UnreadableImageError(DataError):
    """An image file cannot be opened or fully decoded (missing, empty, truncated, corrupt or of an unknown format)."""


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive); the file itself is not opened."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def _special_files_warning(where: str | Path, special: Sequence[str | Path], stacklevel: int = 3) -> None:
    """One warning counting the entries with an image name that are not regular files, naming the first."""
    if special:
        noun = (
            "entry that is not a regular file" if len(special) == 1 else "entries that are not regular files"
        )
        warnings.warn(
            f"{where}: skipped {len(special)} {noun} (FIFO, socket or device; first: {special[0]})",
            stacklevel=stacklevel,
        )


def _walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, hidden files and folders skipped, sorted by path components.

    Symbolic links to folders are followed (as torchvision's ImageFolder does), each real folder at most once so that
    a link cycle cannot loop forever. Only regular files (and symbolic links to them) are images: FIFOs, sockets and
    devices with an image name are skipped with one warning, and never opened (reading a FIFO blocks forever). A
    dangling symbolic link is kept, to be reported as unreadable when loaded. Folders that cannot be read are skipped,
    as :func:`os.walk` does. The file types come from :func:`os.scandir` (no extra ``stat`` per regular file).
    """
    found: list[Path] = []
    special: list[Path] = []
    seen_dirs: set[str] = set()
    stack = [Path(folder)]
    while stack:  # depth first, in sorted order: the same visiting order (and the same kept copy) as os.walk
        directory = stack.pop()
        real = os.path.realpath(directory)
        if real in seen_dirs:
            continue
        seen_dirs.add(real)
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError:
            continue
        subdirs: list[Path] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(Path(directory, entry.name))
                continue
            if not is_image_file(entry.name):
                continue
            try:
                regular = entry.is_file()
                dangling = not regular and entry.is_symlink() and not os.path.exists(entry.path)
            except OSError:
                regular, dangling = False, False
            if regular or dangling:
                found.append(Path(directory, entry.name))
            else:
                special.append(Path(directory, entry.name))
        stack.extend(reversed(subdirs))
    _special_files_warning(folder, special)
    found.sort(key=lambda p: p.parts)
    return found


def _read_list_file(list_file: Path) -> list[Path]:
    """Image paths listed one per line in ``list_file``; relative ones are resolved against the list file's folder.

    Blank lines and lines starting with ``#`` are skipped. Listed files that do not exist are skipped with one warning
    that counts them; the entries are taken as images whatever their suffix (the user listed them explicitly).
    """
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{list_file} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a UTF-8 text file listing image "
            "paths one per line"
        ) from error
    except OSError as error:
        raise DataError(f"cannot read the image list {list_file}: {error.strerror or error}") from error
    base = list_file.parent
    listed: list[Path] = []
    missing: list[tuple[int, str]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = base / path
        # is_file follows symbolic links and is False for a FIFO, socket or device, which is thus never opened
        if path.is_file():
            listed.append(path)
        else:
            missing.append((line_number, entry))
    if missing:
        line_number, entry = missing[0]
        warnings.warn(
            f"{list_file}: {len(missing)} listed file(s) do not exist or are not regular files and are skipped "
            f"(first: line {line_number}: {entry}; relative paths are resolved against {base})",
            stacklevel=3,
        )
    return listed


def _expand_input(item: str | Path) -> list[Path]:
    """The image paths one input of :func:`list_images` stands for (see there)."""
    text = str(item)
    path = Path(text).expanduser()
    if path.is_dir():
        return _walk_images(path)
    if path.is_file():
        return [path] if is_image_file(path) else _read_list_file(path)
    if path.exists():  # a FIFO, socket or device: opening it could block forever
        raise DataError(
            f"{text} is not a regular file (a FIFO, socket or device); give image files, folders, glob patterns or "
            "list files"
        )
    if any(char in text for char in _GLOB_CHARS):
        matches = [m for m in glob.glob(os.path.expanduser(text), recursive=True) if is_image_file(m)]
        _special_files_warning(
            text,
            sorted(
                m for m in matches if os.path.exists(m) and not os.path.isfile(m) and not os.path.isdir(m)
            ),
        )
        return sorted((Path(m) for m in matches if os.path.isfile(m)), key=lambda p: p.parts)
    raise DataError(
        f"{text} does not exist (expected an image folder, a glob pattern, a text file listing images or an image file)"
    )


def list_images(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """List the image files named by ``inputs``, in a deterministic order, each once.

    Each input may be:

    - a folder: searched recursively, hidden files and folders skipped, sorted by path;
    - a glob pattern (``**`` matches any number of folders): matches sorted by path, non-images ignored;
    - a text file listing image paths one per line: relative paths are resolved against the list file's folder,
      blank lines and ``#`` comments are skipped, listed files that do not exist are skipped with a warning;
    - a single image file (one of :data:`IMAGE_EXTENSIONS`, case-insensitive).

    Only regular files (or symbolic links to them) are listed: FIFOs, sockets and devices are skipped with a warning
    and never opened (reading a FIFO would block forever); one given directly is a :class:`DataError`.

    The inputs' lists are concatenated in the given order and duplicates (same absolute path) are removed, keeping the
    first occurrence. Returned paths are absolute (not symlink-resolved), so they stay valid if the working folder
    changes. Raises :class:`DataError` naming an input that does not exist, or when nothing is found at all.
    """
    items: list[str | Path] = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not items:
        raise DataError("no image inputs given (expected folders, glob patterns, list files or image files)")
    result: list[Path] = []
    seen: set[str] = set()
    for item in items:
        found = _expand_input(item)
        if not found and len(items) > 1:
            warnings.warn(f"{item} contains no images", stacklevel=2)
        for path in found:
            absolute = os.path.abspath(path)
            if absolute not in seen:
                seen.add(absolute)
                result.append(Path(absolute))
    if not result:
        names = ", ".join(str(item) for item in items)
        raise DataError(f"no images found in {names} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return result


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Map a 2-D integer or float array to uint8 by its actual value range, without clipping.

    Non-negative data is scaled by its actual maximum, ``round(x * 255 / max)``, so 0 stays black and the brightest
    pixel becomes 255 whatever the bit depth the data was stored with (12-bit data in a 16-bit file fills the range).
    Float data already within [0, 1] is taken as normalised, ``round(x * 255)``. Data with negative values is shifted
    by its minimum first, ``round((x - min) * 255 / (max - min))``. Non-finite floats become 0; a constant image of 0
    stays 0.
    """
    data = values.astype(np.float64)
    data[~np.isfinite(data)] = 0.0
    low, high = float(data.min()), float(data.max())
    if values.dtype.kind == "f" and low >= 0.0 and high <= 1.0:
        scaled = data * 255.0
    elif low >= 0.0:
        scaled = data * (255.0 / high) if high > 0 else data
    else:
        scaled = (data - low) * (255.0 / (high - low)) if high > low else np.zeros_like(data)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _has_transparency(image: Image.Image) -> bool:
    """Whether ``image`` carries an alpha channel or a transparent palette entry / colour key."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB (see :func:`load_image` for the rules)."""
    if image.mode == "RGB":
        return image
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*TRANSPARENT_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        gray = _to_uint8(np.asarray(image))
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")
    return image.convert("RGB")


def _is_regular_or_missing(path: str | Path) -> bool:
    """One ``stat``: True for a regular file (through symlinks) or a missing path (reported when opened)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def decode_image(source: str | Path | IO[bytes] | bytes, name: str | None = None) -> Image.Image:
    """Fully decode an image from a path, a binary file object or bytes into an 8-bit RGB PIL image.

    ``name`` is used in error messages (defaults to the path). This is :func:`load_image` for in-memory data (e.g. a
    WebDataset sample); see there for the conversion rules. Raises :class:`UnreadableImageError`.
    """
    label = (
        name if name is not None else (str(source) if isinstance(source, (str, Path)) else "<image bytes>")
    )
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    if isinstance(source, (str, Path)) and not _is_regular_or_missing(source):
        # a FIFO would block the read forever, a device could stream without end: only regular files are images
        raise UnreadableImageError(
            f"cannot read image {label}: not a regular file (a folder, FIFO or device)"
        )
    try:
        with Image.open(source) as opened:
            opened.load()  # forces the full decode, so a truncated file fails here rather than later
            try:
                oriented = ImageOps.exif_transpose(opened)
            except Exception as error:  # a corrupt EXIF block must not lose an otherwise good image
                warnings.warn(f"{label}: ignoring unreadable EXIF orientation ({error})", stacklevel=2)
                oriented = opened.copy()
            rgb = _to_rgb(oriented)
            if rgb is opened:
                rgb = opened.copy()  # detach from the file, which is closed when the with-block ends
    except FileNotFoundError as error:
        raise UnreadableImageError(f"cannot read image {label}: file not found") from error
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as error:
        reason = str(error) or type(error).__name__
        if isinstance(source, (str, Path)) and os.path.isfile(source) and os.path.getsize(source) == 0:
            reason = "empty file (0 bytes)"
        raise UnreadableImageError(f"cannot read image {label}: {reason}") from error
    return rgb


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image, whatever its mode.

    - RGB is returned as is; L, 1, P (palette), CMYK, YCbCr are converted with PIL.
    - Images with transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) are composited onto
      :data:`TRANSPARENT_BACKGROUND` (the ImageNet mean colour, i.e. ~0 after normalisation).
    - 16-bit (I;16*), 32-bit integer (I) and float (F) grayscale images are scaled to 0..255 by their actual value
      range, without clipping: ``round(x * 255 / max)`` for non-negative data (floats within [0, 1]: ``round(x *
      255)``), min-max for data with negative values; the gray result is repeated on the three channels.
    - The EXIF orientation is applied (PIL.ImageOps.exif_transpose); multi-frame files give their first frame.

    The file is fully decoded, so a missing, empty, truncated or corrupt file raises :class:`UnreadableImageError`
    naming the path and the reason.
    """
    return decode_image(Path(path))


@dataclass
class Batch:
    """A collated batch of the readable samples of a DataLoader batch, plus how many samples were dropped.

    ``inputs`` is whatever ``default_collate`` makes of the transformed images (a ``[B, 3, H, W]`` tensor, or for
    multi-crop a dict of lists of ``[B, 3, h, w]`` tensors) and ``targets`` a ``[B]`` int64 tensor of labels or sample
    indices. When every sample of the batch was unreadable, ``inputs`` and ``targets`` are ``None`` and
    :attr:`empty` is True: the caller skips the step (after counting, e.g. with :class:`SkipCounter`).
    """

    inputs: Any
    targets: torch.Tensor | None
    num_skipped: int = 0

    @property
    def empty(self) -> bool:
        """True when no readable sample is left in the batch."""
        return self.targets is None

    def __len__(self) -> int:
        """Number of readable samples in the batch."""
        return 0 if self.targets is None else int(self.targets.shape[0])


def collate_skip_none(batch: Sequence[tuple[Any, int] | None]) -> Batch:
    """Collate ``(image, target)`` samples into a :class:`Batch`, dropping the ``None`` of unreadable files.

    Use it as the DataLoader's ``collate_fn``. It runs in the worker processes, so the number of dropped samples
    travels inside the returned batch (``num_skipped``) for the main process to count. An all-unreadable batch gives
    an empty batch (``inputs`` and ``targets`` None) instead of an error.
    """
    kept = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return Batch(inputs=None, targets=None, num_skipped=skipped)
    inputs, targets = default_collate(kept)
    return Batch(inputs=inputs, targets=torch.as_tensor(targets, dtype=torch.int64), num_skipped=skipped)


class SkipCounter:
    """Tally, in the main process, of samples loaded and dropped as unreadable, from the batches of a DataLoader.

    Counts are per process (per rank); :meth:`global_counts` sums them over ranks through ``franca.core.distributed``
    (a collective: every rank must call it). Counting happens here, on the batches the main process receives,
    because the collate function and the data set run in the DataLoader workers, whose state never comes back.
    """

    def __init__(self) -> None:
        self.num_loaded = 0
        self.num_skipped = 0
        self.num_empty_batches = 0

    def update(self, batch: Batch) -> bool:
        """Count one batch; return True when it holds at least one sample (False: skip this step)."""
        self.num_skipped += batch.num_skipped
        self.num_loaded += len(batch)
        if batch.empty:
            self.num_empty_batches += 1
        return not batch.empty

    def global_counts(self) -> tuple[int, int]:
        """``(loaded, skipped)`` summed over all ranks (equal to the local counts without a process group)."""
        counts = all_reduce_sum(torch.tensor([self.num_loaded, self.num_skipped], dtype=torch.float64))
        return int(counts[0].item()), int(counts[1].item())

    def __repr__(self) -> str:
        return f"SkipCounter(loaded={self.num_loaded}, skipped={self.num_skipped})"


class ImageFileDataset(Dataset):
    """Map-style data set over image files: ``dataset[i]`` is ``(transform(image), label)`` or None if unreadable.

    The target is ``labels[i]`` when labels are given, otherwise the index ``i``. An unreadable file gives ``None``
    after one warning naming it (once per file and per process: each DataLoader worker has its own copy of the
    data set); use :func:`collate_skip_none` as the DataLoader's ``collate_fn`` to drop and count those samples.
    Without a transform the image is the RGB PIL image returned by :func:`load_image`.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        transform: Callable[[Image.Image], Any] | None = None,
        labels: Sequence[int] | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        if labels is not None and len(labels) != len(self.paths):
            raise DataError(
                f"got {len(labels)} labels for {len(self.paths)} image paths; they must match one to one"
            )
        self.labels = None if labels is None else [int(label) for label in labels]
        self.transform = transform
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path = self.paths[index]
        try:
            image = load_image(path)
        except UnreadableImageError as error:
            if index not in self._warned:
                self._warned.add(index)
                warnings.warn(f"skipping unreadable image: {error}", stacklevel=2)
            return None
        target = index if self.labels is None else self.labels[index]
        return (self.transform(image) if self.transform is not None else image), target
