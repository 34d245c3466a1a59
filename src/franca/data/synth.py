"""A procedural synthetic data set of textured shapes, for the demo and the tests.

Each image shows one large *main* object and 1-2 smaller distractor objects, drawn from ten shape classes
(:data:`CLASS_NAMES`: circle, square, triangle, star, plus, ring, hexagon, ellipse, heart, crescent), with random
colours, sizes, positions, rotations (up to ``max_rotation_deg``) and textures (solid, stripes, checker, dots,
gradient) on varied backgrounds (smooth random fields, gradients, grain noise, low-contrast stripes). Distractors may
lie behind or in front of the main object (they never hide more than 15% of it). The image's class is the class of the
main object, which is always the largest one (a distractor's radius is at most 0.35 of the main object's). Everything
is drawn at 3x resolution and box-downsampled, so edges are anti-aliased. :class:`SynthStyle` holds these difficulty
knobs; :data:`STYLES` has five presets: "default", "easy" (one small distractor, solid or gradient fills, calm
backgrounds), "hard" (1-3 larger distractors, more textures, busier backgrounds), "textured" (the default style
where every object wears its class's texture, :data:`CLASS_TEXTURES`, in a light and a dark shade of a random
colour, because a tiny ViT finds that cue within a few hundred steps and the outline it does not) and
"textured-large" (textured with a larger main object and at most one distractor, so that two random crops of an
image mostly show the same object: the demo's data).

Layout written by :func:`generate_synthetic_dataset` (``<stem>`` is ``<split>_<index:06d>``)::

    DIR/classes.json                          class names, label ids and generation settings
    DIR/README.txt                            this layout in words
    DIR/train/<class>/<stem>.png              RGB images (torchvision ImageFolder layout)
    DIR/val/<class>/<stem>.png
    DIR/masks/train/<class>/<stem>.png        segmentation masks, mode "L", same size as the image
    DIR/masks/val/<class>/<stem>.png

so the mask of ``DIR/<split>/<class>/<stem>.png`` is ``DIR/masks/<split>/<class>/<stem>.png``
(:func:`mask_path_for`). Mask values: 0 = background, ``class_id + 1`` = a pixel of an object of that class (the
object on top wins where objects overlap), 255 = ignore. A mask pixel takes the label that covers a strict majority
(at least 5) of its 3x3 sub-pixels, so anti-aliased edges between two regions are labelled consistently by
majority; only pixels where three or more regions meet and none has a majority are 255 (about 0.01% of the
pixels), and segmentation metrics should ignore them.

Difficulty, measured with the default style on 2,000 train / 500 val images at 64 px (chance is 10%): k-NN on raw
pixels 21% (k=1) / 16% (k=20), logistic regression on raw pixels 11%, k-NN on the CLS token of a random-init ViT
(depth 6, patch 8, width 192) 12%; a small CNN pretrained with SimCLR for 6 CPU-minutes (169 steps of 128 pairs,
at 32 px) reaches 18% k-NN against 12% at its random initialisation. The "hard" preset gives 13% / 9% for raw
pixels / random ViT, and barely moves with a few minutes of training. Learnability with labels
(``benchmarks/probe_learnability.py``, batch 64): the default style reaches 25% training accuracy after 150
iterations with a small CNN and stays at chance with the ViT; the easy style with ``max_rotation_deg=0`` (upright
shapes) reaches 96% with the CNN in 150 iterations, while the ViT (patch 8) is still at chance after 300 and a
patch-16 ViT leaves chance only after ~300 (docs/demo-learning.md). The "textured" style is learned with labels by
the same ViT to 70% in 100 iterations at 64 px (55% at 32 px), and by the demo's self-supervised recipe to ~21% k-NN
against ~10% at random initialisation in 800 iterations at 32 px (docs/demo-learning.md, section 4);
"textured-large" to 83% k-NN with labels in 300 iterations at 32 px, and by the demo's recipe (any-hue jitter,
grayscale 0.8) to ~43% k-NN self-supervised in 720 against ~10% at random initialisation (section 5).

Generation is deterministic: image ``index`` of ``split`` is rendered from a generator seeded with
``(seed, split_code, index)`` (train 0, val 1), and its class is ``index % num_classes``, so both splits are
balanced (class counts differ by at most one) and the bytes do not depend on ``workers``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from franca.core.errors import ConfigError, DataError

CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "plus",
    "ring",
    "hexagon",
    "ellipse",
    "heart",
    "crescent",
)
BACKGROUND_LABEL = 0
IGNORE_LABEL = 255
SPLITS: tuple[str, ...] = ("train", "val")
SUPERSAMPLE = 3
GENERATOR_NAME = "franca.data.synth"
FORMAT_VERSION = 1
MIN_SIZE = 16

TEXTURES: tuple[str, ...] = ("solid", "stripes", "checker", "dots", "gradient")
BACKGROUNDS: tuple[str, ...] = ("smooth", "gradient", "grain", "stripes")


@dataclass(frozen=True)
class SynthStyle:
    """The knobs that set how hard the data set is (sizes are fractions of the image side; ranges are inclusive).

    The defaults are tuned so that a few minutes of CPU self-supervised pretraining clearly beat a random
    initialisation (see the module docstring); :data:`STYLES` names the presets. Invalid knobs raise ConfigError.
    """

    # radius of the circle around the main object
    main_radius: tuple[float, float] = (0.28, 0.44)
    num_distractors: tuple[int, int] = (1, 2)
    # distractor radius / main radius (< 0.5, so that the main object is the largest)
    distractor_scale: tuple[float, float] = (0.15, 0.35)
    # distractors in front may hide at most this fraction of the main object
    max_hidden_fraction: float = 0.15
    texture_weights: tuple[float, ...] = (0.65, 0.05, 0.05, 0.05, 0.2)  # over TEXTURES
    background_weights: tuple[float, ...] = (0.35, 0.25, 0.2, 0.2)  # over BACKGROUNDS
    background_contrast: float = 0.4  # 0 = flat backgrounds, 1 = strongly varying ones
    # least RGB distance (in [0, 1]) between an object's mean colour and the background's mean colour
    min_object_contrast: float = 0.5
    max_noise_std: float = 4.0  # per-image Gaussian pixel noise, std drawn in [0, this] (0-255 scale)
    # objects are rotated by an angle drawn uniformly in [-this, this] degrees (180: any orientation)
    max_rotation_deg: float = 180.0
    # True: every object wears its class's texture (CLASS_TEXTURES; colours, phase and period jitter stay random),
    # a patch-level cue that a small ViT picks up much sooner than the outline; texture_weights are then unused
    class_textures: bool = False
    # with class_textures: None = a light and a dark shade of one random colour; a number = two independent random
    # colours whose luma (0.299 R + 0.587 G + 0.114 B) differs by at least this much (a 6-d colour nuisance that
    # a random projection of the pixels matches on, and colour-jitter-invariant features do not)
    texture_contrast: float | None = None
    # with class_textures: texture periods are size / 7 times a factor uniform in [1 - this, 1 + this]
    texture_period_jitter: float = 0.15

    def __post_init__(self) -> None:
        ranges = {"main_radius": self.main_radius, "distractor_scale": self.distractor_scale}
        ranges["num_distractors"] = self.num_distractors
        for name, (low, high) in ranges.items():
            if not 0 <= low <= high:
                raise ConfigError(f"SynthStyle.{name} must be a range 0 <= low <= high (got {(low, high)})")
        if not 0.0 <= self.max_rotation_deg <= 180.0:
            raise ConfigError(
                f"SynthStyle.max_rotation_deg must lie in [0, 180] (got {self.max_rotation_deg})"
            )
        if self.texture_contrast is not None and not 0.0 <= self.texture_contrast <= 0.8:
            raise ConfigError(
                f"SynthStyle.texture_contrast must be None or lie in [0, 0.8] (got {self.texture_contrast})"
            )
        if not 0.0 <= self.texture_period_jitter <= 0.6:
            raise ConfigError(
                f"SynthStyle.texture_period_jitter must lie in [0, 0.6] (got {self.texture_period_jitter})"
            )
        if self.distractor_scale[1] >= 1.0:
            raise ConfigError(
                "SynthStyle.distractor_scale must stay below 1 so that the main object is the largest"
            )
        for name, weights, count in (
            ("texture_weights", self.texture_weights, len(TEXTURES)),
            ("background_weights", self.background_weights, len(BACKGROUNDS)),
        ):
            if len(weights) != count or min(weights) < 0 or sum(weights) <= 0:
                raise ConfigError(f"SynthStyle.{name} needs {count} non-negative weights with a positive sum")

    def as_dict(self) -> dict[str, object]:
        """JSON-ready copy of the knobs (for classes.json)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


