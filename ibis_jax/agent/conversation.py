"""The conversation the policy sees before each turn, built the same way for SFT, rollouts and
evaluation.

History modes (docs/design.md section 1):

- ``none``: the released model's view. Turn t sees the system prompt and one user message: the
  current overlay (the original image on turn 0) with the first-turn query or the refinement text.
- ``full``: the paper's view. Turn t sees every earlier user message (with its own overlay) and
  every earlier assistant turn, then the current user message.

A :class:`Message` carries text and, for user turns, the observation image; assistant messages
may carry the sampler's own token ids so a rollout never decodes and re-encodes policy text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from ibis_jax.agent.prompts import SYSTEM_PROMPT, user_turn

HistoryMode = Literal["none", "full"]
HISTORY_MODES: tuple[str, ...] = ("none", "full")


@dataclasses.dataclass(frozen=True)
class Message:
    role: Literal["system", "user", "assistant"]
    text: str
    image: np.ndarray | None = None  # user turns: RGB uint8 [H, W, 3] observation
    token_ids: tuple[int, ...] | None = None  # assistant turns: ids exactly as sampled
    loss_weight: float = 1.0  # assistant turns: weight of its tokens in the SFT loss


def turn_messages(
    step_index: int,
    query: str,
    observations: Sequence[np.ndarray],
    assistant_turns: Sequence[Message] = (),
    *,
    history: HistoryMode = "none",
    user_texts: Sequence[str] | None = None,
    system_prompt: str = SYSTEM_PROMPT,
) -> list[Message]:
    """The messages in front of policy turn ``step_index``.

    Args:
      observations: the observation before each turn so far, ``observations[t]`` for turn t
        (at least ``step_index + 1`` of them; only the last is used with ``history="none"``).
      assistant_turns: the policy's turns 0 .. step_index-1 (used with ``history="full"``).
      user_texts: the user text of each turn; defaults to :func:`ibis_jax.agent.prompts.user_turn`.
    """
    if history not in HISTORY_MODES:
        raise ValueError(f"history must be one of {HISTORY_MODES}, got {history!r}")
    if len(observations) <= step_index:
        raise ValueError(f"turn {step_index} needs {step_index + 1} observations, got {len(observations)}")

    def user(t: int) -> Message:
        text = user_texts[t] if user_texts is not None else user_turn(t, query)
        return Message("user", text, image=observations[t])

    messages = [Message("system", system_prompt)]
    if history == "full":
        if len(assistant_turns) < step_index:
            raise ValueError(f"history='full' needs the {step_index} earlier assistant turns")
        for t in range(step_index):
            messages += [user(t), assistant_turns[t]]
    messages.append(user(step_index))
    return messages


def to_chat(messages: Sequence[Message]) -> list[dict]:
    """Messages in the Hugging Face chat format the Qwen2.5-VL processor renders: user images as
    ``{"type": "image", "image": array}`` parts before the text."""
    chat = []
    for m in messages:
        content: list[dict] = []
        if m.image is not None:
            content.append({"type": "image", "image": m.image})
        content.append({"type": "text", "text": m.text})
        chat.append({"role": m.role, "content": content})
    return chat
