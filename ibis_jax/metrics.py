"""Segmentation and interactive-segmentation metrics.

Conventions: masks are ``bool [H, W]``. An IoU *curve* is the list of IoUs after click 1, 2, ...
(index ``k - 1`` holds the IoU after ``k`` clicks). NoC follows RITM: the number of clicks to first
reach the threshold, ``max_clicks`` if never reached.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union; two empty masks agree perfectly (1.0)."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shape {pred.shape} differs from ground truth shape {gt.shape}")
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient ``2|A∩B| / (|A|+|B|)``; two empty masks give 1.0."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shape {pred.shape} differs from ground truth shape {gt.shape}")
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(pred & gt) / total


def noc(curve: Sequence[float], threshold: float, max_clicks: int = 20) -> int:
    """Clicks needed to first reach ``iou >= threshold``; ``max_clicks`` if never within it."""
    for k, value in enumerate(list(curve)[:max_clicks], start=1):
        if value >= threshold:
            return k
    return max_clicks


def mean_noc(curves: Sequence[Sequence[float]], threshold: float, max_clicks: int = 20) -> float:
    return float(np.mean([noc(c, threshold, max_clicks) for c in curves])) if curves else float("nan")


def nof(curves: Sequence[Sequence[float]], threshold: float = 0.90, max_clicks: int = 20) -> int:
    """Number of samples that never reach ``threshold`` within ``max_clicks`` clicks."""
    return sum(1 for c in curves if max(list(c)[:max_clicks], default=0.0) < threshold)


def miou_at_k(curves: Sequence[Sequence[float]], k: int) -> float:
    """Mean IoU after exactly ``k`` clicks. A curve that stopped earlier keeps its last value
    (the episode ended because nothing was left to click); an empty curve counts as 0."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    values = [(list(c)[k - 1] if len(c) >= k else (c[-1] if len(c) else 0.0)) for c in curves]
    return float(np.mean(values)) if values else float("nan")


def interactive_summary(
    curves: Sequence[Sequence[float]], max_clicks: int = 20, ks: Sequence[int] = (1, 3, 5)
) -> dict[str, float]:
    """NoC@85, NoC@90, NoF@90 and mIoU@k over a set of IoU curves, as one flat dict."""
    summary = {
        "NoC@85": mean_noc(curves, 0.85, max_clicks),
        "NoC@90": mean_noc(curves, 0.90, max_clicks),
        "NoF@90": float(nof(curves, 0.90, max_clicks)),
    }
    for k in ks:
        summary[f"mIoU@{k}"] = miou_at_k(curves, k)
    summary[f"mIoU@{max_clicks}"] = miou_at_k(curves, max_clicks)
    return summary


# -- volumes ---------------------------------------------------------------------------------------
# ``iou``, ``dice`` and the curve metrics (NoC, NoF, mIoU@k) take masks of any shape, so they are the
# 3D metrics too (a curve holds the 3D IoU after click 1, 2, ...). The surface metric needs spacing.


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the array's outside counts as outside)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    eroded = ndimage.binary_erosion(padded, structure=ndimage.generate_binary_structure(mask.ndim, 1))
    return (padded & ~eroded)[(slice(1, -1),) * mask.ndim]


def surface_dice(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalised surface Dice (Nikolov et al. 2021) at ``tolerance_mm``.

    The share of both surfaces' voxels lying within ``tolerance_mm`` of the other surface, with
    distances in millimetres from ``spacing`` (one entry per axis). Two empty masks give 1.0, one
    empty mask 0.0.
    """
    from scipy import ndimage

    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shape {pred.shape} differs from ground truth shape {gt.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must have {pred.ndim} positive entries, got {spacing}")
    if tolerance_mm < 0:
        raise ValueError(f"tolerance must be >= 0 mm, got {tolerance_mm}")
    surf_p, surf_g = surface_voxels(pred), surface_voxels(gt)
    n_p, n_g = int(surf_p.sum()), int(surf_g.sum())
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0
    to_g = ndimage.distance_transform_edt(~surf_g, sampling=spacing)
    to_p = ndimage.distance_transform_edt(~surf_p, sampling=spacing)
    close = np.count_nonzero(to_g[surf_p] <= tolerance_mm) + np.count_nonzero(to_p[surf_g] <= tolerance_mm)
    return close / (n_p + n_g)
