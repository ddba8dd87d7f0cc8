"""Synthetic segmentation scenes with exact labels, deterministic by seed.

A scene is a textured background (class 0) with 3–8 objects in random depth order, later
objects occluding earlier ones. Each object class is a fixed *shape family*, so class
identity is learnable from shape and context only: every object gets its own texture
(smooth noise, stripes or checker) drawn through one random palette shared by the whole
image, so colour says nothing about the class. Sizes scale with the image; "px" below is
at 128² (``unit = size / 128`` pixels, thin widths at least 1.5 px at any size).

==== ============ ==========================================================
cls  family       shape
==== ============ ==========================================================
1    ellipse      filled disc / ellipse
2    rectangle    filled rectangle, rotated
3    ring         thin elliptical annulus, 2–4 px wide
4    sticks       thin branching line segments, 1.5–3 px wide (the thin parts)
5    triangle     filled triangle
6    star         5–8 pointed star
7    cross        plus sign of two perpendicular bars
8    crescent     disc with an offset disc cut out
9    frame        hollow rectangle outline, 2–4 px wide
10   speckles     cluster of 6–14 small dots (radius 1.5–3 px)
11   wave         sinusoidal band, 4–7 px wide
12   L-shape      two bars joined at a right-angled corner
13   half-disc    semicircle
14   hexagon      regular hexagon
15   spiral       thin Archimedean spiral, 1.5–3 px wide
16   hatch        3–5 parallel short bars, 2.5–4 px wide
17   arrow        shaft with a triangular head
18   target       thin ring around a central disc
19   blob         smooth concave blob (a few radial harmonics)
20   zigzag       polyline with sharp turns, 3–5 px wide
==== ============ ==========================================================

``classes`` (2..21; VOC has 21) uses classes ``1..classes-1`` of this table. Each object's
class is uniform over them.

Rendering: every object is rasterised as a hard shape at :data:`SUPERSAMPLE`× the
resolution and reduced with ``INTER_AREA`` to its per-pixel coverage ``k/16``. The image is
anti-aliased: objects are composited bottom to top with the *over* operator, coverage as
alpha. The mask holds hard labels: a pixel gets the class of the topmost object covering at
least half of it (``k ≥ 8``), the background otherwise.

All randomness comes from ``np.random.default_rng(seed)``; the OpenCV calls used are
deterministic drawing and resizing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from kdkit.data import SeededDataset, contact_sheet, split_seed, write_image
from kdkit.data.textures import palette, texture
from kdkit.errors import DataError

from .files import write_mask
from .palette import colourise

__all__ = [
    "FAMILIES",
    "MAX_CLASSES",
    "SUPERSAMPLE",
    "SyntheticSegmentation",
    "synthesize_scene",
    "write_synthetic_folder",
]

SUPERSAMPLE = 4
_MIN_SIZE = 32
_SHIFT = 4  # fractional bits of the drawing coordinates
_FULL = SUPERSAMPLE * SUPERSAMPLE  # coverage k of a pixel is in 0.._FULL
_MIN_THIN = 1.5  # the narrowest stroke, in output pixels, at any image size

# A shape is a list of strokes (kind, geometry, value), drawn in order with value 1 (fill)
# or 0 (cut out), in output-pixel coordinates (pixel centres at integers):
#   ("poly", [N×2 array, ...])                 filled polygons
#   ("ellipse", (cx, cy, ax, ay, degrees))     filled ellipse
#   ("lines", ([N×2 array, ...], width))       open polylines ``width`` pixels wide
Stroke = tuple[str, object, int]


def _unit_circle(count: int, start: float = 0.0, stop: float = 2 * np.pi) -> np.ndarray:
    t = np.linspace(start, stop, count)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _thin(rng: np.random.Generator, unit: float, low: float, high: float) -> float:
    """A stroke width of ``low..high`` px at 128², at least ``_MIN_THIN`` pixels."""
    return max(_MIN_THIN, unit * rng.uniform(low, high))


def _box(half_w: float, half_h: float) -> np.ndarray:
    return np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])


def _ellipse(rng, r, unit):
    return [("ellipse", (0.0, 0.0, r, r * rng.uniform(0.5, 1.0), 0.0), 1)]


def _rectangle(rng, r, unit):
    half_w = r * rng.uniform(0.7, 1.0)
    return [("poly", [_box(half_w, half_w * rng.uniform(0.3, 1.0))], 1)]


def _ring(rng, r, unit):
    ay, width = r * rng.uniform(0.75, 1.0), _thin(rng, unit, 2, 4)
    return [("ellipse", (0.0, 0.0, r, ay, 0.0), 1),
            ("ellipse", (0.0, 0.0, r - width, ay - width, 0.0), 0)]


def _sticks(rng, r, unit):
    width, length = _thin(rng, unit, 1.5, 3), r * rng.uniform(1.6, 2.6)
    lines = [np.array([[-length / 2, 0.0], [length / 2, 0.0]])]
    for _ in range(int(rng.integers(1, 4))):
        start = length * (rng.uniform(0.2, 0.8) - 0.5)
        angle = rng.choice([-1, 1]) * rng.uniform(np.radians(25), np.radians(70))
        reach = length * rng.uniform(0.3, 0.6)
        lines.append(np.array([[start, 0.0],
                               [start + reach * np.cos(angle), reach * np.sin(angle)]]))
    return [("lines", (lines, width), 1)]


def _triangle(rng, r, unit):
    angles = np.radians([0, 120, 240] + rng.uniform(-25, 25, size=3))
    radius = r * rng.uniform(0.8, 1.1, size=(3, 1))
    return [("poly", [radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)], 1)]


def _star(rng, r, unit):
    points = int(rng.integers(5, 9))
    radius = np.tile([r, r * rng.uniform(0.35, 0.55)], points)[:, None]
    return [("poly", [radius * _unit_circle(2 * points + 1)[:-1]], 1)]


def _cross(rng, r, unit):
    half = r * rng.uniform(0.15, 0.28)
    return [("poly", [_box(r, half)], 1), ("poly", [_box(half, r * rng.uniform(0.7, 1.0))], 1)]


def _crescent(rng, r, unit):
    shift = r * rng.uniform(0.35, 0.6)
    inner = r * rng.uniform(0.75, 0.95)
    return [("ellipse", (0.0, 0.0, r, r, 0.0), 1), ("ellipse", (shift, 0.0, inner, inner, 0.0), 0)]


def _frame(rng, r, unit):
    half_h, width = r * rng.uniform(0.6, 1.0), _thin(rng, unit, 2, 4)
    return [("poly", [_box(r, half_h)], 1), ("poly", [_box(r - width, half_h - width)], 0)]


def _speckles(rng, r, unit):
    count = int(rng.integers(6, 15))
    where = np.sqrt(rng.uniform(0, 1, count)) * r
    angle = rng.uniform(0, 2 * np.pi, count)
    radius = np.maximum(_MIN_THIN, unit * rng.uniform(1.5, 3, count))
    return [("ellipse", (d * np.cos(a), d * np.sin(a), s, s, 0.0), 1)
            for d, a, s in zip(where, angle, radius)]


def _wave(rng, r, unit):
    x = np.linspace(-r, r, 32)
    amplitude, period = r * rng.uniform(0.15, 0.35), r * rng.uniform(0.6, 1.0)
    y = amplitude * np.sin(2 * np.pi * x / period + rng.uniform(0, 2 * np.pi))
    return [("lines", ([np.stack([x, y], axis=1)], _thin(rng, unit, 4, 7)), 1)]


def _l_shape(rng, r, unit):
    a, b = r * rng.uniform(1.2, 2.0, size=2)
    t = r * rng.uniform(0.25, 0.4)
    outline = np.array([[0, 0], [a, 0], [a, t], [t, t], [t, b], [0, b]]) - [a / 2, b / 2]
    return [("poly", [outline], 1)]


def _half_disc(rng, r, unit):
    return [("poly", [r * _unit_circle(25, 0, np.pi) - [0, r / 2]], 1)]


def _hexagon(rng, r, unit):
    return [("poly", [r * _unit_circle(7)[:-1]], 1)]


def _spiral(rng, r, unit):
    turns, width = rng.uniform(1.5, 2.5), _thin(rng, unit, 1.5, 3)
    t = np.linspace(0, 1, int(48 * turns))
    angle = 2 * np.pi * turns * t
    return [("lines", ([r * t[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)], width), 1)]


def _hatch(rng, r, unit):
    count, width = int(rng.integers(3, 6)), _thin(rng, unit, 2.5, 4)
    gap = width * rng.uniform(2.0, 3.0)
    half = r * rng.uniform(0.7, 1.0)
    offsets = (np.arange(count) - (count - 1) / 2) * gap
    return [("lines", ([np.array([[-half, y], [half, y]]) for y in offsets], width), 1)]


def _arrow(rng, r, unit):
    shaft, head = r * rng.uniform(0.1, 0.16), r * rng.uniform(0.4, 0.55)
    neck = r * rng.uniform(0.1, 0.4)
    outline = np.array([[-r, -shaft], [neck, -shaft], [neck, -head], [r, 0],
                        [neck, head], [neck, shaft], [-r, shaft]])
    return [("poly", [outline], 1)]


def _target(rng, r, unit):
    width, core = _thin(rng, unit, 2, 4), r * rng.uniform(0.3, 0.45)
    return [("ellipse", (0.0, 0.0, r, r, 0.0), 1),
            ("ellipse", (0.0, 0.0, r - width, r - width, 0.0), 0),
            ("ellipse", (0.0, 0.0, core, core, 0.0), 1)]


def _blob(rng, r, unit):
    angle = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    radius = np.ones_like(angle)
    for k in (2, 3, 4):
        radius += rng.uniform(0.08, 0.2) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    return [("poly", [r * 0.85 * radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)],
             1)]


def _zigzag(rng, r, unit):
    corners = int(rng.integers(4, 8))
    x = np.linspace(-r, r, corners)
    y = r * rng.uniform(0.2, 0.4) * np.where(np.arange(corners) % 2, 1.0, -1.0)
    return [("lines", ([np.stack([x, y], axis=1)], _thin(rng, unit, 3, 5)), 1)]


#: The shape family of class ``c`` is ``FAMILIES[c - 1]`` (see the module docstring).
FAMILIES: tuple[tuple[str, Callable], ...] = (
    ("ellipse", _ellipse), ("rectangle", _rectangle), ("ring", _ring), ("sticks", _sticks),
    ("triangle", _triangle), ("star", _star), ("cross", _cross), ("crescent", _crescent),
    ("frame", _frame), ("speckles", _speckles), ("wave", _wave), ("L-shape", _l_shape),
    ("half-disc", _half_disc), ("hexagon", _hexagon), ("spiral", _spiral), ("hatch", _hatch),
    ("arrow", _arrow), ("target", _target), ("blob", _blob), ("zigzag", _zigzag),
)
MAX_CLASSES = len(FAMILIES) + 1


def _place(strokes: list[Stroke], cx: float, cy: float, angle: float) -> list[Stroke]:
    """``strokes`` rotated by ``angle`` (radians) about the origin, then moved to (cx, cy)."""
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, s], [-s, c]])  # row vectors: p @ rotation

    def move(points: np.ndarray) -> np.ndarray:
        return np.asarray(points, np.float64) @ rotation + [cx, cy]

    placed: list[Stroke] = []
    for kind, geometry, value in strokes:
        if kind == "poly":
            placed.append((kind, [move(p) for p in geometry], value))
        elif kind == "lines":
            lines, width = geometry
            placed.append((kind, ([move(p) for p in lines], width), value))
        else:
            x, y, ax, ay, degrees = geometry
            (x, y), = move([[x, y]])
            placed.append((kind, (x, y, ax, ay, degrees + np.degrees(angle)), value))
    return placed


def _extent(strokes: list[Stroke]) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest (x, y) any stroke reaches."""
    low, high = [], []
    for kind, geometry, _ in strokes:
        if kind == "poly":
            points, margin = np.vstack(geometry), 0.0
        elif kind == "lines":
            points, margin = np.vstack(geometry[0]), geometry[1] / 2
        else:
            points, margin = np.array([geometry[:2]]), max(geometry[2], geometry[3])
        low.append(points.min(axis=0) - margin)
        high.append(points.max(axis=0) + margin)
    return np.min(low, axis=0), np.max(high, axis=0)