DEFAULT_STYLE = SynthStyle()
EASY_STYLE = SynthStyle(
    main_radius=(0.3, 0.45),
    num_distractors=(1, 1),
    distractor_scale=(0.15, 0.3),
    texture_weights=(0.8, 0.0, 0.0, 0.0, 0.2),
    background_contrast=0.3,
    min_object_contrast=0.5,
    max_noise_std=3.0,
)
HARD_STYLE = SynthStyle(
    main_radius=(0.24, 0.4),
    num_distractors=(1, 3),
    distractor_scale=(0.25, 0.45),
    texture_weights=(0.4, 0.15, 0.15, 0.1, 0.2),
    background_contrast=1.0,
    min_object_contrast=0.35,
    max_noise_std=8.0,
)
# The default style with each class wearing its own texture (CLASS_TEXTURES), so that a short self-supervised run
# on 2 CPU cores has a patch-level, augmentation-invariant cue to find (docs/demo-learning.md section 4).
TEXTURED_STYLE = SynthStyle(class_textures=True)
# The demo's data: textured, with a larger main object and at most one distractor, so that two random
# crops of one image mostly show the same object (with labels the ViT reaches 83% k-NN instead of 77% in 300
# iterations; docs/demo-learning.md section 5).
TEXTURED_LARGE_STYLE = SynthStyle(class_textures=True, main_radius=(0.36, 0.46), num_distractors=(0, 1))
STYLES: dict[str, SynthStyle] = {
    "default": DEFAULT_STYLE,
    "easy": EASY_STYLE,
    "hard": HARD_STYLE,
    "textured": TEXTURED_STYLE,
    "textured-large": TEXTURED_LARGE_STYLE,
}
_SPLIT_CODES = {"train": 0, "val": 1}
_OWN_ENTRIES = ("train", "val", "masks", "classes.json", "README.txt")  # what a rerun may replace


# ----------------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeSpec:
    """One object's geometry in output-pixel units.

    ``center`` is (x, y) with pixel (row i, column j) covering [j, j+1) x [i, i+1); ``radius`` is the radius of the
    circle circumscribing the shape; ``angle_deg`` rotates counter-clockwise on screen; ``params`` holds the
    class-specific proportions (ellipse: minor/major axis ratio; ring: inner/outer radius; crescent: offset and
    radius of the cut-out disc, both relative to ``radius``). Empty ``params`` use :func:`default_shape_params`.
    """

    name: str
    center: tuple[float, float]
    radius: float
    angle_deg: float = 0.0
    params: tuple[float, ...] = ()


def default_shape_params(name: str) -> tuple[float, ...]:
    """Middle-of-range proportions of a shape class (see :class:`ShapeSpec`); () for shapes without any."""
    return {"ellipse": (0.55,), "ring": (0.56,), "crescent": (0.5, 0.8)}.get(name, ())


def _sample_shape_params(name: str, rng: np.random.Generator) -> tuple[float, ...]:
    if name == "ellipse":
        return (float(rng.uniform(0.45, 0.62)),)
    if name == "ring":
        return (float(rng.uniform(0.5, 0.62)),)
    if name == "crescent":
        return (float(rng.uniform(0.42, 0.55)), float(rng.uniform(0.75, 0.85)))
    return ()


