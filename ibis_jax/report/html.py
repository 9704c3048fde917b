"""A self-contained HTML report of one episode (every image base64-embedded, no external files).

The page shows the query, the final result, an animated GIF of the episode, the ground truth when
known, and one card per step: the overlay after the step with all clicks so far marked (the new
one ringed), the action, the reasoning, and the IoU when a ground truth is known.
"""

from __future__ import annotations

import base64
import html
from typing import Any

import cv2
import numpy as np

from ibis_jax.agent.overlay import render_overlay
from ibis_jax.data.records import TrajectoryRecord
from ibis_jax.report.pictures import GT_COLOR, episode_gif, fit_within, initial_mask, png_bytes, step_frame

_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 22px; margin-bottom: 4px; }
.facts td { padding: 2px 12px 2px 0; }
.row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px; width: 300px; }
.card h3 { margin: 0 0 6px 0; font-size: 16px; }
.card img, .hero img { width: 280px; image-rendering: pixelated; border: 1px solid #ccc; }
.action { font-family: monospace; background: #eef; padding: 2px 4px; }
.reasoning { white-space: pre-wrap; font-size: 13px; }
.iou { font-weight: bold; }
"""


MAX_PICTURE_SIDE = 1024  # report pictures are for the eye: larger inputs are shown scaled down


def _picture(frame: np.ndarray) -> str:
    """A PNG data URI of ``frame``, scaled down (area average) to at most MAX_PICTURE_SIDE a side."""
    small = fit_within(frame, MAX_PICTURE_SIDE, MAX_PICTURE_SIDE, nearest=False)
    return _data_uri(png_bytes(small), "image/png")


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _ring(frame: np.ndarray, record: TrajectoryRecord, index: int) -> np.ndarray:
    """Rings the click of step ``index`` so the newest click stands out."""
    step = record.steps[index]
    if step.kind != "click":
        return frame
    radius = max(4, round(min(record.height, record.width) / 24))
    out = frame.copy()
    cv2.circle(out, (int(step.col), int(step.row)), radius, (255, 255, 0), max(1, radius // 4), lineType=cv2.LINE_AA)
    return out


def episode_html(record: TrajectoryRecord, *, title: str = "IBIS agent episode",
                 facts: dict[str, Any] | None = None) -> str:
    """The report page of one episode as an HTML string (self-contained)."""
    image = record.image()
    esc = html.escape
    rows = {"query": record.query, "target": record.target, "modality": record.modality,
            "steps": f"{record.num_clicks} clicks, {len(record.steps)} turns", "ended by": record.end_reason}
    if record.final_iou is not None:
        rows["final IoU / Dice"] = f"{record.final_iou:.4f} / {record.final_dice:.4f}"
    if record.answer:
        rows["answer"] = record.answer
    rows.update({k: str(v) for k, v in (facts or {}).items()})
    fact_rows = "".join(f"<tr><td><b>{esc(k)}</b></td><td>{esc(str(v))}</td></tr>" for k, v in rows.items() if v)

    hero = [f'<div class="card"><h3>Episode</h3><img alt="episode animation" '
            f'src="{_data_uri(episode_gif(record), "image/gif")}"></div>']
    gt = record.gt()
    if gt is not None:
        picture = _picture(render_overlay(image, gt, GT_COLOR, 0.45))
        hero.append(f'<div class="card"><h3>Ground truth</h3><img alt="ground truth" src="{picture}"></div>')
    if initial_mask(record).any():
        picture = _picture(step_frame(record, -1, image))
        hero.append(f'<div class="card"><h3>Starting mask</h3><img alt="starting mask" src="{picture}"></div>')

    cards = []
    for step in record.steps:
        frame = _ring(step_frame(record, step.index, image), record, step.index)
        iou = "" if step.iou is None else f'<div class="iou">IoU {step.iou:.4f}</div>'
        answer = f"<div><b>Answer:</b> {esc(step.answer)}</div>" if step.answer else ""
        cards.append(
            f'<div class="card step" id="step-{step.index + 1}"><h3>Step {step.index + 1}</h3>'
            f'<img alt="overlay after step {step.index + 1}" src="{_picture(frame)}">'
            f'<div><span class="action">{esc(step.action or "(unparseable turn)")}</span></div>{iou}'
            f'<div class="reasoning">{esc(step.reasoning)}</div>{answer}</div>'
        )
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
        f"<style>{_STYLE}</style></head><body>\n<h1>{esc(title)}</h1>\n"
        f'<table class="facts">{fact_rows}</table>\n<div class="row">{"".join(hero)}</div>\n'
        f'<h2>Steps</h2>\n<div class="row">{"".join(cards)}</div>\n</body></html>\n'
    )
