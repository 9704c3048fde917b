"""Run on 8 simulated CPU devices (test_rollout_layout.py): the tiny model trained on a (1, 8, 1)
FSDP mesh; the GRPO trainer's rollout path (merged policy resharded into the decode layout, the
default policy factory's sampler on the decode mesh) and, for contrast, today's sampler on the
FSDP layout. Prints one JSON line: the decode loop's collectives per token of each."""

import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from ibis_jax.agent.settings import AgentSettings
from ibis_jax.generate import Sampler, SamplerConfig
from ibis_jax.generate import sampler as sampler_lib
from ibis_jax.models.qwen2_5_vl.processor import Qwen25VLProcessor
from ibis_jax.models.qwen2_5_vl.tiny import make_tokenizer_dir, tiny_config
from ibis_jax.plan.hlo import loop_collectives
from ibis_jax.rl import rollout_layout
from ibis_jax.rl.trainer import RLConfig, default_policy_factory
from ibis_jax.train import mesh as mesh_lib
from ibis_jax.train.config import TrainConfig
from ibis_jax.train.optim import make_optimizer
from ibis_jax.train.program import build_program
from flax import nnx


def decode_loop(sampler: Sampler, rows: int) -> dict:
    """Compile the sampler's decode step for `rows` prompts as `Sampler.decode` calls it."""
    prompts = [np.arange(5 + r, 17 + r, dtype=np.int32) for r in range(rows)]
    state = sampler.prefill(prompts)
    graphdef, params, packed = sampler._split()
    live = jnp.asarray(np.arange(state.batch) < rows)

    def lower():
        return sampler_lib._decode.lower(graphdef, params, packed, state, jax.random.key(0), live, sampler._stop_table,
                                         sampler._eos, cfg=sampler.config,
                                         cache_spec=sampler._cache_spec(state.batch)).compile()

    compiled = sampler._run(lower)
    moved = loop_collectives(compiled.as_text())
    return {"bytes": moved.bytes, "counts": moved.counts, "loops": moved.loops,
            "param_bytes": rollout_layout.tree_bytes(params)}


def main() -> None:
    tok = make_tokenizer_dir(tempfile.mkdtemp())
    model_config = tiny_config(tok)
    config = TrainConfig(mesh_shape=(1, 8, 1), lora_rank=4, lora_targets=("q_proj", "v_proj"))
    mesh = mesh_lib.make_mesh(config.mesh_shape)
    tx, schedule = make_optimizer(config, 10)
    program = build_program(config, model_config, mesh, tx, schedule)
    state = program.init(jax.random.key(0))
    rl = RLConfig(max_new_tokens=8, temperature=0.0, rollout_layout=sys.argv[1] if len(sys.argv) > 1 else "auto")
    processor = Qwen25VLProcessor(tok)
    # The trainer's path (rl/trainer.py): one decode mesh over the training devices.
    kv = model_config.text.num_key_value_heads
    merged_bytes = rollout_layout.tree_bytes(program.model_def.abstract_params(program.abstract.params,
                                                                                program.abstract.frozen))
    dmesh = rollout_layout.decode_mesh(mesh, rl.rollout_layout, kv, merged_bytes, None)
    params = rollout_layout.decode_policy_params(program.model_def, state.params, state.frozen,
                                                 program.shardings.params, program.shardings.frozen, dmesh,
                                                 config.compute_dtype)
    with jax.set_mesh(dmesh):
        policy = default_policy_factory(nnx.merge(program.model_def.graphdef, nnx.State(params)), processor, rl, 0,
                                        AgentSettings("short", image_size=56))
    decode = decode_loop(policy.sampler, 8)
    # Today's layout: the FSDP-sharded policy, the sampler on the training mesh.
    with jax.set_mesh(mesh):
        fsdp_model = program.model_def.build(state.params, state.frozen, merged=True)
    fsdp = decode_loop(Sampler(fsdp_model, processor.tokenizer, SamplerConfig(max_new_tokens=8, packed_weights=False),
                               mesh=mesh), 8)
    print(json.dumps({"devices": jax.device_count(), "decode_mesh": dict(dmesh.shape),
                      "sampler_mesh": dict(policy.sampler.mesh.shape), "prefix_cache": policy.prefix_cache,
                      "decode": decode, "fsdp": fsdp}))


if __name__ == "__main__":
    main()
