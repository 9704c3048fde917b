"""The weight-free classical tool: random-walker segmentation seeded by the clicks.

It lets the whole system (synthesis, SFT, GRPO, evaluation) run with no model weights. Each call
solves Grady's random walker (scikit-image) on a downscaled copy of the image:

- positive clicks seed the object and negative clicks the background, each as a small disk;
- the image border seeds the background too, except where the previous mask or a positive click
  touches it (objects cut by the border stay reachable);
- the previous step's probability map keeps regions far from every click stable: pixels the last
  mask held confidently and that no new negative click is near are weak object seeds.

The foreground probability map is returned as ``logits`` and comes back as ``prev_logits``.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
from skimage.segmentation import random_walker

from ibis_jax.tools.protocol import SegmentResult, ToolError, validate_image, validate_prompt


@dataclasses.dataclass(frozen=True)
class ClassicalToolConfig:
    work_size: int = 160  # longest side of the working image (speed vs detail)
    beta: float = 2000.0  # random-walker edge sensitivity
    seed_radius: float = 0.03  # click disk radius, fraction of the working image's longest side
    seed_similarity: float = 0.06  # Lab distance (0..~1.7) a seed pixel may differ from the click
    border_seeds: bool = True
    keep_previous: bool = True
    keep_margin: float = 0.08  # previous-mask seeds stay this far (fraction of side) from new clicks
    tolerance: float = 1e-3


class ClassicalTool:
    """Random-walker interactive segmentation implementing ``SegmentationTool``."""

    name = "classical"

    def __init__(self, config: ClassicalToolConfig = ClassicalToolConfig()):
        self.config = config
        self._images: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # -- protocol --------------------------------------------------------------------------
    def open(self, episode_id: str, image: np.ndarray) -> None:
        image = validate_image(image, where=f"episode {episode_id} image")
        height, width = image.shape[:2]
        scale = min(1.0, self.config.work_size / max(height, width))
        size = (max(2, round(width * scale)), max(2, round(height * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale < 1.0 else image
        # Lab is closer to perceived difference than RGB; a light blur keeps noise from walls.
        lab = cv2.cvtColor(cv2.GaussianBlur(small, (3, 3), 0), cv2.COLOR_RGB2LAB).astype(np.float64) / 255.0
        self._images[episode_id] = (image, lab)

    def segment(self, episode_id: str, points: np.ndarray, labels: np.ndarray,
                prev_logits: np.ndarray | None) -> SegmentResult:
        if episode_id not in self._images:
            raise ToolError(f"unknown episode {episode_id!r}: call open() first")
        image, lab = self._images[episode_id]
        height, width = image.shape[:2]
        points, labels = validate_prompt(points, labels, height, width)
        prob = self._solve(lab, points, labels, (height, width), prev_logits)
        full = cv2.resize(prob.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        mask = full > 0.5
        inside = prob[prob > 0.5]
        score = float(np.mean(inside)) if inside.size else 0.0
        return SegmentResult(mask=mask, logits=prob.astype(np.float32), score=score)

    def close(self, episode_id: str) -> None:
        self._images.pop(episode_id, None)

    def _seed_region(self, lab: np.ndarray, row: int, col: int, radius: int) -> np.ndarray:
        """A click's seed: the disk around it, limited to pixels of the clicked pixel's colour.

        A plain disk would spill across a boundary when the click sits near one (late clicks fix
        thin boundary errors, so they always do); a single pixel seeds too weakly for the first
        click. Colour-limited disks give both.
        """
        h, w = lab.shape[:2]
        region = np.zeros((h, w), dtype=bool)
        top, bottom = max(0, row - radius), min(h, row + radius + 1)
        left, right = max(0, col - radius), min(w, col + radius + 1)
        yy, xx = np.mgrid[top:bottom, left:right]
        disk = (yy - row) ** 2 + (xx - col) ** 2 <= radius**2
        close = np.linalg.norm(lab[top:bottom, left:right] - lab[row, col], axis=-1) <= self.config.seed_similarity
        region[top:bottom, left:right] = disk & close
        region[row, col] = True
        return region

    # -- the solver --------------------------------------------------------------------------
    def _solve(self, lab: np.ndarray, points: np.ndarray, labels: np.ndarray,
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
            region = self._seed_region(lab, row, col, radius)
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
        if cfg.keep_previous and prev is not None:
            margin = max(radius, round(cfg.keep_margin * max(h, w)))
            near_new = cv2.dilate((pos | neg).astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)) > 0
            seeds[(prev > 0.9) & ~near_new] = 1
            seeds[(prev < 0.1) & ~near_new & (seeds == 0) & False] = 2
        seeds[neg] = 2
        seeds[pos] = 1  # the latest intent wins where disks overlap
        if not (seeds == 1).any():
            return np.zeros((h, w), dtype=np.float32)
        if not (seeds == 2).any():
            return np.ones((h, w), dtype=np.float32)
        prob = random_walker(lab, seeds, beta=cfg.beta, mode="cg_j", tol=cfg.tolerance,
                             channel_axis=-1, return_full_prob=True)
        return prob[0].astype(np.float32)
