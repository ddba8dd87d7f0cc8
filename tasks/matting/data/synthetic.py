"""Synthetic matting samples with exact ground truth, deterministic by seed.

A sample is made hard in the ways real matting is hard:

- **sub-pixel strands**: smooth random curves growing out of the body, drawn with
  ``cv2.polylines`` (``LINE_AA``, thickness 1) at :data:`SUPERSAMPLE`× the resolution and
  reduced with ``INTER_AREA``, so a strand covers a fraction of a pixel: sparse hair (half
  its colour its own) or, in half the samples on photos, dense fur in the body's colours,
  whose coverage falls from above one half at the body to single strands at the tips;
- **a solid body**: a union of ellipses whose edge is defocused (Gaussian) or motion-blurred
  (line kernel) on one side only;
- **a semi-transparent veil** (glass/smoke): a soft region with a smoothly varying alpha in
  ``[0.1, 0.9]`` partly behind the body;
- **shared colours**: foreground and background textures (smooth noise, stripes or checkers)
  map through one random colour palette, so colour alone does not separate them
  (``backgrounds="procedural"``);
- **natural photos** (``backgrounds="natural"``, the default, or a folder of photos): the
  background is an augmented crop of a photograph, and half the time so is the body's colour
  (another photo where the split has two or more), the other half a procedural texture; test
  seeds draw only the split's held-out photos (:mod:`kdkit.data.photos`).

The layers are combined with the *over* operator; the foreground colour ``fg`` is the
layers' colour wherever alpha > 0 and the body texture elsewhere. Alpha is quantised to
multiples of 1/255 (so PNG files hold it exactly), ``alpha = k/255``, and the image is
composited from the returned uint8 ``fg``/``bg`` in integers, ``image = (k·fg + (255 − k)·bg
+ 127) // 255``, which is exactly ``round(alpha·fg + (1 − alpha)·bg)`` (the exact value is
never a .5 tie, since 255 is odd).

All randomness comes from ``np.random.default_rng(seed)``; the OpenCV calls used are
deterministic drawing, filtering and resizing (no ``cv2.randu``/``theRNG``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from kdkit.data import SeededDataset, contact_sheet, split_seed, write_gray, write_image
from kdkit.data.photos import photo_pyramid, photo_sources, random_patch
from kdkit.data.textures import (
    low_resolution,
    palette,
    rotated_coordinates,
    smooth_noise,
    texture,
    upsample,
)
from kdkit.errors import DataError

from .files import alpha_from_uint8
from .trimaps import DEFAULT_UNKNOWN, check_unknown_value, eval_trimap

__all__ = [
    "SUPERSAMPLE",
    "BACKGROUNDS",
    "SyntheticMatting",
    "check_backgrounds",
    "seed_split",
    "synthesize",
    "write_synthetic_folder",
]

SUPERSAMPLE = 4
_MIN_SIZE = 32
_SHIFT = 2  # fractional bits of the polyline/ellipse coordinates
BACKGROUNDS = ("natural", "procedural")  # or the path of a folder of photos
PROCEDURAL = "procedural"


def seed_split(seed: int) -> str:
    """The split whose seed range holds ``seed`` (see :func:`kdkit.data.split_seed`)."""
    return "test" if seed >= split_seed("test", 0) else "train"


def check_backgrounds(backgrounds: str, split: str) -> str:
    """``backgrounds``, once its photos for ``split`` are found (a clear error if not)."""
    if backgrounds != PROCEDURAL:
        photo_sources(backgrounds, split)
    return backgrounds


def _defocused(rng: np.random.Generator, bg: np.ndarray) -> np.ndarray:
    """``bg`` (``S×S×3`` uint8) out of focus half the time, as behind a subject photographed
    with a shallow depth of field: a Gaussian blur of sigma 0.2–1.5 % of ``S``."""
    sigma = rng.uniform(0.002, 0.015) * bg.shape[0]
    return cv2.GaussianBlur(bg, (0, 0), sigma) if rng.random() < 0.5 else bg


def _photo_layers(rng: np.random.Generator, size: int, backgrounds: str, split: str,
                  colours: np.ndarray) -> tuple[np.ndarray, np.ndarray, str, str]:
    """``(bg, body, bg_source, fg_source)``: ``size×size×3`` uint8 background (a photo
    patch, out of focus half the time) and body colour (a patch of another photo, or a
    texture half the time), with the names of their photos (``"procedural"`` for a
    texture)."""
    sources = photo_sources(backgrounds, split)
    which = int(rng.integers(len(sources)))
    bg = _defocused(rng, random_patch(rng, photo_pyramid(sources[which][1]), size))
    if rng.random() < 0.5:
        return bg, texture(rng, size, colours), sources[which][0], PROCEDURAL
    other = (which + 1 + int(rng.integers(max(1, len(sources) - 1)))) % len(sources)
    body = random_patch(rng, photo_pyramid(sources[other][1]), size)
    return bg, body, sources[which][0], sources[other][0]


def _ellipses(rng: np.random.Generator, size: int) -> np.ndarray:
    """Rows ``(cx, cy, ax, ay, angle_rad)`` of 2–4 ellipses forming the body."""
    count = int(rng.integers(2, 5))
    centre = size * (0.5 + rng.uniform(-0.08, 0.08, size=2))
    offsets = rng.normal(0, 0.1 * size, size=(count, 2))
    offsets[0] = 0
    axes = size * rng.uniform(0.08, 0.22, size=(count, 2))
    angles = rng.uniform(0, np.pi, size=(count, 1))
    return np.hstack([centre + offsets, axes, angles])


def _draw_ellipses(mask: np.ndarray, ellipses: np.ndarray, scale: float = 1.0) -> None:
    """Fill ``ellipses`` (coordinates multiplied by ``scale``) into ``mask`` with 255,
    anti-aliased, at sub-pixel precision."""
    fixed = scale * (1 << _SHIFT)
    for cx, cy, ax, ay, angle in ellipses:
        cv2.ellipse(
            mask,
            (round(cx * fixed), round(cy * fixed)),
            (round(ax * fixed), round(ay * fixed)),
            float(np.degrees(angle)),
            0,
            360,
            255,
            -1,
            cv2.LINE_AA,
            _SHIFT,
        )


def _motion_kernel(rng: np.random.Generator, length: int) -> np.ndarray:
    """A normalised ``length×length`` float32 line kernel at a random angle."""
    kernel = np.zeros((length, length), np.float32)
    angle = rng.uniform(0, np.pi)
    half = (length - 1) / 2
    dx, dy = half * np.cos(angle), half * np.sin(angle)
    fixed = 1 << _SHIFT
    ends = [(round((half + sx * dx) * fixed), round((half + sx * dy) * fixed)) for sx in (-1, 1)]
    cv2.line(kernel, ends[0], ends[1], 1.0, 1, cv2.LINE_AA, _SHIFT)
    return kernel / kernel.sum()


def _body_alpha(rng: np.random.Generator, size: int, ellipses: np.ndarray) -> np.ndarray:
    """Body coverage in [0, 1]: anti-aliased ellipses, defocused (Gaussian, sigma 2–6 px at
    512²) or motion-blurred (line of 9–29 px) on one side: a linear ramp across a random
    direction through the body blends the sharp edge into the blurred one. The blur is
    computed at half resolution (it is smooth) and upsampled."""
    mask = np.zeros((size, size), np.uint8)
    _draw_ellipses(mask, ellipses)
    sharp = alpha_from_uint8(mask)
    half = size // 2
    small = cv2.resize(sharp, (half, half), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        blurred = cv2.GaussianBlur(small, (0, 0), half * rng.uniform(0.004, 0.012))
    else:
        length = 2 * int(half * rng.uniform(0.008, 0.025)) + 3
        blurred = cv2.filter2D(small, -1, _motion_kernel(rng, length))
    blurred = upsample(blurred, size)
    direction = rng.uniform(0, 2 * np.pi)
    u, _ = rotated_coordinates(direction, size)
    through_centre = float(ellipses[0, 0] * np.cos(direction) + ellipses[0, 1] * np.sin(direction))
    ramp = np.clip((u - through_centre) / np.float32(0.15 * size) + 0.5, 0, 1)
    return sharp + ramp * (blurred - sharp)


def _veil_alpha(rng: np.random.Generator, size: int, ellipses: np.ndarray) -> np.ndarray:
    """A soft ellipse centred on the body's outline, alpha in [0.1, 0.9] inside (smooth
    noise), computed at low resolution and upsampled."""
    cx, cy, ax, ay, angle = ellipses[int(rng.integers(len(ellipses)))]
    t = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    px, py = ax * np.cos(t), ay * np.sin(t)
    centre = [cx + c * px - s * py, cy + s * px + c * py]
    axes = size * rng.uniform(0.1, 0.2, size=2)
    veil = np.array([[*centre, *axes, rng.uniform(0, np.pi)]])
    low_size = low_resolution(size)
    mask = np.zeros((low_size, low_size), np.uint8)
    _draw_ellipses(mask, veil, low_size / size)
    soft = cv2.GaussianBlur(alpha_from_uint8(mask), (0, 0), low_size * rng.uniform(0.01, 0.02))
    level = 0.1 + 0.8 * smooth_noise(rng, low_size, int(rng.integers(3, 6)))
    return upsample(soft * level, size)


def _strand_alpha(rng: np.random.Generator, size: int, ellipses: np.ndarray,
                  fur: bool) -> np.ndarray:
    """Coverage of strands rooted on an arc of the body's outline: smooth random curves of
    12 points drawn with ``cv2.polylines`` (``LINE_AA``, thickness 1) at ``SUPERSAMPLE``×
    and reduced with ``INTER_AREA``. Hair: 0.3·size–0.7·size strands of 6–20 % of ``size``,
    mostly apart; ``fur``: 2·size–5·size shorter ones (4–12 %) that overlap near the body,
    so coverage runs from above one half near the roots to single sub-pixel strands at
    the tips."""
    count = int(size * (rng.uniform(2, 5) if fur else rng.uniform(0.3, 0.7)))
    lengths = (0.04, 0.12) if fur else (0.06, 0.2)
    points = 12
    which = rng.integers(len(ellipses), size=count)
    cx, cy, ax, ay, angle = (ellipses[which, i] for i in range(5))
    arc_centre, arc_width = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.6) * np.pi
    t = arc_centre + rng.uniform(-0.5, 0.5, size=count) * arc_width
    c, s = np.cos(angle), np.sin(angle)
    ex, ey = ax * np.cos(t), ay * np.sin(t)
    root = np.stack([cx + c * ex - s * ey, cy + s * ex + c * ey], axis=1)
    nx, ny = np.cos(t) / ax, np.sin(t) / ay  # outward normal in the ellipse frame
    heading = np.arctan2(s * nx + c * ny, c * nx - s * ny) + rng.normal(0, 0.35, size=count)
    bend = rng.normal(0, 0.08, size=(count, 1)) + rng.normal(0, 0.06, size=(count, points))
    theta = heading[:, None] + np.cumsum(bend, axis=1)
    step = size * rng.uniform(*lengths, size=(count, 1)) / points * np.ones((1, points))
    step[:, 0] = -0.02 * size  # the root starts a little inside the body
    path = root[:, None, :] + np.cumsum(
        step[..., None] * np.stack([np.cos(theta), np.sin(theta)], axis=-1), axis=1
    )
    fine = np.zeros((size * SUPERSAMPLE, size * SUPERSAMPLE), np.uint8)
    scaled = np.rint(path * (SUPERSAMPLE << _SHIFT)).astype(np.int32)
    cv2.polylines(fine, list(scaled), False, 255, 1, cv2.LINE_AA, _SHIFT)
    return alpha_from_uint8(cv2.resize(fine, (size, size), interpolation=cv2.INTER_AREA))


def synthesize(seed: int, size: int = 512, *, backgrounds: str = "natural",
               unknown_value: int = DEFAULT_UNKNOWN) -> dict:
    """One synthetic sample of ``size×size`` pixels, a pure function of ``seed`` and
    ``backgrounds`` (``"natural"``, ``"procedural"`` or a folder of photos); a seed of the
    test range (:func:`seed_split`) draws only the test photos.

    Returns ``image``, ``fg``, ``bg`` (``size×size×3`` uint8 RGB), ``alpha`` (``size×size``
    float32, multiples of 1/255 in [0, 1]), ``trimap`` (``size×size`` uint8, the evaluation
    trimap with radius ``max(1, round(10·size/512))``), ``name`` (``"synthetic_<seed>"``)
    and ``bg_source``, ``fg_source``: the photo names behind ``bg`` and the body colour
    (``"procedural"`` for a texture).
    """
    if size < _MIN_SIZE:
        raise DataError(f"size must be at least {_MIN_SIZE} pixels (data.size, or --size of "
                        f"kdkit data synth), found {size}")
    unknown_value = check_unknown_value(unknown_value)
    rng = np.random.default_rng(seed)
    colours = palette(rng)
    if backgrounds == PROCEDURAL:
        bg, body = texture(rng, size, colours), texture(rng, size, colours)
        bg_source = fg_source = PROCEDURAL
    else:
        bg, body, bg_source, fg_source = _photo_layers(rng, size, backgrounds, seed_split(seed),
                                                       colours)
    hair_colour = colours[rng.integers(256), 0].astype(np.float32)
    veil_colour = colours[rng.integers(256), 0].astype(np.float32)
    # dense fur in the body's colours, or hair (procedural: hair only, the original benchmark)
    fur = backgrounds != PROCEDURAL and bool(rng.random() < 0.5)
    hair_share = rng.uniform(0, 0.25) if fur else 0.5  # of hair_colour in the strands
    ellipses = _ellipses(rng, size)
    a_veil = _veil_alpha(rng, size, ellipses)
    a_body = _body_alpha(rng, size, ellipses)
    a_hair = _strand_alpha(rng, size, ellipses, fur)

    # veil, body, hair stacked bottom to top with "over": premultiplied weight of each layer
    w_body = (1 - a_hair) * a_body
    w_veil = (1 - a_hair) * (1 - a_body) * a_veil
    coverage = a_hair + w_body + w_veil
    inverse = 1 / np.maximum(coverage, np.float32(1e-12))
    w_hair_colour = hair_share * a_hair * inverse  # share of the hair's own colour in fg
    w_veil *= inverse
    planes = []
    for channel, plane in enumerate(cv2.split(body)):
        plane = plane.astype(np.float32)
        mixed = plane + w_hair_colour * (hair_colour[channel] - plane)
        mixed += w_veil * (veil_colour[channel] - plane)
        planes.append(np.rint(mixed).astype(np.uint8))
    fg = cv2.merge(planes)

    k = np.rint(np.clip(coverage, 0, 1) * 255).astype(np.uint8)
    k3 = cv2.merge([k, k, k]).astype(np.uint16)
    image = ((k3 * fg + (255 - k3) * bg + 127) // 255).astype(np.uint8)
    alpha = alpha_from_uint8(k)
    radius = max(1, round(10 * size / 512))
    return {
        "image": image,
        "fg": fg,
        "bg": bg,
        "alpha": alpha,
        "trimap": eval_trimap(alpha, radius, unknown_value),
        "name": f"synthetic_{seed}",
        "bg_source": bg_source,
        "fg_source": fg_source,
    }


class SyntheticMatting(SeededDataset):
    """``length`` synthetic samples of ``split`` (``"train"`` or ``"test"``).

    Sample ``i`` is ``synthesize(split_seed(split, i), size)``: train seeds are
    ``0..length-1``, test seeds ``10_000_000 + i``, so the splits never share a sample.
    Items are the sample dicts (see :func:`synthesize`) with only the array ``fields``
    (all when ``None``), passed through ``transform`` when one is given. ``pool=N`` draws
    them from ``N`` samples made once (see :class:`kdkit.data.SeededDataset`).
    ``backgrounds``: ``"natural"``, ``"procedural"`` or a folder of photos (see
    :func:`synthesize`); a folder is checked here.
    """

    def __init__(
        self,
        split: str,
        length: int,
        size: int = 512,
        unknown_value: int = DEFAULT_UNKNOWN,
        transform: Callable[[dict], dict] | None = None,
        pool: int | None = None,
        fields: Sequence[str] | None = None,
        backgrounds: str = "natural",
    ) -> None:
        if size < _MIN_SIZE:
            raise DataError(f"size must be at least {_MIN_SIZE} pixels (data.size, or --size of "
                        f"kdkit data synth), found {size}")
        self.size, self.unknown_value = size, check_unknown_value(unknown_value)
        self.backgrounds = check_backgrounds(backgrounds, split)
        generate = partial(synthesize, size=size, backgrounds=backgrounds,
                           unknown_value=self.unknown_value)
        super().__init__(generate, split, length, transform, pool, fields)


def write_synthetic_folder(
    out_dir: str | Path, n: int, size: int, seed0: int = 0, split: str = "train",
    backgrounds: str = "natural",
) -> Path:
    """Write samples ``seed0 .. seed0+n-1`` of ``split`` as a plain matting folder.

    Layout (loadable by :class:`~tasks.matting.data.folders.ImageFolderMatting`)::

        out_dir/image/00000.png  out_dir/fg/…  out_dir/bg/…   RGB PNG
        out_dir/alpha/00000.png  alpha·255, exact (alpha is a multiple of 1/255)
        out_dir/trimap/00000.png evaluation trimap, unknown value 128
        out_dir/contact_sheet.png  the first 16 samples: image | alpha | trimap

    ``backgrounds`` as for :func:`synthesize`. Returns ``out_dir`` as a Path.
    """
    if n < 1:
        raise DataError(f"n must be at least 1, found {n}")
    check_backgrounds(backgrounds, split)
    out = Path(out_dir)
    shown = []
    for i in range(n):
        sample = synthesize(split_seed(split, seed0 + i), size, backgrounds=backgrounds)
        stem = f"{i:05d}.png"
        for key in ("image", "fg", "bg"):
            write_image(out / key / stem, sample[key])
        write_gray(out / "alpha" / stem, np.rint(sample["alpha"] * 255).astype(np.uint8))
        write_gray(out / "trimap" / stem, sample["trimap"])
        if len(shown) < 16:
            shown.append(sample)
    write_image(out / "contact_sheet.png", contact_sheet(shown, ("image", "alpha", "trimap")))
    return out
