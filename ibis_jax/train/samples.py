"""Trajectory records -> tokenized SFT samples (docs/design.md sections 2, 3, 5).

A record of T clicks + 1 terminate gives, with ``history="none"``, T+1 samples: turn t sees the
system prompt and one user message (the overlay of M_t, the original image on turn 0, and the
turn's user text) and is trained on its assistant turn. With ``history="full"`` the whole
trajectory is one multi-image conversation trained on every assistant turn at once. Both build
their messages with :func:`ibis_jax.agent.conversation.turn_messages`, the builder rollouts and
evaluation use, so training and inference see the same conversation.

Tokens come from the one conversation encoder (:func:`ibis_jax.agent.encoding.encode_conversation`,
also used by the rollout policy and the GRPO batch): system, user and the assistant header are
prompt tokens (weight 0); the assistant text and its ``<|im_end|>`` carry the step's loss weight
(0 for a deliberately wrong action, docs/design.md section 3); ``action_mask`` marks the ``<action>`` block
for the accuracy metric. Overlays are drawn on the original image, then every image is resized to
the square ``image_size``, as at inference.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from ibis_jax.agent.conversation import HISTORY_MODES, Message, turn_messages
from ibis_jax.agent.volume import VOLUME_PROMPT_NOTE
from ibis_jax.agent.encoding import encode_conversation
from ibis_jax.agent.prompts import SYSTEM_PROMPT
from ibis_jax.agent.overlay import DEFAULT_ALPHA, DEFAULT_COLOR, render_overlay
from ibis_jax.data.records import TrajectoryRecord

@dataclasses.dataclass
class SFTSample:
    """One tokenized training conversation.

    input_ids [S] int32; loss_weights [S] float32: weight of predicting token i (0 on prompt,
    user, image and padding tokens); action_mask [S] bool: token i lies in an ``<action>`` block
    of a weighted turn; images: RGB uint8 [image_size, image_size, 3] in order of appearance.
    """

    input_ids: np.ndarray
    loss_weights: np.ndarray
    action_mask: np.ndarray
    images: list[np.ndarray]
    record_id: str = ""
    step: int = -1  # the trained turn (history none); -1 = all turns (history full)


def observations(record: TrajectoryRecord, color=DEFAULT_COLOR, alpha: float = DEFAULT_ALPHA) -> list[np.ndarray]:
    """The observation before every turn: the original image, then the overlay of each step's
    mask drawn on the original (never accumulated); for a volume record, the slice on view with
    the mask's cross-section there."""
    if record.views:
        return [render_overlay(record.observation_image(t), record.observation_mask(t), color, alpha)
                for t in range(len(record.steps))]
    image = record.image()
    return [image] + [render_overlay(image, record.step_mask(t), color, alpha) for t in range(len(record.steps) - 1)]


def record_conversations(
    record: TrajectoryRecord,
    history: str = "none",
    color=DEFAULT_COLOR,
    alpha: float = DEFAULT_ALPHA,
    steps: Sequence[int] | None = None,
    system_prompt: str = SYSTEM_PROMPT,
) -> list[tuple[int, list[Message]]]:
    """(trained step, messages ending with the assistant turn(s)) for a record.

    history none: one per step in ``steps`` (default all); full: one conversation, step -1.
    Assistant messages carry the step's ``loss_weight``.
    """
    if history not in HISTORY_MODES:
        raise ValueError(f"history must be one of {HISTORY_MODES}, got {history!r} (config field `history`)")
    obs = observations(record, color, alpha)
    if record.views:  # a volume trajectory: the policy was told how slices and z work
        system_prompt = f"{system_prompt}\n\n{VOLUME_PROMPT_NOTE}"
    users = [s.user or None for s in record.steps]
    user_texts = None if any(u is None for u in users) else users
    turns = [Message("assistant", s.text, loss_weight=float(s.loss_weight)) for s in record.steps]
    last = len(record.steps) - 1
    if history == "full":
        msgs = turn_messages(last, record.query, obs, turns, history="full", user_texts=user_texts,
                             system_prompt=system_prompt)
        return [(-1, msgs + [turns[last]])]
    out = []
    for t in range(len(record.steps)) if steps is None else steps:
        msgs = turn_messages(t, record.query, obs[: t + 1], history="none", user_texts=user_texts,
                             system_prompt=system_prompt)
        out.append((t, msgs + [turns[t]]))
    return out


def record_samples(
    record: TrajectoryRecord, tokenizer: Any, *, image_size: int, patch_size: int = 14, **conversation: Any
) -> list[SFTSample]:
    """All tokenized samples of a record (see the module docstring). `conversation`: the keywords
    of `record_conversations` (history, color, alpha, steps, system_prompt)."""
    out = []
    for step, msgs in record_conversations(record, **conversation):
        enc = encode_conversation(msgs, tokenizer, image_size, patch_size=patch_size)
        out.append(SFTSample(enc.input_ids, enc.loss_weights, enc.action_mask, enc.images, record.record_id, step))
    return out
