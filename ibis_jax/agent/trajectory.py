"""A finished episode as a trajectory record (the one record shape that synthesis, evaluation
and rollouts write, ``ibis_jax.data.records``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ibis_jax.agent.episode import Episode, Step
from ibis_jax.agent.grammar import Click, format_action
from ibis_jax.data.records import StepRecord, TrajectoryRecord, encode_png
from ibis_jax.data.rle import encode_rle
from ibis_jax.metrics import dice


def step_record_from_episode_step(step: Step, *, user: str, tag: str, width: int, height: int) -> StepRecord:
    """Converts an ``ibis_jax.agent.episode.Step`` into a :class:`StepRecord`."""

    action = step.action
    common = dict(
        index=step.index, mask=encode_rle(step.mask), user=user, reasoning=step.reasoning,
        action=format_action(action) if action is not None else "", text=step.text,
        loss_weight=float(step.loss_weight), iou=None if step.iou is None else float(step.iou),
        score=None if step.score is None else float(step.score), answer=step.answer, tag=tag,
    )
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