def _coverage(strokes: list[Stroke], x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """``height×width`` uint8 coverage ``k`` in ``0..16`` of the box at (x0, y0): the shape
    rasterised hard at ``SUPERSAMPLE``× (output pixel ``j`` spans fine pixels ``4j..4j+3``)
    and reduced with ``INTER_AREA``."""
    fine = np.zeros((height * SUPERSAMPLE, width * SUPERSAMPLE), np.uint8)
    scale = SUPERSAMPLE << _SHIFT

    def fixed(points: np.ndarray) -> np.ndarray:
        local = (np.asarray(points) - [x0, y0] + 0.5) * SUPERSAMPLE - 0.5
        return np.rint(local * (1 << _SHIFT)).astype(np.int32)

    for kind, geometry, value in strokes:
        colour = _FULL * value
        if kind == "poly":
            cv2.fillPoly(fine, [fixed(p) for p in geometry], colour, cv2.LINE_8, _SHIFT)
        elif kind == "lines":
            lines, line_width = geometry
            thickness = max(1, round(line_width * SUPERSAMPLE))
            cv2.polylines(fine, [fixed(p) for p in lines], False, colour, thickness,
                          cv2.LINE_8, _SHIFT)
        else:
            x, y, ax, ay, degrees = geometry
            (centre,) = fixed([[x, y]])
            axes = (round(ax * scale), round(ay * scale))
            cv2.ellipse(fine, (int(centre[0]), int(centre[1])), axes, float(degrees), 0, 360,
                        colour, -1, cv2.LINE_8, _SHIFT)
    return cv2.resize(fine, (width, height), interpolation=cv2.INTER_AREA)


@dataclass
class _Layer:
    """One object: its class, box ``[y0:y1, x0:x1]`` in the image, coverage ``k`` (uint8,
    0..16) and texture (uint8 RGB) over the box."""

    cls: int
    box: tuple[int, int, int, int]
    coverage: np.ndarray
    texture: np.ndarray


def _check(size: int, classes: int) -> None:
    if size < _MIN_SIZE:
        raise DataError(f"size must be at least {_MIN_SIZE} pixels (data.size, or --size of "
                        f"kdkit data synth), found {size}")
    if isinstance(classes, bool) or int(classes) != classes or not 2 <= classes <= MAX_CLASSES:
        raise DataError(
            f"synthetic scenes support classes in 2..{MAX_CLASSES} (background + one shape "
            f"family per class), found {classes!r}; use a smaller data.classes"
        )


def _scene(seed: int, size: int, classes: int,
           camouflage: bool = True) -> tuple[np.ndarray, list[_Layer]]:
    """The background texture and the objects of scene ``seed``, bottom to top; without
    ``camouflage`` each object is a random flat colour with a faint trace of its texture."""
    _check(size, classes)
    rng = np.random.default_rng(seed)
    colours = palette(rng)
    background = texture(rng, size, colours)
    unit = size / 128
    layers = []
    for _ in range(int(rng.integers(3, 9))):
        cls = int(rng.integers(1, classes))
        cx, cy = size * rng.uniform(0.08, 0.92, size=2)
        radius = size * rng.uniform(0.08, 0.18)
        angle = rng.uniform(0, 2 * np.pi)
        strokes = _place(FAMILIES[cls - 1][1](rng, radius, unit), cx, cy, angle)
        low, high = _extent(strokes)
        x0, y0 = np.maximum(np.floor(low).astype(int) - 1, 0)
        x1, y1 = np.minimum(np.ceil(high).astype(int) + 2, size)
        if x1 <= x0 or y1 <= y0:
            continue
        coverage = _coverage(strokes, int(x0), int(y0), int(x1 - x0), int(y1 - y0))
        # at least half the image, so pattern scales match the background's and small
        # objects get no aliased stripes
        side = max(size // 2, int(x1 - x0), int(y1 - y0))
        pattern = texture(rng, side, colours)[: y1 - y0, : x1 - x0]
        if not camouflage:  # a flat colour with a faint trace of the texture
            flat = rng.integers(0, 256, size=3).astype(np.float32)
            pattern = np.rint(0.85 * flat + 0.15 * pattern).astype(np.uint8)
        layers.append(_Layer(cls, (int(y0), int(y1), int(x0), int(x1)), coverage, pattern))
    return background, layers


def synthesize_scene(seed: int, size: int = 128, classes: int = 6,
                     camouflage: bool = True) -> dict:
    """One ``size×size`` scene (``size ≥ 32``, ``classes`` in 2..21), a pure function of its
    arguments (see the module docstring). ``camouflage=False`` makes each object a random
    flat colour (85%) over its texture (15%), so objects stand out from the textured
    background: an easier scene for short CPU runs (the class still comes from the shape).

    Returns ``image`` (``size×size×3`` uint8 RGB), ``mask`` (``size×size`` uint8 in
    ``0..classes-1``) and ``name`` (``"scene_<seed>"``).
    """
    background, layers = _scene(seed, size, classes, camouflage)
    image = background.astype(np.float32)
    mask = np.zeros((size, size), np.uint8)
    for layer in layers:
        y0, y1, x0, x1 = layer.box
        alpha = layer.coverage.astype(np.float32)[..., None] * np.float32(1 / _FULL)
        region = image[y0:y1, x0:x1]
        region += alpha * (layer.texture.astype(np.float32) - region)
        mask[y0:y1, x0:x1][layer.coverage * 2 >= _FULL] = layer.cls
    image = np.rint(np.clip(image, 0, 255)).astype(np.uint8)
    return {"image": image, "mask": mask, "name": f"scene_{seed}"}


class SyntheticSegmentation(SeededDataset):
    """``length`` synthetic scenes of ``split`` (``"train"`` or ``"test"``).

    Item ``i`` is ``synthesize_scene(split_seed(split, i), size, classes)``: train seeds are
    ``0..length-1``, test seeds ``10_000_000 + i``, so the splits never share a scene.
    Items are sample dicts, passed through ``transform`` when one is given. ``pool=N`` draws
    them from ``N`` scenes made once (see :class:`kdkit.data.SeededDataset`).
    """

    def __init__(
        self,
        split: str,
        length: int,
        size: int = 128,
        classes: int = 6,
        transform: Callable[[dict], dict] | None = None,
        camouflage: bool = True,
        pool: int | None = None,
    ) -> None:
        _check(size, classes)
        self.size, self.classes = size, int(classes)
        generate = partial(synthesize_scene, size=size, classes=self.classes,
                           camouflage=camouflage)
        super().__init__(generate, split, length, transform, pool)


def write_synthetic_folder(
    out_dir: str | Path,
    n: int,
    size: int,
    seed0: int = 0,
    split: str = "train",
    classes: int = 6,
) -> Path:
    """Write scenes ``seed0 .. seed0+n-1`` of ``split`` as a segmentation folder.

    Layout (loadable by :class:`~tasks.segmentation.data.folders.FolderSegmentation`)::

        out_dir/image/00000.png        RGB
        out_dir/mask/00000.png         the labels in VOC colours (see write_mask)
        out_dir/contact_sheet.png      the first 16 scenes: image | colourised mask

    Returns ``out_dir`` as a Path.
    """
    if n < 1:
        raise DataError(f"n must be at least 1, found {n}")
    _check(size, classes)
    out = Path(out_dir)
    shown = []
    for i in range(n):
        sample = synthesize_scene(split_seed(split, seed0 + i), size, classes)
        stem = f"{i:05d}.png"
        write_image(out / "image" / stem, sample["image"])
        write_mask(out / "mask" / stem, sample["mask"])
        if len(shown) < 16:
            shown.append({**sample, "mask_rgb": colourise(sample["mask"])})
    write_image(out / "contact_sheet.png", contact_sheet(shown, ("image", "mask_rgb")))
    return out
