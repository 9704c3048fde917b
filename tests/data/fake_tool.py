"""A fast, deterministic stand-in tool for synthesis tests (the classical tool takes seconds).

Each positive click adds a disk, each negative click removes one, later clicks win. It
implements the ``SegmentationTool`` protocol exactly, so it also pins the synthesis code to the
protocol rather than to one tool.
"""

from __future__ import annotations

import numpy as np

from ibis_jax.tools.protocol import SegmentResult, ToolError, validate_image, validate_prompt


class DiskTool:
    name = "disk"

    def __init__(self, radius_fraction: float = 0.12):
        self.radius_fraction = radius_fraction
        self.shapes: dict[str, tuple[int, int]] = {}
        self.calls = 0

    def open(self, episode_id: str, image: np.ndarray) -> None:
        self.shapes[episode_id] = validate_image(image).shape[:2]

    def segment(self, episode_id, points, labels, prev_logits) -> SegmentResult:
        if episode_id not in self.shapes:
            raise ToolError(f"unknown episode {episode_id!r}")
        height, width = self.shapes[episode_id]
        points, labels = validate_prompt(points, labels, height, width)
        self.calls += 1
        yy, xx = np.mgrid[0:height, 0:width]
        radius = self.radius_fraction * max(height, width)
        mask = np.zeros((height, width), dtype=bool)
        for (x, y), label in zip(points, labels):
            disk = (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
            mask = (mask | disk) if label == 1 else (mask & ~disk)
        return SegmentResult(mask=mask, logits=mask.astype(np.float32), score=1.0)

    def close(self, episode_id: str) -> None:
        self.shapes.pop(episode_id, None)


class FailingTool(DiskTool):
    """Fails on every segment call (for tool-error handling tests)."""

    def segment(self, episode_id, points, labels, prev_logits) -> SegmentResult:
        raise ToolError("simulated tool failure")


def make_tool() -> DiskTool:
    return DiskTool()


def make_failing_tool() -> FailingTool:
    return FailingTool()
