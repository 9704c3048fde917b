"""The weight-free classical tool: random-walker segmentation seeded by the clicks.

It lets the whole system (synthesis, SFT, GRPO, evaluation) run with no model weights. Each call
solves Grady's random walker (a direct sparse solve, :func:`random_walk`) on a downscaled copy of
the image:

- positive clicks seed the object and negative clicks the background, each as a small disk;
- the image border seeds the background too, except where the previous mask or a positive click
  touches it (objects cut by the border stay reachable);
- seeds are disks that stay clear of strong image edges (see ``_seed_region``);
- optionally (``prior_weight > 0``, the ``TISSUE`` preset) Grady's prior term pulls each pixel
  toward a colour model learnt from the seeds, for targets defined by appearance, not boundary.

The foreground probability map is returned as ``logits`` and comes back as ``prev_logits``.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import spsolve

from ibis_jax.tools.protocol import SegmentResult, ToolError, validate_image, validate_prompt


@dataclasses.dataclass(frozen=True)
class ClassicalToolConfig:
    work_size: int = 160  # longest side of the working image (speed vs detail)
    beta: float = 10.0  # edge sensitivity, in units of the image's mean squared neighbour difference
    prior_weight: float = 0.0  # pull toward the seeds' colour model (0: pure random walker)
    seed_radius: float = 0.03  # click disk radius, fraction of the working image's longest side
    border_seeds: bool = True


TISSUE = dataclasses.replace(ClassicalToolConfig(), prior_weight=0.001)
"""For tissue-class targets with no enclosing edge (white/grey matter, all nuclei of a tile): the
seeds' colour model pulls every pixel, so one click claims the tissue everywhere. It hurts
objects whose colour the background shares (see the README's numbers)."""


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
        regions: dict[int, list[np.ndarray]] = {1: [], 2: []}
        for (x, y), label in zip(points, labels):
            col, row = min(w - 1, int((x + 0.5) * sx)), min(h - 1, int((y + 0.5) * sy))
            region = self._seed_region(lab, edge_room, row, col, radius)
            regions[1 if label == 1 else 2].append(region)
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
            regions[2].append(border & ~keep_open)
        seeds[neg] = 2
        seeds[pos] = 1  # the latest intent wins where disks overlap
        if not (seeds == 1).any():
            return np.zeros((h, w), dtype=np.float32)
        if not (seeds == 2).any():
            return np.ones((h, w), dtype=np.float32)
        prior = self._appearance_prior(lab, regions[1], regions[2]) if cfg.prior_weight > 0 else None
        return random_walk(lab, seeds, beta=cfg.beta, prior=prior, prior_weight=cfg.prior_weight)

    def _appearance_prior(self, lab: np.ndarray, positive: list[np.ndarray], negative: list[np.ndarray]) -> np.ndarray:
        """P(object | colour) from the seeds' colour histograms (Lab, 16 bins a channel, smoothed).

        Every seed region (each click, and the border) is one vote of equal weight, so a one-pixel
        negative click counts as much as the whole border. Colours no seed has shown lean to the
        background (half the background model is uniform). This is what lets a click on white
        matter claim white matter everywhere, where the walker alone floods any region that has
        no edge between it and the click.
        """
        bins = np.clip((lab * 16).astype(np.int32), 0, 15)
        index = (bins[..., 0] * 16 + bins[..., 1]) * 16 + bins[..., 2]

        def model(regions: list[np.ndarray]) -> np.ndarray:
            total = np.zeros(16**3)
            for region in regions:
                hist = np.bincount(index[region], minlength=16**3).astype(np.float64)
                total += hist / max(hist.sum(), 1.0)
            hist = ndimage.gaussian_filter(total.reshape(16, 16, 16), 0.7).ravel()
            return hist / max(hist.sum(), 1e-12)

        fg = model(positive)[index]
        bg = (0.5 * model(negative) + 0.5 / 16**3)[index]
        return fg / (fg + bg)


def random_walk(features: np.ndarray, seeds: np.ndarray, *, beta: float, prior: np.ndarray | None = None,
                prior_weight: float = 0.0) -> np.ndarray:
    """Grady's random walker (with his optional prior term), solved directly.

    ``features``: ``float [h, w, c]``; ``seeds``: ``int [h, w]``, 1 object, 2 background, 0 free;
    ``prior``: ``float [h, w]`` P(object) per pixel, pulled toward with ``prior_weight``.
    Edge weights are ``exp(-beta * d^2 / mean(d^2))`` over 4-neighbours, so ``beta`` does not
    depend on the image's contrast. Returns P(object) ``float32 [h, w]``.
    """
    h, w = seeds.shape
    n = h * w
    ids = np.arange(n).reshape(h, w)
    diffs = [(ids[:, :-1], ids[:, 1:], features[:, :-1] - features[:, 1:]),
             (ids[:-1, :], ids[1:, :], features[:-1, :] - features[1:, :])]
    d2 = [np.square(d).sum(-1).ravel() for _, _, d in diffs]
    scale = max(np.mean(np.concatenate(d2)), 1e-12)
    rows = np.concatenate([a.ravel() for a, _, _ in diffs])
    cols = np.concatenate([b.ravel() for _, b, _ in diffs])
    weights = np.exp(-beta * np.concatenate(d2) / scale) + 1e-6
    adjacency = sparse.coo_matrix((weights, (rows, cols)), shape=(n, n)).tocsr()
    adjacency = adjacency + adjacency.T
    laplacian = sparse.diags(np.asarray(adjacency.sum(axis=1)).ravel()) - adjacency
    flat = seeds.ravel()
    marked = flat > 0
    free = ~marked
    x_marked = (flat[marked] == 1).astype(np.float64)
    lap = laplacian.tocsr()
    system = lap[free][:, free]
    rhs = -lap[free][:, marked] @ x_marked
    if prior is not None and prior_weight > 0:
        system = system + prior_weight * sparse.eye(int(free.sum()), format="csr")
        rhs = rhs + prior_weight * prior.ravel()[free]
    out = np.zeros(n)
    out[marked] = x_marked
    out[free] = spsolve(system.tocsc(), rhs)
    return np.clip(out, 0.0, 1.0).reshape(h, w).astype(np.float32)

