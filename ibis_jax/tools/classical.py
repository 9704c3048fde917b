"""The weight-free classical tool: random-walker segmentation seeded by the clicks.

It lets the whole system (synthesis, SFT, GRPO, evaluation) run with no model weights. Each call
solves Grady's random walker (scikit-image) on a downscaled copy of the image:

- positive clicks seed the object and negative clicks the background, each as a small disk;
- the image border seeds the background too, except where the previous mask or a positive click
  touches it (objects cut by the border stay reachable);
- seeds are disks that stay clear of strong image edges (see ``_seed_region``).

The foreground probability map is returned as ``logits`` and comes back as ``prev_logits``.
"""

from __future__ import annotations

import dataclasses
import warnings

import cv2
import numpy as np
from skimage.segmentation import random_walker

from ibis_jax.tools.protocol import SegmentResult, ToolError, validate_image, validate_prompt


@dataclasses.dataclass(frozen=True)
class ClassicalToolConfig:
    work_size: int = 160  # longest side of the working image (speed vs detail)
    beta: float = 2000.0  # random-walker edge sensitivity
    seed_radius: float = 0.03  # click disk radius, fraction of the working image's longest side
    border_seeds: bool = True
    tolerance: float = 1e-3


class ClassicalTool:
    """Random-walker interactive segmentation implementing ``SegmentationTool``."""

    name = "classical"

    def __init__(self, config: ClassicalToolConfig = ClassicalToolConfig()):
        self.config = config
        self._images: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # -- protocol --------------------------------------------------------------------------
    def open(self, episode_id: str, image: np.ndarray) -> None:
        image = validate_image(image, where=f"episode {episode_id} image")
        height, width = image.shape[:2]
        scale = min(1.0, self.config.work_size / max(height, width))
        size = (max(2, round(width * scale)), max(2, round(height * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale < 1.0 else image
        # Lab is closer to perceived difference than RGB. No smoothing: a blur turns a one-pixel
        # step edge into two weaker ones and the walker's cut lands a pixel inside the object.
        lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float64) / 255.0
        self._images[episode_id] = (image, lab, self._edge_room(lab))

    def segment(self, episode_id: str, points: np.ndarray, labels: np.ndarray,
                prev_logits: np.ndarray | None) -> SegmentResult:
        if episode_id not in self._images:
            raise ToolError(f"unknown episode {episode_id!r}: call open() first")
        image, lab, edge_room = self._images[episode_id]
        height, width = image.shape[:2]
        points, labels = validate_prompt(points, labels, height, width)
        prob = self._solve(lab, edge_room, points, labels, (height, width), prev_logits)
        full = cv2.resize(prob.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        mask = full > 0.5
        inside = prob[prob > 0.5]
        score = float(np.mean(inside)) if inside.size else 0.0
        return SegmentResult(mask=mask, logits=prob.astype(np.float32), score=score)

    def close(self, episode_id: str) -> None:
        self._images.pop(episode_id, None)

    def _seed_region(self, lab: np.ndarray, edge_room: np.ndarray, row: int, col: int, radius: int) -> np.ndarray:
        """A click's seed: a disk that stays clear of image edges.

        Its radius is ``radius`` capped at half the click's distance to the nearest strong edge:
        a click in a flat interior seeds a solid disk (a strong first click), a click next to a
        boundary (late clicks fix thin boundary errors) seeds a single pixel, so seeds never spill
        across the boundary they are meant to fix.
        """
        h, w = lab.shape[:2]
        r = int(min(radius, 0.5 * edge_room[row, col]))
        region = np.zeros((h, w), dtype=bool)
        cv2.circle(region.view(np.uint8), (col, row), r, 1, -1)
        region[row, col] = True
        return region

    def _edge_room(self, lab: np.ndarray) -> np.ndarray:
        """Per pixel, the distance to the nearest strong edge (gradient above its 85th percentile)."""
        gy, gx = np.gradient(lab, axis=(0, 1))
        magnitude = np.sqrt((gx**2 + gy**2).sum(axis=-1))
        edges = magnitude > max(np.percentile(magnitude, 85), 1e-6)
        return cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, 3)

    # -- the solver --------------------------------------------------------------------------
    def _solve(self, lab: np.ndarray, edge_room: np.ndarray, points: np.ndarray, labels: np.ndarray,
               full_shape: tuple[int, int], prev: np.ndarray | None) -> np.ndarray:
        cfg = self.config
        h, w = lab.shape[:2]
        sy, sx = h / full_shape[0], w / full_shape[1]
        seeds = np.zeros((h, w), dtype=np.int32)
        radius = max(0, round(cfg.seed_radius * max(h, w)))
        pos = np.zeros((h, w), dtype=bool)
        neg = np.zeros((h, w), dtype=bool)
        for (x, y), label in zip(points, labels):
            col, row = min(w - 1, int((x + 0.5) * sx)), min(h - 1, int((y + 0.5) * sy))
            region = self._seed_region(lab, edge_room, row, col, radius)
            if label == 1:
                pos |= region
            else:
                neg |= region
        if prev is not None and prev.shape != (h, w):
            prev = None  # logits from another tool or size: ignore rather than misuse them
        if cfg.border_seeds:
            border = np.zeros((h, w), dtype=bool)
            border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
            keep_open = cv2.dilate(pos.astype(np.uint8), np.ones((2 * radius + 1,) * 2, np.uint8)) > 0
            if prev is not None:
                keep_open |= prev > 0.5
            seeds[border & ~keep_open] = 2
        seeds[neg] = 2
        seeds[pos] = 1  # the latest intent wins where disks overlap
        if not (seeds == 1).any():
            return np.zeros((h, w), dtype=np.float32)
        if not (seeds == 2).any():
            return np.ones((h, w), dtype=np.float32)
        with warnings.catch_warnings():
            # The iterative solver may overshoot [0, 1] by ~tol; we clip below, the warning is noise.
            warnings.filterwarnings("ignore", message="The probability range is outside")
            prob = random_walker(lab, seeds, beta=cfg.beta, mode="cg_j", tol=cfg.tolerance,
                                 channel_axis=-1, return_full_prob=True)
        return np.clip(prob[0], 0.0, 1.0).astype(np.float32)
