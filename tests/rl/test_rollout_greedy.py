"""GRPO's rollout policy with the prefix cache and continuous batching writes the same greedy
episodes as one row per episode without the cache (today's rollouts)."""

from __future__ import annotations

from ibis_jax.agent.loop import run_agent
from ibis_jax.agent.settings import AgentSettings
from ibis_jax.agent.volume import episode_for_sample
from ibis_jax.data.queries import sample_query
from ibis_jax.data.shapes import synthetic_shapes
from ibis_jax.data.sources.base import Sample
from ibis_jax.rl.trainer import RLConfig, default_policy_factory
from ibis_jax.tools.classical import ClassicalTool


def _rollouts(flax_model, processor, rl: RLConfig):
    samples = [Sample(s.image, s.mask, s.target, "Synthetic", s.sample_id, "shapes", {})
               for s in synthetic_shapes(3, size=64, seed=0)]
    episodes = [episode_for_sample(s, sample_query(s, "direct", 0), episode_id=f"e{i}", max_actions=3)
                for i, s in enumerate(samples)]
    settings = AgentSettings("short", image_size=56)
    policy = default_policy_factory(flax_model, processor, rl, 0, settings)
    traces = run_agent(policy, ClassicalTool(), episodes, max_rows=rl.max_rows)
    return [[t.token_ids for t in trace.turns] for trace in traces], [e.ious[-1] for e in episodes]


def test_greedy_rollouts_equal_with_prefix_cache_and_continuous_batching(flax_model, processor):
    base = RLConfig(temperature=0.0, max_new_tokens=24, prefix_cache=False, max_rows=None)
    fast = RLConfig(temperature=0.0, max_new_tokens=24, prefix_cache=True, max_rows=2)
    a, iou_a = _rollouts(flax_model, processor, base)
    b, iou_b = _rollouts(flax_model, processor, fast)
    assert sum(len(t) for t in a) >= 3 and a == b and iou_a == iou_b
