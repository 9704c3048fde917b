"""The agent loop: a policy writes turns, the tool turns clicks into masks, until every episode ends.

Rollouts (GRPO), evaluation and the ``segment`` command all run this loop over a batch of
episodes: each round, every live episode's conversation goes to the policy in one batched call,
each reply is parsed leniently and applied (a click runs the tool), and the new overlay becomes the
next observation. Episodes are 2D images (``agent/episode.py``) or volumes (``agent/volume.py``,
which adds the slice on view to each user text and a note to the system text); the loop asks the
episode, never its class. The :class:`Policy` protocol is implemented by the oracle (``agent/oracle.py``: the
click simulator, for synthesis and upper bounds) and by the Flax model with its sampler
(``generate/policy.py``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
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


@dataclasses.dataclass
class AgentStats:
    """How one ``run_agent`` call used its rows, the sampler and the tool (pass one to fill in).

    rows: the rows of the schedule (``max_rows``); rows_busy: requests summed over the policy
    calls; rows_available: policy calls x rows per call (a cohort's rows when overlapping);
    generate_s: time inside ``policy.generate``; tool_s: time with at least one tool call in
    flight (the union of the calls' intervals); wall_s: the whole call.
    """

    rows: int = 0
    policy_calls: int = 0
    rows_busy: int = 0
    rows_available: int = 0
    generate_s: float = 0.0
    tool_s: float = 0.0
    wall_s: float = 0.0
    tool_intervals: list[tuple[float, float]] = dataclasses.field(default_factory=list, repr=False)

    @property
    def occupancy(self) -> float:
        """rows busy / rows available."""
        return self.rows_busy / max(self.rows_available, 1)

    @property
    def sampler_idle(self) -> float:
        return 1.0 - self.generate_s / self.wall_s if self.wall_s else 0.0

    @property
    def tool_idle(self) -> float:
        return 1.0 - self.tool_s / self.wall_s if self.wall_s else 0.0

    def _finish(self, wall_s: float) -> None:
        self.wall_s = wall_s
        busy, end = 0.0, float("-inf")
        for a, b in sorted(self.tool_intervals):
            if b > end:
                busy += b - max(a, end)
                end = b
        self.tool_s = busy


def episode_messages(episode: Episode, trace: EpisodeTrace, step_index: int, *, history: HistoryMode,
                     system_prompt: str) -> list[Message]:
    """The conversation in front of turn ``step_index`` of ``episode``: the one builder of what the
    policy saw, for the rollout itself and for the GRPO batch afterwards (same ids on both routes).

    User texts come from the episode (a volume adds the slice that was on view), the system text is
    ``system_prompt`` plus the episode's ``system_note``; assistant turns carry the sampled ids.
    """
    assistant = [Message("assistant", t.text, token_ids=t.token_ids) for t in trace.turns]
    system = system_prompt + ("\n\n" + episode.system_note if episode.system_note else "")
    return turn_messages(step_index, episode.query, trace.observations, assistant, history=history,
                         user_texts=[episode.user_text(k) for k in range(step_index + 1)], system_prompt=system)


def run_agent(
    policy: Policy,
    tool: SegmentationTool,
    episodes: Sequence[Episode],
    *,
    history: HistoryMode | None = None,
    system_prompt: str | None = None,
    max_rows: int | None = None,
    overlap: bool = False,
    tool_workers: int = 0,
    stats: AgentStats | None = None,
) -> list[EpisodeTrace]:
    """Runs ``episodes`` to the end with ``policy`` and ``tool``; returns one trace per episode.

    The conversation follows the policy's ``settings`` (system prompt, overlay, history: what a
    model was trained with); ``history`` and ``system_prompt`` (the system text) override them.

    Scheduling (continuous episode batching): ``max_rows`` rows (None: one per episode, the
    static batch); each round every row with a live episode sends its turn in one batched policy
    call, and a row whose episode ended takes the next waiting episode (in order) before the next
    call, so no row idles on a finished episode. Each episode's conversation depends only on its
    own turns, so greedy episodes do not depend on the schedule. overlap: split the rows into two
    cohorts that alternate, the tool answering one cohort's clicks while the policy writes the
    other's turns. tool_workers: threads for the tool calls of a round (0 or 1: one after the
    other, on this thread or the cohort's); several let a bridge server batch them, and open the
    admitted episodes in the background: a tool that encodes the image on ``open`` (the bridge's
    feature cache) then encodes while the policy writes the episode's first turn, and the
    episode's first step waits for its open.
    stats: an :class:`AgentStats` to fill in.

    The tool is opened on each episode when its row takes it (all at the start for the static
    batch) and closed when it ends (also on error). Generation time is shared out equally among
    the episodes of a batched call.
    """
    t_start = time.perf_counter()
    traces = [EpisodeTrace() for _ in episodes]
    settings = getattr(policy, "settings", HF_DEFAULTS)
    history = history or settings.history
    system_prompt = system_prompt if system_prompt is not None else settings.system_text
    reads_messages = getattr(policy, "reads_messages", True)
    rows = len(episodes) if max_rows is None else max_rows
    if rows < 1:
        if not episodes:
            return traces
        raise ValueError(f"run_agent: max_rows must be >= 1, got {max_rows}")
    stats = AgentStats() if stats is None else stats
    stats.rows = rows
    cohorts = 2 if overlap and rows > 1 else 1
    slots: list[int | None] = [None] * rows  # episode index per row
    waiting = list(range(len(episodes)))[::-1]  # pop() takes the next in order
    pending: dict[int, concurrent.futures.Future] = {}  # cohort -> its tool stage
    # The tool calls' threads, and (overlap) one thread per cohort running its tool stage; kept
    # apart, so a stage waiting on its calls never holds a thread the calls need.
    pool = concurrent.futures.ThreadPoolExecutor(tool_workers, thread_name_prefix="agent-tool") if tool_workers > 1 else None
    stages = concurrent.futures.ThreadPoolExecutor(cohorts, thread_name_prefix="agent-cohort") if cohorts > 1 else None
    opened: list[Episode] = []
    opening: dict[int, concurrent.futures.Future] = {}  # episode -> its open in flight (tool_workers > 1)
    interval_lock = threading.Lock()

    def timed(fn, *args) -> None:
        t0 = time.perf_counter()
        try:
            fn(*args)
        finally:
            with interval_lock:
                stats.tool_intervals.append((t0, time.perf_counter()))

    def admit(free: list[int]) -> None:
        """Opens the next waiting episodes on the tool (together when there are workers) into `free` rows."""
        new = [waiting.pop() for _ in free[:len(waiting)]]
        if pool is not None:
            # In the background: the policy's next call runs while the tool encodes. The pool runs
            # its tasks in order, so an open starts before any step submitted after it (a step
            # waiting on its open never holds a thread the open needs).
            for i in new:
                opening[i] = pool.submit(timed, episodes[i].open_tool, tool)
                opened.append(episodes[i])  # closed in the end (also when its open failed)
        else:
            for i in new:
                timed(episodes[i].open_tool, tool)
                opened.append(episodes[i])
        for slot, i in zip(free, new):
            slots[slot] = i

    def wait_open(i: int) -> None:
        f = opening.pop(i, None)
        if f is not None:
            f.result()

    def step(i: int, turn: PolicyTurn) -> None:
        episodes[i].step_text(turn.text, tool, loss_weight=turn.loss_weight)
        if episodes[i].done:
            tool.close(episodes[i].episode_id)

    def apply(i: int, turn: PolicyTurn) -> None:
        wait_open(i)  # not inside the step's tool interval
        timed(step, i, turn)

    def tool_stage(items: list[tuple[int, PolicyTurn]]) -> None:
        if pool is None or len(items) == 1:
            for i, turn in items:
                apply(i, turn)
            return
        for f in [pool.submit(apply, i, turn) for i, turn in items]:
            f.result()

    try:
        if max_rows is None:  # the static batch: every episode open from the start
            admit(list(range(rows)))
        cohort = 0
        while True:
            mine = [s for s in range(rows) if s % cohorts == cohort]
            if cohort in pending:
                pending.pop(cohort).result()
            for s in mine:
                if slots[s] is not None and episodes[slots[s]].done:
                    slots[s] = None
            admit([s for s in mine if slots[s] is None])
            live = [slots[s] for s in mine if slots[s] is not None and not episodes[slots[s]].done]
            if not live:
                if not pending and not waiting and all(x is None or episodes[x].done for x in slots):
                    break
                cohort = (cohort + 1) % cohorts
                continue
            requests = []
            for i in live:
                episode, trace = episodes[i], traces[i]
                if not reads_messages:
                    requests.append(TurnRequest([], episode))
                    continue
                trace.observations.append(episode.observation(settings.overlay_color, settings.overlay_alpha))
                requests.append(TurnRequest(episode_messages(episode, trace, len(episode.steps), history=history,
                                                             system_prompt=system_prompt), episode))
            start = time.perf_counter()
            turns = policy.generate(requests)
            elapsed = time.perf_counter() - start
            if len(turns) != len(live):
                raise RuntimeError(f"policy returned {len(turns)} turns for {len(live)} requests")
            stats.policy_calls += 1
            stats.rows_busy += len(live)
            stats.rows_available += len(mine)
            stats.generate_s += elapsed
            for i, turn in zip(live, turns):
                traces[i].turns.append(turn)
                traces[i].generate_seconds += elapsed / len(live)
            items = list(zip(live, turns))
            if cohorts > 1:
                pending[cohort] = stages.submit(tool_stage, items)
            else:
                tool_stage(items)
            cohort = (cohort + 1) % cohorts
    finally:
        for f in list(pending.values()) + list(opening.values()):
            try:
                f.result()
            except Exception:  # the first error is already propagating (or is raised below)
                pass
        for executor in (stages, pool):
            if executor is not None:
                executor.shutdown(wait=True)
        for episode in opened:
            if not episode.done:
                tool.close(episode.episode_id)
        stats._finish(time.perf_counter() - t_start)
    return traces
