"""ModelPolicy (the agent loop's Policy over the sampler) and sharded sampling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ibis_jax.agent.conversation import Message, turn_messages
from ibis_jax.generate import Sampler, SamplerConfig
from ibis_jax.generate.policy import ModelPolicy


def _image(seed, size=56):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_model_policy_generates_turns(flax_model, processor):
    from ibis_jax.agent.loop import PolicyTurn, TurnRequest

    cfg = SamplerConfig(max_new_tokens=8)
    policy = ModelPolicy(flax_model, processor, cfg)
    reqs = [TurnRequest(turn_messages(0, q, [_image(i)]), episode=None)
            for i, q in enumerate(["Segment the liver.", "Is there a tumor? If yes, segment it."])]
    turns = policy.generate(reqs)
    assert len(turns) == 2 and all(isinstance(t, PolicyTurn) for t in turns)
    # Same ids as the sampler on the processor's own encoding.
    encoded = [policy.encode(r.messages) for r in reqs]
    prompts = [e.input_ids for e in encoded]
    pv, grid = processor.images([im for e in encoded for im in e.images])
    assert all(im.shape == (504, 504, 3) for e in encoded for im in e.images)  # HF default image size
    direct = Sampler(flax_model, processor.tokenizer, cfg).generate(list(prompts), pv, grid)
    for t, c in zip(turns, direct):
        assert t.token_ids == c.token_ids and t.text == c.text and t.stop_reason == c.stop_reason
        assert t.logprobs.shape == (len(t.token_ids),)
    sampler = ModelPolicy.for_rollouts(flax_model, processor, temperature=1.0, max_new_tokens=8, seed=3)
    a = sampler.generate(reqs)
    b = ModelPolicy.for_rollouts(flax_model, processor, temperature=1.0, max_new_tokens=8, seed=3).generate(reqs)
    assert [t.token_ids for t in a] == [t.token_ids for t in b]
    # Temperature 1, no truncation: sampling log-probs are the model's.
    assert all(np.all(t.logprobs < 0) for t in a)


@pytest.mark.slow
def test_sharded_sampling_matches_unsharded(hf_dir_and_model):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    worker = os.path.join(os.path.dirname(__file__), "sharded_worker.py")
    res = subprocess.run([sys.executable, worker, hf_dir_and_model[0]], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    assert out["same"]
    assert "tensor" in out["cache_spec"] and "tensor" in out["after_decode_spec"]
