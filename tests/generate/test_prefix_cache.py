"""The shared-prefix cache: the system turn encoded once and copied into every row."""

from __future__ import annotations

import numpy as np

from ibis_jax.agent.conversation import turn_messages
from ibis_jax.agent.loop import TurnRequest
from ibis_jax.agent.prompts import SHORT_SYSTEM_PROMPT
from ibis_jax.generate import Sampler, SamplerConfig
from ibis_jax.agent.settings import AgentSettings
from ibis_jax.generate.policy import ModelPolicy


def _image(seed, size=56):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_shared_prefix_prefill_decodes_like_the_full_prompt(flax_model, processor):
    msgs = [turn_messages(0, q, [_image(i)], system_prompt=SHORT_SYSTEM_PROMPT)
            for i, q in enumerate(["Segment the liver.", "Is there a tumor? If yes, segment it.", "Kidney."])]
    policy = ModelPolicy(flax_model, processor, SamplerConfig(max_new_tokens=6, stop_strings=()),
                         settings=AgentSettings("short", image_size=56), prefix_cache=True)
    encoded = [policy.encode(m) for m in msgs]
    prompts = [e.input_ids for e in encoded]
    pixel_values, grid = processor.images([im for e in encoded for im in e.images])
    im_start = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    n = int(np.flatnonzero(prompts[0] == im_start)[1])  # the system turn
    assert all(np.array_equal(p[:n], prompts[0][:n]) for p in prompts)
    sampler = Sampler(flax_model, processor.tokenizer, SamplerConfig(max_new_tokens=6, stop_strings=()))
    full = sampler.generate(prompts, pixel_values, grid)
    shared = sampler.generate([p[n:] for p in prompts], pixel_values, grid, prefix=prompts[0][:n])
    again = sampler.generate([p[n:] for p in prompts[:2]], pixel_values[: grid[:2].prod(-1).sum()], grid[:2],
                             prefix=prompts[0][:n])  # the cached prefix, another batch
    assert len(sampler._prefixes) == 1
    assert [c.token_ids for c in shared] == [c.token_ids for c in full]
    assert [c.token_ids for c in again] == [c.token_ids for c in full[:2]]
    np.testing.assert_allclose(np.concatenate([c.model_logprobs for c in shared]),
                               np.concatenate([c.model_logprobs for c in full]), atol=1e-4)

    turns = policy.generate([TurnRequest(m, None) for m in msgs])
    assert [t.token_ids for t in turns] == [c.token_ids for c in full]
