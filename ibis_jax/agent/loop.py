"""The agent loop: a policy writes turns, the tool turns clicks into masks, until every episode ends.

Rollouts (GRPO), evaluation and the ``segment`` command all run this loop over a batch of
episodes: each round, every live episode's conversation goes to the policy in one batched call,
each reply is parsed leniently and applied (a click runs the tool), and the new overlay becomes the
next observation. The :class:`Policy` protocol is implemented by the oracle (``agent/oracle.py``: the
click simulator, for synthesis and upper bounds) and by the Flax model with its sampler
(``generate/policy.py``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ibis_jax.agent.conversation import HistoryMode, Message, turn_messages
from ibis_jax.agent.episode import Episode
from ibis_jax.agent.settings import HF_DEFAULTS
from ibis_jax.tools.protocol import SegmentationTool


@dataclasses.dataclass(frozen=True)
class PolicyTurn:
    """One assistant turn as the policy produced it.

    ``token_ids`` and ``logprobs`` (``float32 [len(token_ids)]``, under the sampling distribution)
    are the sampler's own; GRPO trains on exactly these ids.
    """

    text: str
    token_ids: tuple[int, ...] | None = None
    logprobs: np.ndarray | None = None
    stop_reason: str = ""
    # What a scripted policy (the synthesis oracle) knows about its turn: a label, the SFT loss
    # weight of the turn (0 for a deliberate wrong click), the user text it was drawn with.
    tag: str = ""
    loss_weight: float = 1.0
    user_text: str | None = None


@dataclasses.dataclass(frozen=True)
class TurnRequest:
    """What the policy gets for one episode: the conversation so far and the episode itself
    (an oracle reads the ground truth from it; a model policy reads only ``messages``)."""

    messages: list[Message]
    episode: Episode


class Policy(Protocol):
    """Writes the next turn of every requested episode.

    Optional attributes the loop reads: ``settings`` (``AgentSettings``: the system prompt, overlay
    and history the policy was trained with; default the Hugging Face defaults) and
    ``reads_messages`` (False for a policy that reads only the episode, such as the oracle: the
    loop then renders no observations).
    """

    def generate(self, requests: Sequence[TurnRequest]) -> list[PolicyTurn]: ...


@dataclasses.dataclass
class EpisodeTrace:
    """Per episode: the observation before each turn and the policy's turns as produced."""

    observations: list[np.ndarray] = dataclasses.field(default_factory=list)
    turns: list[PolicyTurn] = dataclasses.field(default_factory=list)
    generate_seconds: float = 0.0


def run_agent(
    policy: Policy,
    tool: SegmentationTool,
    episodes: Sequence[Episode],
    *,
    history: HistoryMode | None = None,
    system_prompt: str | None = None,
) -> list[EpisodeTrace]:
    """Runs ``episodes`` to the end with ``policy`` and ``tool``; returns one trace per episode.

    The conversation follows the policy's ``settings`` (system prompt, overlay, history: what a
    model was trained with); ``history`` and ``system_prompt`` (the system text) override them.

    The tool is opened on each episode before its first turn and closed when it ends (also on
    error). Generation time is shared out equally among the episodes of a batched call.
    """
    traces = [EpisodeTrace() for _ in episodes]
    settings = getattr(policy, "settings", HF_DEFAULTS)
    history = history or settings.history
    system_prompt = system_prompt if system_prompt is not None else settings.system_text
    reads_messages = getattr(policy, "reads_messages", True)
    opened: list[Episode] = []
    try:
        for episode in episodes:
            tool.open(episode.episode_id, episode.image)
            opened.append(episode)
        while live := [i for i, e in enumerate(episodes) if not e.done]:
            requests = []
            for i in live:
                episode, trace = episodes[i], traces[i]
                if not reads_messages:
                    requests.append(TurnRequest([], episode))
                    continue
                trace.observations.append(episode.observation(settings.overlay_color, settings.overlay_alpha))
                assistant = [Message("assistant", t.text, token_ids=t.token_ids) for t in trace.turns]
                requests.append(TurnRequest(
                    turn_messages(len(episode.steps), episode.query, trace.observations, assistant,
                                  history=history, system_prompt=system_prompt), episode))
            start = time.perf_counter()
            turns = policy.generate(requests)
            share = (time.perf_counter() - start) / len(live)
            if len(turns) != len(live):
                raise RuntimeError(f"policy returned {len(turns)} turns for {len(live)} requests")
            for i, turn in zip(live, turns):
                traces[i].turns.append(turn)
                traces[i].generate_seconds += share
                episodes[i].step_text(turn.text, tool, loss_weight=turn.loss_weight)
                if episodes[i].done:
                    tool.close(episodes[i].episode_id)
    finally:
        for episode in opened:
            if not episode.done:
                tool.close(episode.episode_id)
    return traces
