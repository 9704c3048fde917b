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
    settings = getattr(policy, "settings", HF_DEFAULTS)
    rows = len(episodes) if max_rows is None else max_rows
    if rows < 1:
        if not episodes:
            return []
        raise ValueError(f"run_agent: max_rows must be >= 1, got {max_rows}")
    run = _AgentRun(policy, tool, episodes, settings, history=history or settings.history,
                    system_prompt=system_prompt if system_prompt is not None else settings.system_text,
                    rows=rows, cohorts=2 if overlap and rows > 1 else 1, tool_workers=tool_workers,
                    stats=AgentStats() if stats is None else stats)
    return run.run(static=max_rows is None)


class _AgentRun:
    """One `run_agent` call: admission (rows take waiting episodes, the tool opens them),
    sampling (one batched policy call per round of a cohort), tool calls (each turn applied to its
    episode, on worker threads when there are some) and bookkeeping (`AgentStats`)."""

    def __init__(self, policy: Policy, tool: SegmentationTool, episodes: Sequence[Episode], settings, *,
                 history: HistoryMode, system_prompt: str, rows: int, cohorts: int, tool_workers: int,
                 stats: AgentStats):
        self.policy, self.tool, self.episodes, self.settings = policy, tool, episodes, settings
        self.history, self.system_prompt = history, system_prompt
        self.reads_messages = getattr(policy, "reads_messages", True)
        self.rows, self.cohorts, self.stats = rows, cohorts, stats
        stats.rows = rows
        self.traces = [EpisodeTrace() for _ in episodes]
        self.slots: list[int | None] = [None] * rows  # episode index per row
        self.waiting = list(range(len(episodes)))[::-1]  # pop() takes the next in order
        self.pending: dict[int, concurrent.futures.Future] = {}  # cohort -> its tool stage
        # The tool calls' threads, and (overlap) one thread per cohort running its tool stage; kept
        # apart, so a stage waiting on its calls never holds a thread the calls need.
        self.pool = (concurrent.futures.ThreadPoolExecutor(tool_workers, thread_name_prefix="agent-tool")
                     if tool_workers > 1 else None)
        self.stages = (concurrent.futures.ThreadPoolExecutor(cohorts, thread_name_prefix="agent-cohort")
                       if cohorts > 1 else None)
        self.opened: list[Episode] = []
        self.opening: dict[int, concurrent.futures.Future] = {}  # episode -> its open in flight (workers)
        self.interval_lock = threading.Lock()

    # ------------------------------------------------------------------ the loop
    def run(self, static: bool) -> list[EpisodeTrace]:
        t_start = time.perf_counter()
        try:
            if static:  # every episode open from the start
                self.admit(list(range(self.rows)))
            cohort = 0
            while True:
                mine = [s for s in range(self.rows) if s % self.cohorts == cohort]
                live = self.refill(cohort, mine)
                if not live:
                    if self.finished():
                        break
                else:
                    items = list(zip(live, self.sample(live, mine)))
                    if self.cohorts > 1:
                        self.pending[cohort] = self.stages.submit(self.tool_stage, items)
                    else:
                        self.tool_stage(items)
                cohort = (cohort + 1) % self.cohorts
        finally:
            self.close()
            self.stats._finish(time.perf_counter() - t_start)
        return self.traces

    def finished(self) -> bool:
        return (not self.pending and not self.waiting
                and all(x is None or self.episodes[x].done for x in self.slots))

    # ------------------------------------------------------------------ admission
    def refill(self, cohort: int, mine: list[int]) -> list[int]:
        """After the cohort's last tool stage: free the rows whose episode ended, give them the
        next waiting episodes; returns the cohort's live episodes."""
        if cohort in self.pending:
            self.pending.pop(cohort).result()
        for s in mine:
            if self.slots[s] is not None and self.episodes[self.slots[s]].done:
                self.slots[s] = None
        self.admit([s for s in mine if self.slots[s] is None])
        return [self.slots[s] for s in mine if self.slots[s] is not None and not self.episodes[self.slots[s]].done]

    def admit(self, free: list[int]) -> None:
        """Opens the next waiting episodes on the tool (together when there are workers) into `free` rows."""
        new = [self.waiting.pop() for _ in free[:len(self.waiting)]]
        for i in new:
            if self.pool is not None:
                # In the background: the policy's next call runs while the tool encodes. The pool
                # runs its tasks in order, so an open starts before any step submitted after it (a
                # step waiting on its open never holds a thread the open needs).
                self.opening[i] = self.pool.submit(self.timed, self.episodes[i].open_tool, self.tool)
            else:
                self.timed(self.episodes[i].open_tool, self.tool)
            self.opened.append(self.episodes[i])  # closed in the end (also when its open failed)
        for slot, i in zip(free, new):
            self.slots[slot] = i

    def wait_open(self, i: int) -> None:
        f = self.opening.pop(i, None)
        if f is not None:
            f.result()

    # ------------------------------------------------------------------ sampling
    def sample(self, live: list[int], mine: list[int]) -> list[PolicyTurn]:
        """One batched policy call for the live episodes of a cohort (their observations drawn)."""
        requests = []
        for i in live:
            episode, trace = self.episodes[i], self.traces[i]
            if not self.reads_messages:
                requests.append(TurnRequest([], episode))
                continue
            trace.observations.append(episode.observation(self.settings.overlay_color, self.settings.overlay_alpha))
            requests.append(TurnRequest(episode_messages(episode, trace, len(episode.steps), history=self.history,
                                                         system_prompt=self.system_prompt), episode))
        start = time.perf_counter()
        turns = self.policy.generate(requests)
        elapsed = time.perf_counter() - start
        if len(turns) != len(live):
            raise RuntimeError(f"policy returned {len(turns)} turns for {len(live)} requests")
        stats = self.stats
        stats.policy_calls += 1
        stats.rows_busy += len(live)
        stats.rows_available += len(mine)
        stats.generate_s += elapsed
        for i, turn in zip(live, turns):
            self.traces[i].turns.append(turn)
            self.traces[i].generate_seconds += elapsed / len(live)
        return turns

    # ------------------------------------------------------------------ tool calls
    def timed(self, fn, *args) -> None:
        t0 = time.perf_counter()
        try:
            fn(*args)
        finally:
            with self.interval_lock:
                self.stats.tool_intervals.append((t0, time.perf_counter()))

    def step(self, i: int, turn: PolicyTurn) -> None:
        episode = self.episodes[i]
        episode.step_text(turn.text, self.tool, loss_weight=turn.loss_weight)
        if episode.done:
            self.tool.close(episode.episode_id)

    def apply(self, i: int, turn: PolicyTurn) -> None:
        self.wait_open(i)  # not inside the step's tool interval
        self.timed(self.step, i, turn)

    def tool_stage(self, items: list[tuple[int, PolicyTurn]]) -> None:
        if self.pool is None or len(items) == 1:
            for i, turn in items:
                self.apply(i, turn)
            return
        for f in [self.pool.submit(self.apply, i, turn) for i, turn in items]:
            f.result()

    # ------------------------------------------------------------------ bookkeeping
    def close(self) -> None:
        """Wait for what is in flight, stop the threads, close the episodes left open."""
        for f in list(self.pending.values()) + list(self.opening.values()):
            try:
                f.result()
            except Exception:  # the first error is already propagating (or is raised below)
                pass
        for executor in (self.stages, self.pool):
            if executor is not None:
                executor.shutdown(wait=True)
        for episode in self.opened:
            if not episode.done:
                self.tool.close(episode.episode_id)
