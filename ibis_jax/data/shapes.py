"""Procedural synthetic-shapes images: the fast, weight-free test and benchmark set.

Each sample is a noisy, smoothly shaded background with a few overlapping shapes of different
intensity; one of them is the target. Shapes have soft edges and texture so that a segmenter has
to find boundaries, not just threshold a colour.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

SHAPE_KINDS = ("ellipse", "rectangle", "triangle", "blob", "ring")
# A target must keep this fraction of the image visible after occlusion, and differ from the
# distractor shapes by this many grey levels: below that no image-based method can find it.
MIN_VISIBLE_FRACTION = 0.01
MIN_CONTRAST = 30.0


@dataclasses.dataclass(frozen=True)
class ShapeSample:
    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray  # bool [H, W]
    target: str
    sample_id: str


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(0.25, 0.75, size=2) * size
    ry, rx = rng.uniform(0.08, 0.22, size=2) * size
    angle = rng.uniform(0, np.pi)
    ca, sa = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * ca + (yy - cy) * sa) / rx
    v = (-(xx - cx) * sa + (yy - cy) * ca) / ry
    if kind == "ellipse":
        return u**2 + v**2 <= 1.0
    if kind == "rectangle":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if kind == "triangle":
        return (v <= 1.0) & (v >= 2.0 * np.abs(u) - 1.0)
    if kind == "ring":
        r2 = u**2 + v**2
        return (r2 <= 1.0) & (r2 >= 0.35)
    if kind == "blob":
        theta = np.arctan2(v, u)
        radius = 1.0
        for k in range(2, 5):
            radius = radius + rng.uniform(-0.18, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        return u**2 + v**2 <= radius**2
    raise ValueError(f"unknown shape kind {kind!r}; choose one of {SHAPE_KINDS}")


def make_shape_sample(size: int, rng: np.random.Generator, index: int = 0,
                      shapes_per_image: tuple[int, int] = (2, 4), position_tint: float = 0.0) -> ShapeSample:
    """One image with ``shapes_per_image`` (min, max) shapes; the first drawn is the target, later
    ones (distractors, told apart from it by kind and intensity) may occlude it. ``(1, 1)`` gives
    the easy variant: one shape on the shaded background, a pure localisation task.

    ``position_tint`` > 0 adds colour ramps of that many grey levels that write each pixel's
    position into its colour (red - blue grows with the column, green - blue with the row) and
    leave the channel mean, hence the grey image, unchanged. Qwen2.5-VL's vision tower has no
    absolute position embedding, so a random-init model cannot see *where* a patch is
    (``bench/grounding_probe.py``); the tint makes position a property of the content, the way a
    pretrained tower has learnt it. Off by default."""
    lo, hi = shapes_per_image
    if not 1 <= lo <= hi:
        raise ValueError(f"shapes_per_image must be (min, max) with 1 <= min <= max, got {shapes_per_image}")
    yy, xx = np.mgrid[0:size, 0:size] / size
    background = 70 + 40 * (np.sin(6.0 * xx + rng.uniform(0, 6)) * np.cos(5.0 * yy))
    image = background + rng.normal(0, 6, size=(size, size))
    target_kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
    target = np.zeros((size, size), dtype=bool)
    target_intensity = rng.uniform(140, 230)
    for j in range(int(rng.integers(lo, hi + 1))):
        kind = target_kind if j == 0 else SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
        shape = _shape_mask(kind, size, rng)
        intensity = target_intensity
        while abs(intensity - target_intensity) < MIN_CONTRAST:  # distractors must be told apart
            intensity = rng.uniform(20, 230)
        texture = ndimage.gaussian_filter(rng.normal(0, 12, size=(size, size)), 2.0)
        image = np.where(shape, intensity + texture, image)
        target = shape if j == 0 else target & ~shape
    if target.sum() < MIN_VISIBLE_FRACTION * size * size:  # mostly occluded: new geometry
        return make_shape_sample(size, rng, index, shapes_per_image, position_tint)
    image = ndimage.gaussian_filter(image, 0.8) + rng.normal(0, 4, size=(size, size))
    gray = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    tint = rng.uniform(0.85, 1.0, size=3)  # drawn either way: later samples of the stream stay the same
    if position_tint:  # the ramps replace the random colour cast, which would drown them
        col, row = 2.0 * xx - 1.0, 2.0 * yy - 1.0
        rgb = gray[..., None] + position_tint * np.stack([col, row, -(col + row)], axis=-1)
    else:
        rgb = gray[..., None] * tint
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    return ShapeSample(rgb, target, target_kind, f"shapes-{index:05d}")


def synthetic_shapes(num: int, size: int = 128, seed: int = 0, shapes_per_image: tuple[int, int] = (2, 4),
                     position_tint: float = 0.0) -> list[ShapeSample]:
    """``num`` samples of ``size x size`` pixels, deterministic under ``seed``."""
    rng = np.random.default_rng(seed)
    return [make_shape_sample(size, rng, i, shapes_per_image, position_tint) for i in range(num)]
