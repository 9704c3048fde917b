"""Run with 8 simulated CPU devices: HF export straight from a state sharded over a
(2 data, 2 fsdp, 2 tensor) mesh vs the same parameters on one device (`save_hf` for full
fine-tuning, the same export for LoRA: its host-side merge must not depend on the layout); prints
one RESULT JSON line (file bytes equal, host memory peaks)."""

import dataclasses
import filecmp
import json
import os
import sys
import time
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from helpers import make_config  # noqa: E402

from ibis_jax.models.qwen2_5_vl import save_hf  # noqa: E402
from ibis_jax.models.qwen2_5_vl.tiny import tiny_config  # noqa: E402
from ibis_jax.train import mesh as mesh_lib  # noqa: E402
from ibis_jax.train.checkpoint import export_hf  # noqa: E402
from ibis_jax.train.optim import make_optimizer  # noqa: E402
from ibis_jax.train.state import ModelDef, init_fn_for, make_model, split_model, state_specs  # noqa: E402

SHARD = 256 * 1024  # bytes: the tiny model (~4 MB fp32) spreads over many shards


def sharded_state(cfg, mcfg, mesh):
    tx, _ = make_optimizer(cfg, 10)
    key = jax.random.key(0)
    graphdef, _, _, param_specs = split_model(nnx.eval_shape(lambda: make_model(cfg, mcfg, key)), cfg)
    init = init_fn_for(cfg, mcfg, tx)
    abstract = jax.eval_shape(init, key)
    shardings = mesh_lib.named(mesh, state_specs(abstract, param_specs, tx, cfg))
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(key)
    if cfg.lora_rank:  # b = 0 at init: give the adapters values so the merge matters
        params = jax.tree.map(lambda x: x + 0.01 * jnp.ones_like(x), state.params)
        state = dataclasses.replace(state, params=jax.device_put(params, shardings.params))
    return ModelDef(graphdef, mcfg, cfg.lora_rank, cfg.lora_alpha), state


def compare(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)), (names, sorted(os.listdir(b)))
    same = all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)
    return same, [n for n in names if n.endswith(".safetensors")]


def main(tmp):
    assert len(jax.devices()) == 8
    mesh = mesh_lib.make_mesh((2, 2, 2))
    mcfg = tiny_config()
    out = {}
    for name, cfg in [("full", make_config(freeze_vision=False)),
                      ("lora", make_config(lora_rank=4, lora_targets=("q_proj", "v_proj", "up_proj")))]:
        model_def, state = sharded_state(cfg, mcfg, mesh)
        specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves((state.params, state.frozen))})
        sharded_dir, host_dir = os.path.join(tmp, name, "sharded"), os.path.join(tmp, name, "host")
        with jax.set_mesh(mesh):  # warm-up: compiles the LoRA merges (tracing allocates too)
            export_hf(model_def, state, os.path.join(tmp, name, "warm"), max_shard_size=SHARD)
        tracemalloc.start()
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            export_hf(model_def, state, sharded_dir, max_shard_size=SHARD)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # the reference: every tensor on one device (no mesh), the same export: the bytes must not
        # depend on the layout (the LoRA merge runs on the host in numpy either way)
        # (full fine-tuning: the plain save_hf of the model, an independent writer)
        one = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), jax.device_get(state))
        tracemalloc.start()
        if model_def.lora_rank:
            export_hf(model_def, one, host_dir, max_shard_size=SHARD)
        else:
            save_hf(model_def.build(one.params, one.frozen), host_dir, max_shard_size=SHARD)
            from ibis_jax.agent.settings import HF_DEFAULTS, save_agent_settings

            save_agent_settings(host_dir, HF_DEFAULTS)
        _, host_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        same, shards = compare(sharded_dir, host_dir)
        sizes = [os.path.getsize(os.path.join(sharded_dir, s)) for s in shards]
        out[name] = {"same_bytes": same, "num_shards": len(shards), "max_shard_bytes": max(sizes),
                     "total_bytes": sum(sizes), "peak_host_bytes": peak, "reference_peak_host_bytes": host_peak,
                     "export_s": round(seconds, 2), "specs": specs}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
