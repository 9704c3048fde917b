"""Trajectory records -> tokenized SFT samples (SPEC sections 2, 3, 5).

A record of T clicks + 1 terminate gives, with ``history="none"``, T+1 samples: turn t sees the
system prompt and one user message (the overlay of M_t, the original image on turn 0, and the
turn's user text) and is trained on its assistant turn. With ``history="full"`` the whole
trajectory is one multi-image conversation trained on every assistant turn at once. Both build
their messages with :func:`ibis_jax.agent.conversation.turn_messages`, the builder rollouts and
evaluation use, so training and inference see the same conversation.

Tokenization follows the Qwen2.5-VL chat template piece by piece (tunix style): system, user and
the ``<|im_start|>assistant\\n`` header are prompt tokens (weight 0); the assistant text and its
``<|im_end|>`` carry the step's loss weight (0 for a deliberately wrong action, SPEC section 3).
``action_mask`` marks the tokens of the ``<action>...</action>`` block for the accuracy metric.

Images are resized to a fixed square ``image_size`` (a multiple of 28): normalised click
coordinates (x = col / width) are unchanged by a plain resize, and every image then has the same
patch grid, so batch shapes never change. Inference must use :func:`prepare_image` likewise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ibis_jax.agent.conversation import HISTORY_MODES, Message, turn_messages
from ibis_jax.agent.prompts import SYSTEM_PROMPT
from ibis_jax.agent.overlay import DEFAULT_ALPHA, DEFAULT_COLOR, render_overlay
from ibis_jax.data.records import TrajectoryRecord

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION = "<|vision_start|>{pads}<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


@dataclasses.dataclass
class Sample:
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


def prepare_image(image: np.ndarray, image_size: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> [image_size, image_size, 3] (bicubic). Square, so normalised click
    coordinates keep their meaning and the patch grid is fixed."""
    if image_size % 28:
        raise ValueError(f"image_size {image_size} must be a multiple of 28 (14 px patches, 2x2 merge)")
    if image.shape[:2] == (image_size, image_size):
        return np.asarray(image, np.uint8)
    return np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((image_size, image_size), Image.BICUBIC))


def image_tokens(image_size: int) -> int:
    """Visual tokens of one prepared image: (image_size / 28)^2."""
    return (image_size // 28) ** 2


def observations(record: TrajectoryRecord, color=DEFAULT_COLOR, alpha: float = DEFAULT_ALPHA) -> list[np.ndarray]:
    """The observation before every turn: the original image, then the overlay of each step's
    mask drawn on the original (never accumulated)."""
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


def _action_span(text: str) -> tuple[int, int]:
    start = text.find("<action>")
    end = text.find("</action>")
    return (start, end + len("</action>")) if start >= 0 and end >= 0 else (0, 0)


def tokenize_conversation(
    messages: Sequence[Message], tokenizer: Any, image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Messages -> (input_ids [S], loss_weights [S], action_mask [S], prepared images).

    Renders the Qwen2.5-VL chat template (image before text in a user turn) one piece at a time,
    so prompt and assistant tokens are known exactly; one ``<|image_pad|>`` per visual token.
    """
    ids: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    actions: list[np.ndarray] = []
    images: list[np.ndarray] = []

    def add(text: str, weight: float = 0.0, action_span: tuple[int, int] = (0, 0)) -> None:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=action_span != (0, 0))
        tok = np.asarray(enc["input_ids"], np.int32)
        ids.append(tok)
        weights.append(np.full(len(tok), weight, np.float32))
        if action_span != (0, 0):
            off = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
            actions.append((off[:, 0] < action_span[1]) & (off[:, 1] > action_span[0]))
        else:
            actions.append(np.zeros(len(tok), bool))

    pads = IMAGE_PAD * image_tokens(image_size)
    for m in messages:
        if m.role == "assistant":
            add(f"{IM_START}assistant\n")
            span = _action_span(m.text) if m.loss_weight > 0 else (0, 0)
            add(m.text + IM_END, m.loss_weight, span)
            add("\n")
            continue
        head = f"{IM_START}{m.role}\n"
        if m.image is not None:
            images.append(prepare_image(m.image, image_size))
            head += VISION.format(pads=pads)
        add(head + m.text + IM_END + "\n")
    return np.concatenate(ids), np.concatenate(weights), np.concatenate(actions), images


def record_samples(
    record: TrajectoryRecord,
    tokenizer: Any,
    *,
    image_size: int,
    history: str = "none",
    color=DEFAULT_COLOR,
    alpha: float = DEFAULT_ALPHA,
    steps: Sequence[int] | None = None,
    system_prompt: str = SYSTEM_PROMPT,
) -> list[Sample]:
    """All tokenized samples of a record (see the module docstring)."""
    out = []
    for step, msgs in record_conversations(record, history, color, alpha, steps, system_prompt):
        ids, w, act, imgs = tokenize_conversation(msgs, tokenizer, image_size)
        out.append(Sample(ids, w, act, imgs, record.record_id, step))
    return out
