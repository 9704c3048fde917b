"""The agent loop: a policy writes turns, the tool turns clicks into masks, until every episode ends.

Rollouts (GRPO), evaluation and the ``segment`` command all run this loop over a batch of
episodes: each round, every live episode's conversation goes to the policy in one batched call,
each reply is parsed leniently and applied (a click runs the tool), and the new overlay becomes the
next observation. The :class:`Policy` protocol is implemented by the oracle (the click simulator,
an upper bound) and by the Flax model with its sampler.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ibis_jax.agent.conversation import HistoryMode, Message, turn_messages
from ibis_jax.agent.episode import Episode
from ibis_jax.agent.grammar import Click, format_turn
from ibis_jax.agent.prompts import SYSTEM_PROMPT
from ibis_jax.data.clicks import ClickRule, next_click
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


@dataclasses.dataclass(frozen=True)
class TurnRequest:
    """What the policy gets for one episode: the conversation so far and the episode itself
    (an oracle reads the ground truth from it; a model policy reads only ``messages``)."""

    messages: list[Message]
    episode: Episode


class Policy(Protocol):
    def generate(self, requests: Sequence[TurnRequest]) -> list[PolicyTurn]: ...


class OraclePolicy:
    """The click simulator as a policy: clicks where ``next_click`` says, terminates when the
    target IoU is reached, the budget is spent or nothing is left to click."""

    def __init__(self, rule: ClickRule = "ritm", stop_iou: float | None = None, max_clicks: int = 20):
        self.rule, self.stop_iou, self.max_clicks = rule, stop_iou, max_clicks

    def generate(self, requests: Sequence[TurnRequest]) -> list[PolicyTurn]:
        return [PolicyTurn(self._turn(r.episode), stop_reason="oracle") for r in requests]

    def _turn(self, episode: Episode) -> str:
        if episode.gt_mask is None:
            raise ValueError("the oracle policy needs episodes with a ground-truth mask")
        clicks = episode.clicks
        done = (self.stop_iou is not None and episode.ious[-1] >= self.stop_iou) or len(clicks) >= self.max_clicks
        clicked = np.zeros(episode.gt_mask.shape, dtype=bool)
        for c in clicks:
            col, row = c.pixel(episode.width, episode.height)
            clicked[row, col] = True
        sim = None if done else next_click(episode.gt_mask, episode.current_mask, rule=self.rule, clicked=clicked)
        if sim is None:
            from ibis_jax.agent.grammar import Terminate

            return format_turn("The mask fits the target.", Terminate(), "The target is segmented.")
        click = Click.from_pixel(sim.row, sim.col, episode.height, episode.width, sim.positive)
        return format_turn("Oracle click on the largest error region.", click)


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
    history: HistoryMode = "none",
    system_prompt: str | None = None,
) -> list[EpisodeTrace]:
    """Runs ``episodes`` to the end with ``policy`` and ``tool``; returns one trace per episode.

    system_prompt: the conversation's system text; None takes the policy's ``system_prompt``
    attribute (a model policy knows what it was trained with), else the full agent prompt.

    The tool is opened on each episode before its first turn and closed when it ends (also on
    error). Generation time is shared out equally among the episodes of a batched call.
    """
    traces = [EpisodeTrace() for _ in episodes]
    if system_prompt is None:
        system_prompt = getattr(policy, "system_prompt", SYSTEM_PROMPT)
    opened: list[Episode] = []
    try:
        for episode in episodes:
            tool.open(episode.episode_id, episode.image)
            opened.append(episode)
        while live := [i for i, e in enumerate(episodes) if not e.done]:
            requests = []
            for i in live:
                episode, trace = episodes[i], traces[i]
                trace.observations.append(episode.observation())
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
                episodes[i].step_text(turn.text, tool)
                if episodes[i].done:
                    tool.close(episodes[i].episode_id)
    finally:
        for episode in opened:
            if not episode.done:
                tool.close(episode.episode_id)
    return traces
