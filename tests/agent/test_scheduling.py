"""run_agent's schedule: continuous episode batching (a fixed number of rows, a finished episode's
row takes the next waiting one) and overlapped tool calls give the same greedy episodes as the
static batch."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ibis_jax.agent import Episode
from ibis_jax.agent.grammar import Click, Terminate, format_turn
from ibis_jax.agent.loop import AgentStats, PolicyTurn, run_agent
from ibis_jax.agent.settings import AgentSettings
from ibis_jax.data.shapes import synthetic_shapes
from ibis_jax.tools.classical import ClassicalTool

# Clicks per episode before its terminate: episodes of different lengths (turns = clicks + 1).
CLICKS = [3, 0, 4, 1, 2]


def scripted_text(episode: Episode) -> str:
    """Episode e{i} clicks CLICKS[i] times on a diagonal, then terminates."""
    i, k = int(episode.episode_id[1:]), len(episode.steps)
    if k >= CLICKS[i]:
        return format_turn("done", Terminate(), "segmented")
    return format_turn(f"click {k}", Click(0.2 + 0.15 * k, 0.25 + 0.1 * k, positive=k % 3 != 2))


class ScriptedPolicy:
    def __init__(self):
        self.batches: list[list[str]] = []

    def generate(self, requests):
        self.batches.append([r.episode.episode_id for r in requests])
        return [PolicyTurn(scripted_text(r.episode), token_ids=(len(r.episode.steps),)) for r in requests]


def make_episodes(size: int = 48, n: int = len(CLICKS)) -> list[Episode]:
    samples = synthetic_shapes(n, size=size, seed=5)
    return [Episode(s.image, f"Segment shape {i}.", s.mask, episode_id=f"e{i}") for i, s in enumerate(samples)]


class CountingTool(ClassicalTool):
    def __init__(self):
        super().__init__()
        self.max_open = 0

    def open(self, episode_id, image):
        super().open(episode_id, image)
        self.max_open = max(self.max_open, len(self._images))


def summary(episodes, traces):
    return [(e.end_reason, [s.text for s in e.steps], [s.iou for s in e.steps],
             [t.token_ids for t in tr.turns], [o.tobytes() for o in tr.observations])
            for e, tr in zip(episodes, traces)]


SCHEDULES = [dict(max_rows=2), dict(max_rows=3, tool_workers=2), dict(max_rows=4, overlap=True),
             dict(max_rows=2, overlap=True, tool_workers=2)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_continuous_batching_gives_the_static_batch_episodes(schedule):
    turns = [c + 1 for c in CLICKS]
    static_eps, static_stats = make_episodes(), AgentStats()
    static = run_agent(ScriptedPolicy(), ClassicalTool(), static_eps, stats=static_stats)
    assert [len(e.steps) for e in static_eps] == turns
    # The static batch: one call per round over the live episodes; rows of ended ones idle.
    assert static_stats.policy_calls == max(turns) and static_stats.rows_busy == sum(turns)
    assert static_stats.rows_available == len(turns) * max(turns)

    eps, stats, policy, tool = make_episodes(), AgentStats(), ScriptedPolicy(), CountingTool()
    traces = run_agent(policy, tool, eps, stats=stats, **schedule)
    assert summary(eps, traces) == summary(static_eps, static)
    rows = schedule["max_rows"]
    cohort = -(-rows // 2) if schedule.get("overlap") else rows
    assert max(len(b) for b in policy.batches) <= cohort
    assert tool.max_open <= rows and tool._images == {}  # rows bound the open episodes; all closed
    assert stats.rows_busy == sum(turns) and stats.policy_calls == len(policy.batches)
    if not schedule.get("overlap"):
        # A finished episode's row is refilled at once: every call is full until the queue runs dry.
        first_short = next((k for k, b in enumerate(policy.batches) if len(b) < rows), len(policy.batches))
        started = {e for b in policy.batches[:first_short + 1] for e in b}
        assert started == {e.episode_id for e in eps} or first_short == len(policy.batches)
        assert stats.occupancy > static_stats.occupancy


@pytest.mark.slow  # ~45 s on a loaded 2-core machine (vision/sampler compiles per batch shape)
def test_tiny_model_greedy_tokens_do_not_depend_on_the_schedule(tok_dir, tiny_cfg):
    """The model writes every turn (greedy token ids recorded), the script picks the action:
    each episode's prompts, and so its tokens, must be the same under every schedule."""
    from flax import nnx

    from ibis_jax.generate import SamplerConfig
    from ibis_jax.generate.policy import ModelPolicy
    from ibis_jax.models.qwen2_5_vl import Qwen25VL
    from ibis_jax.models.qwen2_5_vl.processor import Qwen25VLProcessor

    model = Qwen25VL(tiny_cfg, rngs=nnx.Rngs(0))
    processor = Qwen25VLProcessor(tok_dir)

    class Forced:
        def __init__(self):
            self.inner = ModelPolicy(model, processor, SamplerConfig(max_new_tokens=4, stop_strings=(),
                                                                        batch_buckets=(2, 4)),
                                     settings=AgentSettings("short", image_size=56))

        def generate(self, requests):
            prompts.update(tuple(self.inner.encode(r.messages).input_ids.tolist()) for r in requests)
            out = self.inner.generate(requests)
            return [PolicyTurn(scripted_text(r.episode), t.token_ids, t.logprobs, t.stop_reason)
                    for r, t in zip(requests, out)]

    results, prompts = [], set()
    for schedule in (dict(), dict(max_rows=2), dict(max_rows=2, overlap=True, tool_workers=2)):
        eps = make_episodes(size=56, n=4)  # 4, 1, 5, 2 turns; 4 > 2 rows
        traces = run_agent(Forced(), ClassicalTool(), eps, **schedule)
        results.append(summary(eps, traces))
    tokens = [[t for t in ep[3]] for ep in results[0]]
    assert len(tokens) == 4
    assert all(len(t) == c + 1 and all(len(x) >= 1 for x in t) for t, c in zip(tokens, CLICKS))
    # The prompts differ (images, queries, masks): what the model read was each episode's own. (A
    # random tiny model's 4 greedy tokens may still coincide between episodes.)
    assert len(prompts) >= 4
    assert results[1] == results[0] and results[2] == results[0]


class SlowOpenTool(ClassicalTool):
    """Opens take a while; segment checks its episode is open."""

    def __init__(self, events):
        super().__init__()
        self.events = events

    def open(self, episode_id, image):
        time.sleep(0.2)
        super().open(episode_id, image)
        self.events.append(("opened", episode_id))

    def segment(self, episode_id, *args, **kwargs):
        assert episode_id in self._images, f"segment before open of {episode_id}"
        return super().segment(episode_id, *args, **kwargs)


def test_tool_workers_open_episodes_while_the_policy_writes():
    """With tool workers, the admitted episodes' opens run in the background: the policy's first
    call does not wait for them, each episode's first step does; the episodes are unchanged."""
    events: list = []

    class Policy(ScriptedPolicy):
        def generate(self, requests):
            events.append(("generate", len(self.batches)))
            return super().generate(requests)

    static_eps = make_episodes()
    static = run_agent(ScriptedPolicy(), ClassicalTool(), static_eps)
    eps, tool = make_episodes(), SlowOpenTool(events)
    traces = run_agent(Policy(), tool, eps, max_rows=3, tool_workers=3)
    assert summary(eps, traces) == summary(static_eps, static)
    assert events[0] == ("generate", 0)  # before any open finished
    assert tool._images == {}
