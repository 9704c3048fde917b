"""The one interface every segmentation tool implements.

The agent loop, trajectory synthesis, rollouts and evaluation talk to a tool only through this
protocol, so an in-process backend (the classical tool, MedSAM2 in the same process) and the
remote bridge client are interchangeable.

Conventions (docs/design.md section 1):
- ``image``: RGB ``uint8`` ``[height, width, 3]``. Windowing of CT/MR happens upstream.
- ``points``: ``float32 [num_clicks, 2]`` in *pixel* coordinates ``(x=column, y=row)``, all clicks
  of the episode so far, oldest first.
- ``labels``: ``int32 [num_clicks]``, 1 = positive (add region), 0 = negative (remove region).
- ``prev_logits``: whatever ``segment`` returned as ``logits`` on the previous step of the same
  episode (``None`` on the first step). It is opaque to the caller: MedSAM2 returns its
  low-resolution mask logits, the classical tool its probability map, and a remote tool may keep
  them server side and return ``None``.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import numpy as np


class ToolError(RuntimeError):
    """A tool could not produce a mask (bad request, dead server, unknown episode...)."""


@dataclasses.dataclass(frozen=True)
class SegmentResult:
    """One tool answer.

    Attributes:
      mask: ``bool [height, width]`` at the image's resolution.
      logits: opaque per-episode state to pass back as ``prev_logits`` next step, or ``None``.
      score: the tool's confidence in ``mask`` (predicted IoU for SAM-family tools).
    """

    mask: np.ndarray
    logits: np.ndarray | None
    score: float


@runtime_checkable
class SegmentationTool(Protocol):
    """A promptable segmenter driven by clicks.

    ``open`` does the expensive per-image work once (an image encoder, a feature pyramid);
    ``segment`` is called once per click step with *all* clicks so far; ``close`` frees the cache.
    Episode ids are chosen by the caller and must be unique among open episodes.
    """

    def open(self, episode_id: str, image: np.ndarray) -> None: ...

    def segment(
        self,
        episode_id: str,
        points: np.ndarray,
        labels: np.ndarray,
        prev_logits: np.ndarray | None,
    ) -> SegmentResult: ...

    def close(self, episode_id: str) -> None: ...


def validate_image(image: np.ndarray, *, where: str = "image") -> np.ndarray:
    """Checks a tool input image is RGB uint8 ``[H, W, 3]`` and returns it contiguous."""
    if not isinstance(image, np.ndarray):
        raise ToolError(f"{where}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ToolError(
            f"{where}: expected dtype uint8, got {image.dtype}; window/scale the image to 0..255 "
            "first (ibis_jax.data.windowing)"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise ToolError(
            f"{where}: expected an RGB image of shape [H, W, 3], got {image.shape}; convert "
            "grayscale with ibis_jax.data.images.to_rgb_uint8"
        )
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ToolError(f"{where}: image of shape {image.shape} is too small")
    return np.ascontiguousarray(image)


def validate_prompt(
    points: np.ndarray, labels: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Checks click prompts against the image size; returns ``float32 [N,2]`` and ``int32 [N]``."""
    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    labels = np.asarray(labels).reshape(-1)
    if points.shape[0] == 0:
        raise ToolError("segment: at least one click is required")
    if points.shape[0] != labels.shape[0]:
        raise ToolError(
            f"segment: {points.shape[0]} points but {labels.shape[0]} labels; pass one label per point"
        )
    if not np.all(np.isfinite(points)):
        raise ToolError("segment: points contain NaN or infinity")
    xs, ys = points[:, 0], points[:, 1]
    if np.any(xs < 0) or np.any(xs > width - 1) or np.any(ys < 0) or np.any(ys > height - 1):
        raise ToolError(
            f"segment: a point lies outside the {width}x{height} image; points are pixel (x=col, y=row)"
        )
    if not np.all(np.isin(labels, (0, 1))):
        raise ToolError("segment: labels must be 1 (positive) or 0 (negative)")
    return points, labels.astype(np.int32)


class tool_session:
    """Context manager: ``open`` an episode on a tool and always ``close`` it.

    >>> with tool_session(tool, episode.episode_id, episode.image):
    ...     episode.step(click, tool)
    """

    def __init__(self, tool: SegmentationTool, episode_id: str, image: np.ndarray):
        self.tool, self.episode_id, self.image = tool, episode_id, image

    def __enter__(self) -> SegmentationTool:
        self.tool.open(self.episode_id, self.image)
        return self.tool

    def __exit__(self, *exc) -> None:
        self.tool.close(self.episode_id)
