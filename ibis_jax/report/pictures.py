"""Pictures of one trajectory record, shared by synthesis examples, evaluation and ``segment``.

Everything here reads a :class:`~ibis_jax.data.records.TrajectoryRecord` (the project's episode
seam), so synthesized, evaluated and rolled-out episodes are drawn the same way. Images are RGB
``uint8 [H, W, 3]``.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from ibis_jax.agent.grammar import Click
from ibis_jax.agent.overlay import draw_clicks, render_overlay
from ibis_jax.data.records import StepRecord, TrajectoryRecord
from ibis_jax.data.rle import decode_rle

GT_COLOR = (255, 200, 0)


def initial_mask(record: TrajectoryRecord) -> np.ndarray:
    """M_0: the user's starting mask (``meta["initial_mask"]``, an RLE) or an empty one."""
    rle = record.meta.get("initial_mask")
    return decode_rle(rle) if rle else np.zeros((record.height, record.width), dtype=bool)


def step_clicks(record: TrajectoryRecord, upto: int) -> list[Click]:
    """The clicks of steps ``0 .. upto`` (inclusive), oldest first (for a volume record, those on
    the slice the mask after step ``upto`` is shown on)."""
    on = record.views[upto + 1]["slice"] if record.views else None
    return [Click(s.x, s.y, bool(s.positive)) for s in record.steps[: upto + 1]
            if s.kind == "click" and (on is None or s.slice == on)]


def step_label(step: StepRecord) -> str:
    iou = "" if step.iou is None else f" IoU {step.iou:.2f}"
    return f"t={step.index + 1}{iou}" + (" (wrong)" if step.tag == "wrong" else "")


def step_frame(record: TrajectoryRecord, index: int, image: np.ndarray | None = None) -> np.ndarray:
    """The overlay after step ``index`` with the clicks so far marked; ``-1`` is M_0."""
    image = record.step_image(index) if record.views else record.image() if image is None else image
    mask = initial_mask(record) if index < 0 else decode_rle(record.steps[index].mask)
    clicks = step_clicks(record, index) if index >= 0 else []
    return draw_clicks(render_overlay(image, mask), clicks)


MAX_PANEL_ASPECT = 4.0  # a panel is at most this many times as wide as it is tall
MIN_PANEL_WIDTH = 64  # and at least this wide, so a caption fits beside a tall, thin image


def fit_within(image: np.ndarray, max_height: int, max_width: int, *, nearest: bool = True) -> np.ndarray:
    """``image`` scaled down (never up) to fit ``max_height x max_width``, aspect kept, each side
    at least 1 px; returned unchanged when it already fits."""
    height, width = image.shape[:2]
    scale = min(1.0, max_height / height, max_width / width)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def labelled_panel(panel: np.ndarray, label: str, panel_height: int, max_width: int | None = None) -> np.ndarray:
    """``panel`` scaled (nearest) to ``panel_height`` under an 18-px white caption strip.

    Any aspect ratio gives a bounded panel: an image wider than ``max_width`` (default
    ``MAX_PANEL_ASPECT * panel_height``) is scaled to that width instead and centred on a black
    ``panel_height`` canvas; a very tall, thin one is centred on one ``MIN_PANEL_WIDTH`` wide. (A
    2 x 5000 px image scaled to a 256-px height alone would be 640,000 px wide.)"""
    max_width = max_width or round(MAX_PANEL_ASPECT * panel_height)
    height, width = panel.shape[:2]
    scale = min(panel_height / height, max_width / width)
    size = (min(max_width, max(1, round(width * scale))), min(panel_height, max(1, round(height * scale))))
    panel = cv2.resize(panel, size, interpolation=cv2.INTER_NEAREST)
    canvas_width = max(size[0], min(MIN_PANEL_WIDTH, max_width))
    if (size[1], size[0]) != (panel_height, canvas_width):
        canvas = np.zeros((panel_height, canvas_width, 3), dtype=np.uint8)
        top, left = (panel_height - size[1]) // 2, (canvas_width - size[0]) // 2
        canvas[top:top + size[1], left:left + size[0]] = panel
        panel = canvas
    header = np.full((18, panel.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(header, label, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([header, panel], axis=0)


def trajectory_picture(record: TrajectoryRecord, max_panels: int = 6, panel_height: int = 192) -> np.ndarray:
    """A strip of panels: ground truth, then the overlay after selected clicks with the clicks so
    far marked (blue positive, red negative); RGB ``uint8 [panel_height + 18, W_total, 3]``."""
    image = record.image()
    gt = record.gt()
    panels = []
    if gt is not None:
        panels.append((render_overlay(image, gt, GT_COLOR, 0.45), "ground truth"))
    click_steps = [s for s in record.steps if s.kind == "click"]
    chosen = click_steps
    if len(click_steps) > max_panels - 1:
        picks = np.linspace(0, len(click_steps) - 1, max_panels - 1).round().astype(int)
        chosen = [click_steps[i] for i in sorted(set(picks.tolist()))]
    for step in chosen:
        panels.append((step_frame(record, step.index, image), step_label(step)))
    out = []
    for panel, label in panels:
        out.append(labelled_panel(panel, label, panel_height))
        out.append(np.full((panel_height + 18, 4, 3), 255, dtype=np.uint8))
    return np.concatenate(out[:-1], axis=1) if out else image


def episode_gif(record: TrajectoryRecord, panel_height: int = 256, frame_ms: int = 700) -> bytes:
    """An animated GIF of the episode: M_0, then the overlay after every step (clicks marked);
    the last frame holds three times as long. Returns the GIF bytes."""
    image = record.image()
    frames = [labelled_panel(step_frame(record, -1, image), "start", panel_height)]
    for step in record.steps:
        label = step_label(step) if step.kind == "click" else f"t={step.index + 1} {step.kind}"
        frames.append(labelled_panel(step_frame(record, step.index, image), label, panel_height))
    pictures = [Image.fromarray(f) for f in frames]
    durations = [frame_ms] * (len(pictures) - 1) + [frame_ms * 3]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return buffer.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
