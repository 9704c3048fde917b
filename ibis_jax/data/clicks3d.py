"""Click simulation on volumes: the RITM rule on 3D error maps, and its per-slice variant.

Volumes are ``bool [D, H, W]`` in *view order* (slice, row, col; see ``ibis_jax.data.volumes``),
with voxel ``spacing`` ``(sd, sh, sw)`` in millimetres.

- :func:`next_click_3d`: the RITM rule (SPEC section 3) in 3D. Both error maps are padded by one
  voxel so the volume border counts as boundary, an exact Euclidean distance transform is taken
  *in millimetres* (``sampling=spacing``, so a thick-slice axis is not mistaken for depth),
  clicked voxels are zeroed, positive iff the largest FN distance is strictly greater than the
  largest FP distance, first arg-max in C order (slice, row, col).
- :func:`next_click_on_slice`: the same rule restricted to one slice ``index`` (2D distance
  transform with the in-plane spacing ``(sh, sw)``), for a clicker that can only click where it
  looks.

Both return ``None`` when nothing is left to click.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ibis_jax.data.clicks import error_maps


@dataclasses.dataclass(frozen=True)
class SimulatedClick3D:
    """A simulated click in voxel coordinates (view order)."""

    slice: int
    row: int
    col: int
    positive: bool


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be {ndim} positive finite numbers, got {spacing!r}")
    return values


def border_distances(region: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Euclidean distance (mm) of each ``region`` voxel to the nearest non-region voxel, counting
    the outside of the array as non-region (one voxel of background padding)."""
    region = np.asarray(region, dtype=bool)
    sampling = _spacing(spacing, region.ndim)
    padded = np.pad(region, 1, mode="constant", constant_values=False)
    dist = ndimage.distance_transform_edt(padded, sampling=sampling)
    return dist[(slice(1, -1),) * region.ndim]


def _ritm_pick(fn: np.ndarray, fp: np.ndarray, spacing, clicked: np.ndarray | None):
    fn_dist, fp_dist = border_distances(fn, spacing), border_distances(fp, spacing)
    if clicked is not None:
        clicked = np.asarray(clicked, dtype=bool)
        if clicked.shape != fn.shape:
            raise ValueError(f"clicked map shape {clicked.shape} differs from {fn.shape}")
        fn_dist = np.where(clicked, 0.0, fn_dist)
        fp_dist = np.where(clicked, 0.0, fp_dist)
    positive = fn_dist.max(initial=0.0) > fp_dist.max(initial=0.0)
    dist = fn_dist if positive else fp_dist
    if dist.max(initial=0.0) <= 0:
        return None
    return np.unravel_index(int(np.argmax(dist)), dist.shape), bool(positive)


def next_click_3d(gt: np.ndarray, pred: np.ndarray, *, spacing: Sequence[float] | None = None,
                  clicked: np.ndarray | None = None) -> SimulatedClick3D | None:
    """The next RITM click on the whole volume (``bool [D, H, W]`` each)."""
    gt = np.asarray(gt, dtype=bool)
    if gt.ndim != 3:
        raise ValueError(f"next_click_3d expects volumes [D, H, W], got shape {gt.shape}")
    fn, fp = error_maps(gt, pred)
    picked = _ritm_pick(fn, fp, spacing, clicked)
    if picked is None:
        return None
    (k, r, c), positive = picked
    return SimulatedClick3D(int(k), int(r), int(c), positive)


def next_click_on_slice(gt: np.ndarray, pred: np.ndarray, index: int, *,
                        spacing: Sequence[float] | None = None,
                        clicked: np.ndarray | None = None) -> SimulatedClick3D | None:
    """The next RITM click restricted to slice ``index`` (2D rule, in-plane spacing in mm)."""
    gt = np.asarray(gt, dtype=bool)
    if gt.ndim != 3:
        raise ValueError(f"next_click_on_slice expects volumes [D, H, W], got shape {gt.shape}")
    if not 0 <= index < gt.shape[0]:
        raise ValueError(f"slice {index} out of range for {gt.shape[0]} slices")
    fn, fp = error_maps(gt, pred)
    plane_spacing = None if spacing is None else _spacing(spacing, 3)[1:]
    picked = _ritm_pick(fn[index], fp[index], plane_spacing, None if clicked is None else np.asarray(clicked)[index])
    if picked is None:
        return None
    (r, c), positive = picked
    return SimulatedClick3D(int(index), int(r), int(c), positive)