def _circle(n: int = 96, rx: float = 1.0, ry: float = 1.0, cx: float = 0.0) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), ry * np.sin(t)], axis=1)


def _regular_polygon(n: int, phase_deg: float) -> np.ndarray:
    t = np.deg2rad(phase_deg) + np.arange(n) * 2.0 * math.pi / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


@cache
def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, 120, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = 13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t)
    points = np.stack([x, -y], axis=1)  # screen y points down: lobes on top
    points -= (points.max(axis=0) + points.min(axis=0)) / 2.0
    return points / np.linalg.norm(points, axis=1).max()


def _unit_shape(name: str, params: tuple[float, ...]) -> list[tuple[np.ndarray, int]]:
    """Polygons of a shape in unit coordinates (circumscribed radius 1) as (points (n, 2), fill 1 or 0) in order."""
    params = params or default_shape_params(name)
    if name == "circle":
        return [(_circle(), 1)]
    if name == "square":
        return [(_regular_polygon(4, 45.0), 1)]
    if name == "triangle":
        return [(_regular_polygon(3, -90.0), 1)]
    if name == "hexagon":
        return [(_regular_polygon(6, 0.0), 1)]
    if name == "star":
        outer = _regular_polygon(5, -90.0)
        inner = 0.42 * _regular_polygon(5, -90.0 + 36.0)
        return [(np.stack([outer, inner], axis=1).reshape(-1, 2), 1)]
    if name == "plus":
        w = 0.32
        pts = [
            (w, 1),
            (w, w),
            (1, w),
            (1, -w),
            (w, -w),
            (w, -1),
            (-w, -1),
            (-w, -w),
            (-1, -w),
            (-1, w),
            (-w, w),
            (-w, 1),
        ]
        return [(np.asarray(pts, dtype=np.float64), 1)]
    if name == "ring":
        return [(_circle(), 1), (_circle(rx=params[0], ry=params[0]), 0)]
    if name == "ellipse":
        return [(_circle(rx=1.0, ry=params[0]), 1)]
    if name == "heart":
        return [(_heart(), 1)]
    if name == "crescent":
        offset, cut_radius = params
        return [(_circle(), 1), (_circle(rx=cut_radius, ry=cut_radius, cx=offset), 0)]
    raise ConfigError(f"unknown shape class {name!r}; choose one of {', '.join(CLASS_NAMES)}")


