"""Drawing observations and pictures.

``render_overlay`` makes the policy's observation: the current mask blended over the *original*
image (never over an earlier overlay). ``draw_clicks`` adds click markers for human-facing
pictures only; the policy never sees markers.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from ibis_jax.agent.grammar import Click

DEFAULT_COLOR = (0, 255, 0)
DEFAULT_ALPHA = 0.5
POSITIVE_MARKER = (0, 120, 255)
NEGATIVE_MARKER = (255, 40, 40)


def render_overlay(
    image: np.ndarray,
    mask: np.ndarray | None,
    color: tuple[int, int, int] = DEFAULT_COLOR,
    alpha: float = DEFAULT_ALPHA,
) -> np.ndarray:
    """Blends ``color`` with weight ``alpha`` over ``image`` (RGB uint8 [H, W, 3]) where ``mask``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay alpha must be in [0, 1], got {alpha}")
    out = np.array(image, dtype=np.uint8, copy=True)
    if mask is None or not np.any(mask):
        return out
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != out.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {out.shape[:2]}")
    blended = out[mask].astype(np.float32) * (1.0 - alpha) + np.float32(alpha) * np.asarray(color, np.float32)
    out[mask] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def draw_clicks(image: np.ndarray, clicks: Sequence[Click], radius: int | None = None) -> np.ndarray:
    """Returns a copy of ``image`` with numbered click markers (blue positive, red negative)."""
    out = np.array(image, dtype=np.uint8, copy=True)
    height, width = out.shape[:2]
    radius = radius or max(2, round(min(height, width) / 64))
    for number, click in enumerate(clicks, start=1):
        col, row = click.pixel(width, height)
        color = POSITIVE_MARKER if click.positive else NEGATIVE_MARKER
        cv2.circle(out, (col, row), radius + 1, (255, 255, 255), -1, lineType=cv2.LINE_AA)
        cv2.circle(out, (col, row), radius, color, -1, lineType=cv2.LINE_AA)
        if min(height, width) >= 128:
            cv2.putText(out, str(number), (col + radius + 2, row - radius), cv2.FONT_HERSHEY_SIMPLEX,
                        max(0.3, radius / 8), (255, 255, 255), 1, cv2.LINE_AA)
    return out
