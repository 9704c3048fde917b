"""Click simulation: where a perfect annotator clicks next, given the ground truth and a mask.

Two rules (docs/design.md section 3):

- ``ritm``: the evaluation standard of RITM / SAM / SAM2. Both error maps are padded by one pixel
  so the image border counts as boundary, an exact Euclidean distance transform is taken, pixels
  already clicked are zeroed, and the click goes into the false-negative region iff its largest
  distance is strictly greater than the false-positive one (a tie clicks negative). The first
  arg-max in row-major order is taken, so the first click is the deepest interior point.
- ``ibis``: the released IBISAgent trajectory generator: OpenCV ``DIST_L2`` with a 5x5 mask, no
  padding, ties positive, no memory of earlier clicks (2D only).

The ``ritm`` rule works the same on volumes ``bool [D, H, W]`` in view order (slice, row, col;
see ``ibis_jax.data.volumes``): the distance transform is taken in millimetres with the voxel
``spacing`` ``(sd, sh, sw)``, so a thick-slice axis is not mistaken for depth.
:func:`next_click_on_slice` is its per-slice variant, for a clicker that can only click on the
slice it looks at.

All return ``None`` when there is nothing left to click (mask equals ground truth, or every
error pixel was already clicked), where RITM would click a meaningless pixel (0, 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np
from scipy import ndimage

ClickRule = Literal["ritm", "ibis"]
CLICK_RULES: tuple[str, ...] = ("ritm", "ibis")


@dataclasses.dataclass(frozen=True)
class SimulatedClick:
    """A simulated click in pixel coordinates; ``slice`` is its slice on a volume (None in 2D)."""

    row: int
    col: int
    positive: bool
    slice: int | None = None

    @property
    def position(self) -> tuple[int, ...]:
        """``(row, col)`` in 2D, ``(slice, row, col)`` on a volume: an index into the mask."""
        return (self.row, self.col) if self.slice is None else (self.slice, self.row, self.col)


def error_maps(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False-negative (missed target) and false-positive (wrongly covered) maps, ``bool [H, W]``."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} differs from mask shape {pred.shape}")
    return gt & ~pred, pred & ~gt


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be {ndim} positive finite numbers, got {spacing!r}")
    return values


def border_distances(region: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Euclidean distance (in ``spacing`` units, default pixels) of each ``region`` element to the
    nearest non-region one, counting the outside of the array as non-region (one element of
    background padding, so the image border counts as boundary)."""
    region = np.asarray(region, dtype=bool)
    padded = np.pad(region, 1, mode="constant", constant_values=False)
    dist = ndimage.distance_transform_edt(padded, sampling=_spacing(spacing, region.ndim))
    return dist[(slice(1, -1),) * region.ndim]


def _ibis_distances(region: np.ndarray) -> np.ndarray:
    return cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 5).astype(np.float64)


def next_click(
    gt: np.ndarray,
    pred: np.ndarray,
    *,
    rule: ClickRule = "ritm",
    clicked: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
) -> SimulatedClick | None:
    """The next simulated click for mask ``pred`` against ground truth ``gt`` (``bool [H, W]``, or
    ``[D, H, W]`` volumes with the ``ritm`` rule and their voxel ``spacing`` in mm).

    ``clicked`` (same shape, pixels clicked so far) is used by the ``ritm`` rule only; the
    ``ibis`` rule, like the released generator, has no memory.
    """
    if rule not in CLICK_RULES:
        raise ValueError(f"unknown click rule {rule!r}; choose one of {CLICK_RULES}")
    fn, fp = error_maps(gt, pred)
    if fn.ndim not in (2, 3) or (rule == "ibis" and fn.ndim != 2):
        raise ValueError(f"click rule {rule!r} takes {'2D masks' if rule == 'ibis' else '2D masks or 3D volumes'}, "
                         f"got shape {fn.shape}")
    if rule == "ritm":
        fn_dist, fp_dist = border_distances(fn, spacing), border_distances(fp, spacing)
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
    index = np.unravel_index(int(np.argmax(dist)), dist.shape)  # first arg-max, C order
    *k, row, col = (int(i) for i in index)
    return SimulatedClick(row, col, bool(positive), k[0] if k else None)


def next_click_on_slice(gt: np.ndarray, pred: np.ndarray, index: int, *,
                        spacing: Sequence[float] | None = None,
                        clicked: np.ndarray | None = None) -> SimulatedClick | None:
    """The next ``ritm`` click on a volume restricted to slice ``index`` (the 2D rule with the
    in-plane spacing ``(sh, sw)``)."""
    gt = np.asarray(gt, dtype=bool)
    if gt.ndim != 3:
        raise ValueError(f"next_click_on_slice expects volumes [D, H, W], got shape {gt.shape}")
    if not 0 <= index < gt.shape[0]:
        raise ValueError(f"slice {index} out of range for {gt.shape[0]} slices")
    plane_spacing = None if spacing is None else _spacing(spacing, 3)[1:]
    sim = next_click(gt[index], np.asarray(pred, dtype=bool)[index], clicked=None if clicked is None else np.asarray(clicked)[index],
                     spacing=plane_spacing)
    return None if sim is None else dataclasses.replace(sim, slice=int(index))


# -- self-correction (docs/design.md section 3): a deliberately wrong click and the click that undoes it ---

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
