"""Click simulation: where a perfect annotator clicks next, given the ground truth and a mask.

Two rules (SPEC section 3):

- ``ritm``: the evaluation standard of RITM / SAM / SAM2. Both error maps are padded by one pixel
  so the image border counts as boundary, an exact Euclidean distance transform is taken, pixels
  already clicked are zeroed, and the click goes into the false-negative region iff its largest
  distance is strictly greater than the false-positive one (a tie clicks negative). The first
  arg-max in row-major order is taken, so the first click is the deepest interior point.
- ``ibis``: the released IBISAgent trajectory generator: OpenCV ``DIST_L2`` with a 5x5 mask, no
  padding, ties positive, no memory of earlier clicks.

Both return ``None`` when there is nothing left to click (mask equals ground truth, or every
error pixel was already clicked), where RITM would click a meaningless pixel (0, 0).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import cv2
import numpy as np
from scipy import ndimage

ClickRule = Literal["ritm", "ibis"]
CLICK_RULES: tuple[str, ...] = ("ritm", "ibis")


@dataclasses.dataclass(frozen=True)
class SimulatedClick:
    """A simulated click in pixel coordinates."""

    row: int
    col: int
    positive: bool


def error_maps(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False-negative (missed target) and false-positive (wrongly covered) maps, ``bool [H, W]``."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} differs from mask shape {pred.shape}")
    return gt & ~pred, pred & ~gt


def _ritm_distances(region: np.ndarray) -> np.ndarray:
    # Padding with background makes pixels on the image border one pixel from the boundary.
    padded = np.pad(region, 1, mode="constant", constant_values=False)
    return ndimage.distance_transform_edt(padded)[1:-1, 1:-1]


def _ibis_distances(region: np.ndarray) -> np.ndarray:
    return cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 5).astype(np.float64)


def next_click(
    gt: np.ndarray,
    pred: np.ndarray,
    *,
    rule: ClickRule = "ritm",
    clicked: np.ndarray | None = None,
) -> SimulatedClick | None:
    """The next simulated click for mask ``pred`` against ground truth ``gt`` (``bool [H, W]``).

    ``clicked`` (``bool [H, W]``, pixels clicked so far) is used by the ``ritm`` rule only; the
    ``ibis`` rule, like the released generator, has no memory.
    """
    if rule not in CLICK_RULES:
        raise ValueError(f"unknown click rule {rule!r}; choose one of {CLICK_RULES}")
    fn, fp = error_maps(gt, pred)
    if rule == "ritm":
        fn_dist, fp_dist = _ritm_distances(fn), _ritm_distances(fp)
        if clicked is not None:
            clicked = np.asarray(clicked, dtype=bool)
            if clicked.shape != fn.shape:
                raise ValueError(f"clicked map shape {clicked.shape} differs from {fn.shape}")
            fn_dist = np.where(clicked, 0.0, fn_dist)
            fp_dist = np.where(clicked, 0.0, fp_dist)
        positive = fn_dist.max() > fp_dist.max()
    else:
        fn_dist, fp_dist = _ibis_distances(fn), _ibis_distances(fp)
        positive = fn_dist.max() >= fp_dist.max()
    dist = fn_dist if positive else fp_dist
    if dist.max() <= 0:
        return None
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)  # first arg-max, row-major
    return SimulatedClick(int(row), int(col), bool(positive))


# -- self-correction (SPEC section 3): a deliberately wrong click and the click that undoes it ---

def _deepest(region: np.ndarray, clicked: np.ndarray) -> tuple[int, int] | None:
    """The pixel of ``region`` farthest from its boundary (image border counts), not yet clicked."""
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    dist[clicked] = 0
    if dist.max() <= 0:
        return None
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(row), int(col)


def wrong_click(gt: np.ndarray, mask: np.ndarray, clicked: np.ndarray, rng: np.random.Generator) -> SimulatedClick | None:
    """A deliberately wrong click: positive on clear background or negative on covered target.

    Candidates keep a margin from the target boundary (3% of the image side) so the click is
    unambiguously wrong, not a boundary judgement call.
    """
    margin = max(2.0, 0.03 * max(gt.shape))
    options = []
    background = ndimage.distance_transform_edt(~gt) >= margin
    bg = background & ~mask & ~clicked
    if bg.any():
        options.append((bg, True))
    covered = ndimage.distance_transform_edt(np.pad(gt & mask, 1))[1:-1, 1:-1] >= margin
    tp = covered & ~clicked
    if tp.any():
        options.append((tp, False))
    if not options:
        return None
    region, positive = options[int(rng.integers(len(options)))]
    rows, cols = np.nonzero(region)
    pick = int(rng.integers(len(rows)))
    return SimulatedClick(int(rows[pick]), int(cols[pick]), positive)


def correction_click(
    gt: np.ndarray, before: np.ndarray, after: np.ndarray, clicked: np.ndarray
) -> tuple[SimulatedClick | None, str]:
    """The click undoing a wrong one: into the larger error the wrong click *created*.

    Returns ``(click, effect)`` with effect ``excess`` (new false positive -> negative click),
    ``missed`` (new false negative -> positive click) or ``none`` (the mask did not get worse;
    the caller falls back to the normal oracle click).
    """
    new_fp = (after & ~gt) & ~(before & ~gt)
    new_fn = (gt & ~after) & ~(gt & ~before)
    effect, region = ("excess", new_fp) if new_fp.sum() >= new_fn.sum() else ("missed", new_fn)
    if not region.any():
        return None, "none"
    pixel = _deepest(region, clicked)
    if pixel is None:
        return None, "none"
    return SimulatedClick(pixel[0], pixel[1], effect == "missed"), effect