def _fill_polygon(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bool (height, width) map of the pixels whose centres lie inside a simple polygon (even-odd scanline fill).

    ``points`` (n, 2) are (x, y) in pixel units where pixel (i, j) covers [j, j+1) x [i, i+1). Exact at pixel
    centres, unlike PIL's polygon fill, which also paints the pixels that the outline touches.
    """
    start, end = points, np.roll(points, -1, axis=0)
    row_centres = np.arange(height, dtype=np.float64)[:, None] + 0.5  # (h, 1)
    y0, y1 = start[None, :, 1], end[None, :, 1]  # (1, e)
    # Half-open rule: an edge crosses the scanline if it starts at or below it and ends above it (or vice versa).
    crosses = (y0 <= row_centres) != (y1 <= row_centres)  # (h, e); horizontal edges never cross
    rows, edges = np.nonzero(crosses)
    t = (row_centres[rows, 0] - start[edges, 1]) / (end[edges, 1] - start[edges, 1])
    x = start[edges, 0] + t * (end[edges, 0] - start[edges, 0])
    # Pixel j is right of the crossing when its centre j + 0.5 >= x, i.e. j >= ceil(x - 0.5).
    first_column = np.clip(np.ceil(x - 0.5), 0, width).astype(np.int64)
    toggles = np.bincount(rows * (width + 1) + first_column, minlength=height * (width + 1))
    return (np.cumsum(toggles.reshape(height, width + 1)[:, :width], axis=1) % 2) == 1


def _rasterize_crop(spec: ShapeSpec, canvas_size: int, scale: float) -> tuple[int, int, np.ndarray]:
    """The shape's coverage inside its bounding box: (top row, left column, bool (h, w) crop of the canvas)."""
    cx, cy = spec.center
    left = min(max(int(math.floor((cx - spec.radius) * scale)) - 1, 0), canvas_size)
    top = min(max(int(math.floor((cy - spec.radius) * scale)) - 1, 0), canvas_size)
    right = max(min(int(math.ceil((cx + spec.radius) * scale)) + 1, canvas_size), left)
    bottom = max(min(int(math.ceil((cy + spec.radius) * scale)) + 1, canvas_size), top)
    crop = np.zeros((bottom - top, right - left), dtype=bool)
    if crop.size == 0:
        return top, left, crop
    theta = math.radians(spec.angle_deg)
    # Counter-clockwise on screen (y down) is a clockwise rotation in (x, y) coordinates.
    rotation = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    offset = np.array([left, top], dtype=np.float64)
    for points, fill in _unit_shape(spec.name, spec.params):
        crop_points = ((points @ rotation.T) * spec.radius + np.asarray(spec.center)) * scale - offset
        inside = _fill_polygon(crop_points, crop.shape[0], crop.shape[1])
        if fill:
            crop |= inside
        else:
            crop &= ~inside
    return top, left, crop


def rasterize_shape(spec: ShapeSpec, canvas_size: int, scale: float = 1.0) -> np.ndarray:
    """Boolean (canvas_size, canvas_size) mask of the canvas pixels whose centres lie inside the shape.

    ``scale`` maps the spec's output-pixel units to the canvas (the supersampling factor): canvas pixel (I, J) has
    its centre at ((J + 0.5) / scale, (I + 0.5) / scale) in output units. Filled as polygons by an exact
    scanline rule (circles and ellipses are 96-gons).
    """
    top, left, crop = _rasterize_crop(spec, canvas_size, scale)
    mask = np.zeros((canvas_size, canvas_size), dtype=bool)
    mask[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Colours, textures and backgrounds (all in float RGB in [0, 1])
# ----------------------------------------------------------------------------------------------------------------

TextureFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _random_colours(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 3) float32 RGB colours: uniform hue, saturation and value in [0.25, 1] (vectorised HSV -> RGB)."""
    hue = rng.random(count)
    saturation, value = rng.uniform(0.25, 1.0, count), rng.uniform(0.25, 1.0, count)
    # The standard formula: channel k takes v - v*s*clip(min(m, 4 - m), 0, 1) with m = (k + 6h) mod 6.
    m = (np.array([5.0, 3.0, 1.0])[None, :] + 6.0 * hue[:, None]) % 6.0
    ramp = np.clip(np.minimum(m, 4.0 - m), 0.0, 1.0)
    return (value[:, None] * (1.0 - saturation[:, None] * ramp)).astype(np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return _random_colours(rng, 1)[0]


def _unit_vector(rng: np.random.Generator) -> tuple[float, float]:
    angle = rng.uniform(0.0, 2.0 * math.pi)
    return math.cos(angle), math.sin(angle)


def _two_colour(first: np.ndarray, second: np.ndarray, choose_second: np.ndarray) -> np.ndarray:
    return np.where(choose_second[:, None], second[None, :], first[None, :])


def _sample_texture(
    rng: np.random.Generator,
    center: tuple[float, float],
    radius: float,
    colours: tuple[np.ndarray, np.ndarray],
    weights: Sequence[float],
) -> tuple[str, TextureFn]:
    """A random texture: a function of the output-unit coordinates (x (n,), y (n,)) of pixels -> colours (n, 3)."""
    kind = TEXTURES[int(rng.choice(len(TEXTURES), p=np.asarray(weights) / np.sum(weights)))]
    first, second = colours
    cx, cy = center
    if kind == "solid":
        return kind, lambda x, y: np.broadcast_to(first, (x.shape[0], 3))
    if kind == "stripes":
        ux, uy = _unit_vector(rng)
        period, phase = rng.uniform(3.0, 8.0), rng.random()
        return kind, lambda x, y: _two_colour(first, second, ((ux * x + uy * y) / period + phase) % 1.0 < 0.5)
    if kind == "checker":
        ux, uy = _unit_vector(rng)
        cell = rng.uniform(3.0, 7.0)

        def checker(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            u = np.floor((ux * (x - cx) + uy * (y - cy)) / cell)
            v = np.floor((-uy * (x - cx) + ux * (y - cy)) / cell)
            return _two_colour(first, second, (u + v) % 2 == 1)

        return kind, checker
    if kind == "dots":
        spacing = rng.uniform(4.0, 8.0)
        dot_radius = spacing * rng.uniform(0.25, 0.4)
        ox, oy = rng.random(2) * spacing

        def dots(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            dx = (x - cx + ox) % spacing - spacing / 2
            dy = (y - cy + oy) % spacing - spacing / 2
            return _two_colour(first, second, dx * dx + dy * dy < dot_radius * dot_radius)

        return kind, dots
    ux, uy = _unit_vector(rng)

    def gradient(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        t = np.clip((ux * (x - cx) + uy * (y - cy)) / (2.0 * radius) + 0.5, 0.0, 1.0)[:, None]
        return first[None, :] * (1.0 - t) + second[None, :] * t

    return kind, gradient


CLASS_TEXTURES: tuple[str, ...] = (
    "solid",
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checker",
    "dots",
    "grid",
    "diamonds",
    "rings",
    "gradient",
)  # the texture of each class of CLASS_NAMES when SynthStyle.class_textures is on


def _class_texture(
    rng: np.random.Generator,
    class_id: int,
    center: tuple[float, float],
    colours: tuple[np.ndarray, np.ndarray],
    size: int,
    shades: bool = True,
    period_jitter: float = 0.15,
) -> TextureFn:
    """The texture of class ``class_id`` (CLASS_TEXTURES) in image coordinates, so rotations and flips keep it.

    Periods are ~1/7 of the image side (9 px at 64 px, 4.6 px at 32 px) times a factor uniform in
    [1 - ``period_jitter``, 1 + ``period_jitter``], with a random
    phase; "diagonal stripes" run at +45 or -45 degrees at random, so a horizontal flip keeps the class.
    ``shades``: the two colours are a light and a dark shade of ``colours[0]``; otherwise they are ``colours`` as given.
    """
    kind = CLASS_TEXTURES[class_id]
    first = colours[0]
    if shades:  # a strong light/dark contrast between the two texture colours, whatever the hue
        second = (first * 0.3 if float(first.mean()) > 0.5 else first + (1.0 - first) * 0.7).astype(
            np.float32
        )
    else:
        second = colours[1]
    period = size / 7.0 * float(rng.uniform(1.0 - period_jitter, 1.0 + period_jitter))
    ox, oy = rng.random(2) * period
    cx, cy = center
    if kind == "solid":
        return lambda x, y: np.broadcast_to(first, (x.shape[0], 3))
    if kind == "gradient":
        angle = rng.uniform(0.0, 2.0 * math.pi)
        ux, uy = math.cos(angle), math.sin(angle)

        def gradient(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            t = np.clip((ux * (x - cx) + uy * (y - cy)) / (0.6 * size) + 0.5, 0.0, 1.0)[:, None]
            return first[None, :] * (1.0 - t) + second[None, :] * t

        return gradient

    def phase(values: np.ndarray) -> np.ndarray:
        return (values / period) % 1.0

    patterns: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        "horizontal stripes": lambda x, y: phase(y + oy) < 0.5,
        "vertical stripes": lambda x, y: phase(x + ox) < 0.5,
        "checker": lambda x, y: (phase(x + ox) < 0.5) != (phase(y + oy) < 0.5),
        "dots": lambda x, y: (phase(x + ox) - 0.5) ** 2 + (phase(y + oy) - 0.5) ** 2 < 0.09,
        "grid": lambda x, y: (phase(x + ox) < 0.25) | (phase(y + oy) < 0.25),
        "diamonds": lambda x, y: (
            (phase((x + y) / math.sqrt(2) + ox) < 0.5) != (phase((x - y) / math.sqrt(2) + oy) < 0.5)
        ),
        "rings": lambda x, y: phase(np.hypot(x - cx, y - cy) + ox) < 0.5,
    }
    if kind == "diagonal stripes":
        sign = 1.0 if rng.random() < 0.5 else -1.0
        pattern = lambda x, y: phase((x + sign * y) / math.sqrt(2) + ox) < 0.5  # noqa: E731
    else:
        pattern = patterns[kind]
    return lambda x, y: _two_colour(first, second, pattern(x, y))


def _to_bytes(values: np.ndarray) -> np.ndarray:
    return (np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _upsample(field: np.ndarray, canvas_size: int, resample: Image.Resampling) -> np.ndarray:
    """Upsample a (k, k, 3) float field in [0, 1] to a (canvas_size, canvas_size, 3) uint8 array with PIL."""
    return np.array(Image.fromarray(_to_bytes(field), "RGB").resize((canvas_size, canvas_size), resample))


def _sample_background(rng: np.random.Generator, size: int, scale: int, style: SynthStyle) -> np.ndarray:
    """A random (size * scale, size * scale, 3) uint8 background: smooth field, gradient, grain or stripes.

    Smooth fields, gradients and grain are made at output resolution (or coarser) and upsampled by pixel
    repetition, which the final box downsampling undoes exactly; stripes are drawn at full resolution so that the
    box downsampling anti-aliases them.
    """
    canvas_size = size * scale
    weights = np.asarray(style.background_weights) / np.sum(style.background_weights)
    kind = BACKGROUNDS[int(rng.choice(len(BACKGROUNDS), p=weights))]
    contrast = style.background_contrast
    base = _random_colour(rng)
    nearest = Image.Resampling.NEAREST
    if kind == "smooth":
        cells = int(rng.integers(2, 6))
        strength = rng.uniform(0.3, 0.8) * contrast
        field = base * (1.0 - strength) + rng.random((cells, cells, 3)).astype(np.float32) * strength
        smooth = Image.fromarray(_to_bytes(field), "RGB").resize((size, size), Image.Resampling.BICUBIC)
        return np.array(smooth.resize((canvas_size, canvas_size), nearest))
    ux, uy = _unit_vector(rng)
    if kind == "gradient":
        other = base * (1.0 - contrast) + _random_colour(rng) * contrast
        coords = (np.arange(size, dtype=np.float32) + 0.5) - size / 2
        t = np.clip((ux * coords[None, :] + uy * coords[:, None]) / size + 0.5, 0.0, 1.0)[..., None]
        return _upsample(base * (1.0 - t) + other * t, canvas_size, nearest)
    if kind == "grain":
        cells = max(1, size // int(rng.choice([1, 2])))
        noise = rng.normal(0.0, rng.uniform(0.05, 0.15) * contrast, (cells, cells, 3)).astype(np.float32)
        return _upsample(base + noise, canvas_size, nearest)
    mix = rng.uniform(0.15, 0.4) * contrast
    other = base * (1.0 - mix) + _random_colour(rng) * mix
    fine = (np.arange(canvas_size, dtype=np.float32) + 0.5) / scale
    period, phase = rng.uniform(4.0, 12.0), rng.random()
    position = np.add.outer(uy * fine / period, ux * fine / period + phase)
    stripes = (position - np.floor(position)) < 0.5
    palette = np.stack([_to_bytes(base), _to_bytes(other)])
    return palette[stripes.view(np.uint8)]


# ----------------------------------------------------------------------------------------------------------------
# Rendering one sample
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _PlannedObject:
    spec: ShapeSpec
    class_id: int
    top: int
    left: int
    coverage: np.ndarray  # bool (h, w) crop of the canvas at (top, left)
    colours: tuple[np.ndarray, np.ndarray]


def _plan_object(
    rng: np.random.Generator,
    class_id: int,
    center: tuple[float, float],
    radius: float,
    canvas_size: int,
    scale: int,
    background_mean: np.ndarray,
    style: SynthStyle,
) -> _PlannedObject:
    name = CLASS_NAMES[class_id]
    angle = float(rng.uniform(0.0, 360.0))
    # the same single draw mapped to [-max, max], so that full-rotation styles keep their bytes
    if style.max_rotation_deg < 180.0:
        angle = (angle / 180.0 - 1.0) * style.max_rotation_deg
    spec = ShapeSpec(name, center, radius, angle, _sample_shape_params(name, rng))
    top, left, coverage = _rasterize_crop(spec, canvas_size, scale)
    pair_contrast = (
        style.texture_contrast if style.class_textures and style.texture_contrast is not None else 0.0
    )
    colours = _object_colours(rng, background_mean, style.min_object_contrast, pair_contrast)
    return _PlannedObject(spec, class_id, top, left, coverage, colours)


LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _object_colours(
    rng: np.random.Generator,
    background_mean: np.ndarray,
    min_contrast: float,
    min_luma_difference: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Two texture colours whose mean is >= min_contrast from the background mean in RGB and whose lumas differ by
    >= min_luma_difference.

    Draws 16 candidate pairs at once (64 with a luma condition, which fewer pairs meet) and keeps the first that
    qualifies. If none does: the last pair, or with a luma condition the pair that falls least short of both.
    """
    count = 64 if min_luma_difference > 0.0 else 16
    pairs = _random_colours(rng, 2 * count).reshape(count, 2, 3)
    distance = np.linalg.norm(pairs.mean(axis=1) - background_mean[None, :], axis=1)
    luma_difference = np.abs((pairs[:, 0] - pairs[:, 1]) @ LUMA_WEIGHTS)
    qualifying = np.flatnonzero((distance >= min_contrast) & (luma_difference >= min_luma_difference))
    if qualifying.size:
        chosen = int(qualifying[0])
    elif min_luma_difference > 0.0:
        shortfall = np.maximum(min_contrast - distance, 0.0) + np.maximum(
            min_luma_difference - luma_difference, 0.0
        )
        chosen = int(np.argmin(shortfall))
    else:
        chosen = count - 1
    first, second = pairs[chosen]
    return first, second


def _add_overlap(a: _PlannedObject, b: _PlannedObject, covered: np.ndarray) -> np.ndarray:
    """A copy of the full-canvas bool map ``covered`` with the canvas pixels covered by both objects added."""
    top, left = max(a.top, b.top), max(a.left, b.left)
    bottom = min(a.top + a.coverage.shape[0], b.top + b.coverage.shape[0])
    right = min(a.left + a.coverage.shape[1], b.left + b.coverage.shape[1])
    result = covered.copy()
    if bottom > top and right > left:
        a_part = a.coverage[top - a.top : bottom - a.top, left - a.left : right - a.left]
        b_part = b.coverage[top - b.top : bottom - b.top, left - b.left : right - b.left]
        result[top:bottom, left:right] |= a_part & b_part
    return result


def render_sample(
    rng: np.random.Generator | int | Sequence[int],
    size: int = 64,
    class_id: int | None = None,
    num_distractors: int | None = None,
    style: SynthStyle = DEFAULT_STYLE,
) -> tuple[Image.Image, np.ndarray, int]:
    """Render one synthetic image, its segmentation mask and its class.

    ``rng`` is a numpy Generator or a seed (int or sequence of ints for ``np.random.default_rng``). ``class_id``
    fixes the main object's class (random when None); ``num_distractors`` fixes the number of smaller objects
    (random in ``style.num_distractors`` when None); ``style`` sets the difficulty. Returns (RGB PIL image of
    size x size, uint8 mask (size, size) with 0 = background, class_id + 1 = object, 255 = ignore, see the module
    docstring, class_id of the main object).
    """
    if size < MIN_SIZE:
        raise ConfigError(f"synthetic image size {size} is too small; use --size {MIN_SIZE} or more")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    num_classes = len(CLASS_NAMES)
    if class_id is None:
        class_id = int(rng.integers(num_classes))
    if not 0 <= class_id < num_classes:
        raise ConfigError(f"class_id {class_id} is out of range 0..{num_classes - 1}")
    if num_distractors is None:
        num_distractors = int(rng.integers(style.num_distractors[0], style.num_distractors[1] + 1))
    scale = SUPERSAMPLE
    canvas_size = size * scale

    canvas = _sample_background(rng, size, scale, style)
    background_mean = canvas[::scale, ::scale].reshape(-1, 3).mean(axis=0) / 255.0

    main_radius = float(rng.uniform(*style.main_radius) * size)
    margin = 0.85 * main_radius
    main_center = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
    main = _plan_object(rng, class_id, main_center, main_radius, canvas_size, scale, background_mean, style)
    behind, in_front = _plan_distractors(
        rng, main, main_radius, num_distractors, size, scale, background_mean, style
    )
    labels = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
    objects = [*behind, main, *in_front]
    for planned in objects:  # back to front
        _paint(rng, planned, canvas, labels, size, scale, style)

    pixels = np.asarray(Image.fromarray(canvas, "RGB").reduce(scale), dtype=np.float32)  # box filter
    noise_std = rng.uniform(0.0, style.max_noise_std)  # mild sensor noise
    pixels += rng.normal(0.0, noise_std, pixels.shape).astype(np.float32)
    image = Image.fromarray((np.clip(pixels, 0.0, 255.0) + 0.5).astype(np.uint8), "RGB")
    candidates = [BACKGROUND_LABEL] + [planned.class_id + 1 for planned in objects]
    return image, _majority_labels(labels, size, scale, candidates), class_id


def _plan_distractors(
    rng: np.random.Generator,
    main: _PlannedObject,
    main_radius: float,
    count: int,
    size: int,
    scale: int,
    background_mean: np.ndarray,
    style: SynthStyle,
) -> tuple[list[_PlannedObject], list[_PlannedObject]]:
    """``count`` objects of random classes, sized relative to ``main_radius``, split into those behind the main object
    and those in front of it (a distractor that asks to be in front is put behind when it would hide more than
    ``style.max_hidden_fraction`` of the main object)."""
    canvas_size = size * scale
    behind: list[_PlannedObject] = []
    in_front: list[_PlannedObject] = []
    main_area = max(np.count_nonzero(main.coverage), 1)
    hidden = np.zeros((canvas_size, canvas_size), dtype=bool)
    for _ in range(count):
        distractor_class = int(rng.integers(len(CLASS_NAMES)))
        center = (float(rng.uniform(0.0, size)), float(rng.uniform(0.0, size)))
        radius = main_radius * float(rng.uniform(*style.distractor_scale))
        distractor = _plan_object(
            rng, distractor_class, center, radius, canvas_size, scale, background_mean, style
        )
        if rng.random() < 0.5:  # wants to be in front; allowed while enough of the main object stays visible
            hidden_if_front = _add_overlap(distractor, main, hidden)
            if np.count_nonzero(hidden_if_front) <= style.max_hidden_fraction * main_area:
                hidden = hidden_if_front
                in_front.append(distractor)
                continue
        behind.append(distractor)
    return behind, in_front


def _paint(
    rng: np.random.Generator,
    planned: _PlannedObject,
    canvas: np.ndarray,
    labels: np.ndarray,
    size: int,
    scale: int,
    style: SynthStyle,
) -> None:
    """Draw ``planned`` with its texture into the supersampled ``canvas`` and its label into ``labels`` (in place)."""
    if style.class_textures:
        texture = _class_texture(
            rng,
            planned.class_id,
            planned.spec.center,
            planned.colours,
            size,
            shades=style.texture_contrast is None,
            period_jitter=style.texture_period_jitter,
        )
    else:
        _, texture = _sample_texture(
            rng, planned.spec.center, planned.spec.radius, planned.colours, style.texture_weights
        )
    rows, cols = np.nonzero(planned.coverage)
    rows += planned.top
    cols += planned.left
    colours = texture((cols.astype(np.float32) + 0.5) / scale, (rows.astype(np.float32) + 0.5) / scale)
    canvas[rows, cols] = _to_bytes(colours)
    labels[rows, cols] = planned.class_id + 1


def _majority_labels(labels: np.ndarray, size: int, scale: int, candidates: Sequence[int]) -> np.ndarray:
    """Downsample a (size*scale)^2 label map: the label covering > half of a pixel's sub-pixels, else 255.

    ``candidates`` lists every label that may occur in ``labels`` (others are never assigned).
    """
    mask = np.full((size, size), IGNORE_LABEL, dtype=np.uint8)
    sub_pixels = scale * scale
    for label in sorted(set(candidates)):
        # Box-reducing an image that is sub_pixels on this label and 0 elsewhere gives each pixel's exact count.
        indicator = (labels == label).view(np.uint8) * np.uint8(sub_pixels)
        count = np.asarray(Image.fromarray(indicator, "L").reduce(scale))
        mask[2 * count.astype(np.int32) > sub_pixels] = label
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Writing a data set
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthInfo:
    """What a synthetic data set holds: its root, class names, split sizes and per-split class counts."""

    root: Path
    classes: tuple[str, ...]
    num_train: int
    num_val: int
    size: int
    seed: int
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class name -> count
    style: SynthStyle = DEFAULT_STYLE

    @property
    def train_dir(self) -> Path:
        """ImageFolder root of the training images."""
        return self.root / "train"

    @property
    def val_dir(self) -> Path:
        """ImageFolder root of the validation images."""
        return self.root / "val"

    def image_dir(self, split: str) -> Path:
        """ImageFolder root of a split ("train" or "val")."""
        return self.root / split

    def mask_dir(self, split: str) -> Path:
        """Root of a split's masks, laid out like its images."""
        return self.root / "masks" / split

    @property
    def label_ids(self) -> dict[str, int]:
        """Mask value of each class (class index + 1; 0 is background, 255 ignore)."""
        return {name: index + 1 for index, name in enumerate(self.classes)}


def image_stem(split: str, index: int) -> str:
    """File stem of image ``index`` of ``split`` (e.g. "train_000042")."""
    return f"{split}_{index:06d}"


def class_of_index(index: int) -> int:
    """Class of image ``index`` in either split: index % num_classes, which keeps the splits balanced."""
    return index % len(CLASS_NAMES)


def sample_seed(seed: int, split: str, index: int) -> list[int]:
    """Seed entropy of one image, (seed, split code, index), so that any worker renders the same bytes."""
    return [seed, _SPLIT_CODES[split], index]


def mask_path_for(image_path: str | os.PathLike[str]) -> Path:
    """Mask path of a synthetic image: ``DIR/<split>/<class>/<stem>.png`` -> ``DIR/masks/<split>/<class>/<stem>.png``."""
    path = Path(image_path)
    class_dir = path.parent
    split_dir = class_dir.parent
    return split_dir.parent / "masks" / split_dir.name / class_dir.name / f"{path.stem}.png"


def list_samples(root: str | os.PathLike[str], split: str) -> list[tuple[Path, Path, int]]:
    """(image path, mask path, class id) of every image of a split, sorted by path; raises DataError if none."""
    info = read_synth_info(root)
    samples = []
    for class_id, name in enumerate(info.classes):
        for image_path in sorted((info.image_dir(split) / name).glob("*.png")):
            samples.append((image_path, mask_path_for(image_path), class_id))
    if not samples:
        raise DataError(
            f"no images under {info.image_dir(split)}; regenerate with `franca data synth --out {root}`"
        )
    return samples


def read_synth_info(root: str | os.PathLike[str]) -> SynthInfo:
    """Read ``DIR/classes.json`` written by :func:`generate_synthetic_dataset`; DataError if missing or foreign."""
    root = Path(root)
    meta_path = root / "classes.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(
            f"cannot read {meta_path} ({error}); generate it with `franca data synth --out {root}`"
        ) from None
    if not isinstance(meta, dict) or meta.get("generator") != GENERATOR_NAME:
        raise DataError(f"{meta_path} was not written by `franca data synth`; regenerate the data set")
    if not meta.get("complete", False):
        raise DataError(f"generation of {root} did not finish; rerun `franca data synth --out {root}`")
    return SynthInfo(
        root=root,
        classes=tuple(meta["classes"]),
        num_train=int(meta["num_train"]),
        num_val=int(meta["num_val"]),
        size=int(meta["size"]),
        seed=int(meta["seed"]),
        class_counts={split: dict(counts) for split, counts in meta.get("class_counts", {}).items()},
        style=_style_from_dict(meta.get("style", {})),
    )


def _style_from_dict(values: dict[str, object]) -> SynthStyle:
    known = {name: value for name, value in values.items() if name in SynthStyle.__dataclass_fields__}
    return SynthStyle(**{name: tuple(v) if isinstance(v, list) else v for name, v in known.items()})


def _is_synth_output(root: Path) -> bool:
    try:
        meta = json.loads((root / "classes.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == GENERATOR_NAME


def _prepare_output_dir(root: Path, overwrite: bool) -> None:
    """Create ``root``; clear a previous synthetic data set there; refuse any other non-empty folder."""
    if root.exists() and not root.is_dir():
        raise DataError(f"output path {root} is a file; choose a folder with --out")
    if root.is_dir() and any(root.iterdir()):
        if not (overwrite or _is_synth_output(root)):
            raise DataError(
                f"output folder {root} is not empty and holds no synthetic data set; "
                "choose an empty folder or pass --overwrite"
            )
        for name in _OWN_ENTRIES:  # only what this generator writes; other files stay
            path = root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    root.mkdir(parents=True, exist_ok=True)


_Task = tuple[str, str, int, int, int, SynthStyle]  # root, split, index, size, seed, style


def _render_and_save(task: _Task) -> int:
    """Worker: render image ``index`` of ``split`` and write its PNG image and mask. Returns 1 (for counting)."""
    root, split, index, size, seed, style = task
    class_id = class_of_index(index)
    rng = np.random.default_rng(sample_seed(seed, split, index))
    image, mask, _ = render_sample(rng, size, class_id, style=style)
    name, stem = CLASS_NAMES[class_id], image_stem(split, index)
    image.save(Path(root, split, name, f"{stem}.png"), format="PNG", compress_level=3)
    Image.fromarray(mask, "L").save(
        Path(root, "masks", split, name, f"{stem}.png"), format="PNG", compress_level=3
    )
    return 1


def _style_name(style: SynthStyle) -> str | None:
    return next((name for name, preset in STYLES.items() if preset == style), None)


def _readme_text(info: SynthInfo) -> str:
    low, high = info.style.num_distractors
    style_name = _style_name(info.style)
    style_argument = f" --style {style_name}" if style_name else " (custom style: see classes.json)"
    lines = [
        "Procedural synthetic shapes data set written by `franca data synth` (franca.data.synth).",
        "",
        f"{info.num_train} train + {info.num_val} val RGB images, {info.size}x{info.size} px, seed {info.seed},",
        f"{len(info.classes)} classes: {', '.join(info.classes)}.",
        f"Each image shows one large main object (its class) and {low}-{high} smaller distractor objects of any class,",
        "with random colours, textures, sizes, positions and rotations on a random background.",
        "",
        "Layout (<stem> = <split>_<index:06d>):",
        "  classes.json                       class names, mask label ids, generation settings",
        "  train/<class>/<stem>.png           images, torchvision ImageFolder layout",
        "  val/<class>/<stem>.png",
        "  masks/train/<class>/<stem>.png     segmentation masks (PNG mode L, same size as the image)",
        "  masks/val/<class>/<stem>.png",
        "The mask of <split>/<class>/<stem>.png is masks/<split>/<class>/<stem>.png.",
        "",
        "Mask values: 0 = background, class index + 1 = object of that class (the object on top wins),",
        f"255 = ignore. Each pixel takes the label covering a strict majority of its {SUPERSAMPLE}x{SUPERSAMPLE} sub-pixels;",
        "255 marks the rare pixels where three or more regions meet and none has a majority.",
        "Label ids: " + ", ".join(f"{name}={label}" for name, label in info.label_ids.items()) + ".",
        "",
        "Regenerate with:",
        f"  franca data synth --out DIR --num-images {info.num_train} --val-images {info.num_val} "
        f"--size {info.size} --seed {info.seed}{style_argument}",
        "",
    ]
    return "\n".join(lines)


def _write_metadata(info: SynthInfo, complete: bool) -> None:
    meta = {
        "generator": GENERATOR_NAME,
        "format_version": FORMAT_VERSION,
        "complete": complete,
        "classes": list(info.classes),
        "label_ids": info.label_ids,
        "background_label": BACKGROUND_LABEL,
        "ignore_label": IGNORE_LABEL,
        "num_train": info.num_train,
        "num_val": info.num_val,
        "size": info.size,
        "seed": info.seed,
        "image_format": "png",
        "layout": {
            "images": "<split>/<class>/<split>_<index:06d>.png",
            "masks": "masks/<split>/<class>/<split>_<index:06d>.png",
        },
        "class_counts": info.class_counts,
        "style_name": _style_name(info.style),
        "style": info.style.as_dict(),
    }
    (info.root / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")


def _class_counts(count: int) -> dict[str, int]:
    counts = dict.fromkeys(CLASS_NAMES, 0)
    for index in range(count):
        counts[CLASS_NAMES[class_of_index(index)]] += 1
    return counts


def _iterate_results(tasks: list[_Task], workers: int) -> Iterator[int]:
    if workers <= 1:
        yield from map(_render_and_save, tasks)
        return
    chunk = max(1, min(16, len(tasks) // (workers * 8)))
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap_unordered(_render_and_save, tasks, chunksize=chunk)


def generate_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    num_train: int = 10000,
    num_val: int = 1000,
    size: int = 64,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    style: SynthStyle = DEFAULT_STYLE,
) -> SynthInfo:
    """Write the synthetic data set (layout in the module docstring) under ``out_dir`` and return its :class:`SynthInfo`.

    A previous synthetic data set in ``out_dir`` is replaced; any other non-empty folder raises DataError unless
    ``overwrite`` (which then replaces only train/, val/, masks/, classes.json and README.txt). ``workers`` > 1
    renders in a process pool; the files are identical for any ``workers``. ``progress`` shows a tqdm bar;
    ``style`` sets the difficulty (recorded in classes.json).
    """
    if num_train < 1 or num_val < 0:
        raise ConfigError(f"need --num-images >= 1 and --val-images >= 0 (got {num_train} and {num_val})")
    if size < MIN_SIZE:
        raise ConfigError(f"synthetic image size {size} is too small; use --size {MIN_SIZE} or more")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {workers})")
    root = Path(out_dir)
    _prepare_output_dir(root, overwrite)
    counts = {"train": num_train, "val": num_val}
    for split in SPLITS:
        for name in CLASS_NAMES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split / name).mkdir(parents=True, exist_ok=True)
    tasks = [
        (str(root), split, index, size, seed, style) for split in SPLITS for index in range(counts[split])
    ]
    info = SynthInfo(
        root=root,
        classes=CLASS_NAMES,
        num_train=num_train,
        num_val=num_val,
        size=size,
        seed=seed,
        class_counts={split: _class_counts(counts[split]) for split in SPLITS},
        style=style,
    )
    # classes.json is written first with complete=false, so that an interrupted run is still recognised (and
    # replaced) as this generator's output, and rewritten with complete=true at the end.
    _write_metadata(info, complete=False)

    # lazy: tqdm takes ~65 ms to import and `franca --help` imports this module (~0.2 s in all)
    from franca.core.progress import ProgressBar

    with ProgressBar(total=len(tasks), desc="synth", unit="img", disable=not progress) as bar:
        for done in _iterate_results(tasks, workers):
            bar.update(done)
    (root / "README.txt").write_text(_readme_text(info))
    _write_metadata(info, complete=True)
    return info
