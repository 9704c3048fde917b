"""Run in a subprocess with 8 simulated CPU devices: sharded greedy == unsharded greedy.

argv: model dir. Prints one JSON line {"same": bool, "cache_spec": str, "tokens": [...]}."""

import json
import sys

import jax
import numpy as np

from ibis_jax.generate import Sampler, SamplerConfig
from ibis_jax.models.qwen2_5_vl import load_hf
from ibis_jax.models.qwen2_5_vl.processor import Qwen25VLProcessor
from ibis_jax.models.qwen2_5_vl.testing import image_sequence
from ibis_jax.train.mesh import make_mesh


def main(directory: str) -> None:
    proc = Qwen25VLProcessor(directory)
    cfg = SamplerConfig(max_new_tokens=6, stop_strings=(), eos_token_ids=())
    rng = np.random.default_rng(0)
    plain = load_hf(directory)
    grids = np.array([[1, 4, 4]] * 4)
    prompts = [image_sequence(plain.config, rng, [g], [n, 2]) for g, n in zip(grids, (3, 9, 5, 1))]
    pv = rng.standard_normal((64, plain.config.vision.patch_dim)).astype(np.float32)
    ref = Sampler(plain, proc.tokenizer, cfg).generate(prompts, pv, grids)
    mesh = make_mesh((2, 2, 2))
    sharded = load_hf(directory, mesh=mesh)
    s = Sampler(sharded, proc.tokenizer, cfg, mesh=mesh)
    state = s.prefill(prompts, pv, grids)
    spec = str(state.k[0].sharding.spec)
    state, out = s.decode(state, 4)
    print(json.dumps({"same": [c.token_ids for c in out] == [c.token_ids for c in ref],
                      "cache_spec": spec, "after_decode_spec": str(state.k[0].sharding.spec),
                      "devices": len(jax.devices())}))


if __name__ == "__main__":
    main(sys.argv[1])
