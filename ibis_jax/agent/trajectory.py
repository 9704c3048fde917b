"""A finished episode as a trajectory record (the one record shape that synthesis, evaluation
and rollouts write, ``ibis_jax.data.records``); a volume episode's record holds the slices on view
(see the records module)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ibis_jax.agent.episode import Episode, Step
from ibis_jax.agent.grammar import Click, SliceClick, format_action
from ibis_jax.agent.volume import VolumeEpisode
from ibis_jax.data.records import StepRecord, TrajectoryRecord, encode_png
from ibis_jax.data.rle import encode_rle
from ibis_jax.metrics import dice


def step_record_from_episode_step(step: Step, *, user: str, tag: str, width: int, height: int,
                                  mask=None, depth: int | None = None) -> StepRecord:
    """Converts an ``ibis_jax.agent.episode.Step`` into a :class:`StepRecord` (``mask``: the 2D mask
    to store, default the step's own; ``depth``: a volume's slice count, for its clicks)."""

    action = step.action
    common = dict(
        index=step.index, mask=encode_rle(step.mask if mask is None else mask), user=user, reasoning=step.reasoning,
        action=format_action(action) if action is not None else "", text=step.text,
        loss_weight=float(step.loss_weight), iou=None if step.iou is None else float(step.iou),
        score=None if step.score is None else float(step.score), answer=step.answer, tag=tag,
    )
    if isinstance(action, SliceClick):
        k, row, col = action.voxel(depth, height, width)
        return StepRecord(kind="click", x=float(action.x), y=float(action.y), z=float(action.z), slice=k, row=row,
                          col=col, positive=bool(action.positive), **common)
    if isinstance(action, Click):
        col, row = action.pixel(width, height)
        return StepRecord(kind="click", x=float(action.x), y=float(action.y), row=row, col=col,
                          positive=bool(action.positive), **common)
    return StepRecord(kind="terminate" if action is not None else "invalid", **common)


def record_from_episode(
    episode: Episode,
    *,
    record_id: str,
    target: str,
    modality: str,
    user_turns: Sequence[str] | None = None,
    tags: Sequence[str] | None = None,
    query_style: str = "",
    source: str = "",
    sample_id: str = "",
    meta: dict[str, Any] | None = None,
) -> TrajectoryRecord:
    """Builds a record from a finished ``Episode`` (synthesis, evaluation and rollouts alike)."""
    if isinstance(episode, VolumeEpisode):
        return _volume_record(episode, record_id=record_id, target=target, modality=modality, user_turns=user_turns,
                              tags=tags, query_style=query_style, source=source, sample_id=sample_id, meta=meta)
    steps = [
        step_record_from_episode_step(
            s, user=(user_turns[i] if user_turns else ""), tag=(tags[i] if tags else "policy"),
            width=episode.width, height=episode.height,
        )
        for i, s in enumerate(episode.steps)
    ]
    gt = episode.gt_mask
    final = episode.current_mask
    return TrajectoryRecord(
        record_id=record_id, image_png=encode_png(episode.image), height=episode.height, width=episode.width,
        query=episode.query, target=target, modality=modality, steps=steps,
        gt_mask=None if gt is None else encode_rle(gt), query_style=query_style, source=source,
        sample_id=sample_id or record_id,
        answer=next((s.answer for s in reversed(episode.steps) if s.answer is not None), None),
        end_reason=episode.end_reason or "", final_iou=None if gt is None else float(episode.ious[-1]),
        final_dice=None if gt is None else float(dice(final, gt)), meta=dict(meta or {}),
    )


def _volume_record(episode: VolumeEpisode, *, record_id, target, modality, user_turns, tags, query_style, source,
                   sample_id, meta) -> TrajectoryRecord:
    """A volume episode's record: the slice on view per step, each step's 3D mask cut at the slice
    the next turn views (the records module docstring)."""
    d, h, w = episode.shape
    viewed = [s.slice for s in episode.steps] + [episode.current_slice]  # before each step, and at the end
    next_view = viewed[1:]
    order = list(dict.fromkeys(viewed))  # distinct slices, first appearance first
    pngs = [encode_png(np.repeat(episode.volume[k][:, :, None], 3, axis=2)) for k in order]
    steps = [
        step_record_from_episode_step(s, user=(user_turns[i] if user_turns else ""),
                                      tag=(tags[i] if tags else "policy"), width=w, height=h,
                                      mask=s.mask[next_view[i]], depth=d)
        for i, s in enumerate(episode.steps)
    ]
    gt = episode.gt_mask
    volume = {"shape": [d, h, w], "spacing": list(episode.spacing)}
    if gt is not None:
        volume.update(final_dice=float(episode.dices[-1]), final_iou=float(episode.ious[-1]))
    return TrajectoryRecord(
        record_id=record_id, image_png=pngs[0] if pngs else encode_png(np.zeros((h, w, 3), np.uint8)),
        height=h, width=w, query=episode.query, target=target, modality=modality, steps=steps, gt_mask=None,
        query_style=query_style, source=source, sample_id=sample_id or record_id,
        answer=next((s.answer for s in reversed(episode.steps) if s.answer is not None), None),
        end_reason=episode.end_reason or "", final_iou=volume.get("final_iou"), final_dice=volume.get("final_dice"),
        meta={**(meta or {}), "volume": volume},
        views=[{"slice": int(k), "image": order.index(k)} for k in viewed], view_pngs=pngs,
    )
