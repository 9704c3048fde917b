"""With one update per rollout batch the GRPO update holds its own log-probs as pi_old (no
separate pass): the same update as with the old log-prob pass the trainer ran before."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ibis_jax.models.qwen2_5_vl import Qwen25VLConfig
from ibis_jax.plan import programs
from ibis_jax.rl.grpo import GRPOConfig
from ibis_jax.rl.loss import make_grpo_loss, make_token_logprobs
from ibis_jax.rl.trainer import RLConfig
from ibis_jax.train.config import TrainConfig
from ibis_jax.train.mesh import make_mesh


def _batch(structs, vocab, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in structs.items():
        if k == "vision_layout":
            continue
        if k in ("input_ids", "targets"):
            out[k] = rng.integers(0, 400, v.shape).astype(np.int32)
        elif k == "attention_mask":
            out[k] = np.ones(v.shape, np.int32)
        elif k == "loss_mask":
            out[k] = (rng.random(v.shape) < 0.3).astype(np.float32)
        elif k == "image_grid_thw":
            out[k] = np.zeros(v.shape, np.int32)
        else:
            out[k] = rng.standard_normal(v.shape).astype(np.float32)
    out["row_weights"] = np.full(structs["row_weights"].shape, 0.01, np.float32)
    return out


def test_one_update_without_the_old_pass_equals_the_update_with_it():
    config = TrainConfig(image_size=56, mesh_shape=(1, 1, 1), lr=1e-3, warmup_frac=0.0, freeze_vision=False)
    rl = RLConfig(steps=1, prompts_per_step=1, max_turns=1, grpo=GRPOConfig(group_size=2), seq_buckets=(64,))
    model_config = Qwen25VLConfig.tiny()
    mesh = make_mesh(config.mesh_shape, jax.devices()[:1])
    setup = programs.train_setup(config, model_config, mesh, rl)
    program = setup.program
    structs, patches, images = programs.grpo_batch(config, rl, model_config)
    batch = _batch(structs, model_config.text.vocab_size)
    # a text-only batch: no image tokens, so the images are inert
    batch["image_grid_thw"] = np.tile(np.asarray([[[1, 4, 4]]], np.int32), (1, images, 1))
    batch["pixel_values"] = np.zeros((1, images * 16, model_config.vision.patch_dim), np.float32)
    from ibis_jax.train.sft import with_vision_layout

    batch = with_vision_layout(batch, model_config.vision, {})
    state = program.init(jax.random.key(0))
    loss = make_grpo_loss(rl.grpo, temperature=rl.temperature, suppressed=model_config.multimodal_token_ids)
    lp = jax.jit(make_token_logprobs(program.model_def, rl.temperature, model_config.multimodal_token_ids))
    with jax.set_mesh(mesh):
        old = lp(state.params, state.frozen, batch)
    sampler = np.asarray(old) + 0.01 * np.asarray(batch["loss_mask"])  # the sampler's own numbers drift a little
    shard = lambda b: program.batch_shardings(b)
    with_old = {**batch, "old_logprobs": old}
    fused = {**batch, "sampler_logprobs": jnp.asarray(sampler)}
    copy = lambda s: jax.tree.map(jnp.copy, s)  # the step donates its state
    a, ma = program.train_step(loss, shard(with_old))(copy(state), with_old)
    b, mb = program.train_step(loss, shard(fused))(copy(state), fused)
    assert float(ma["grad_norm"]) > 0
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(ma["grad_norm"]), float(mb["grad_norm"]), rtol=1e-5)
    np.testing.assert_allclose(float(mb["ratio_mean"]), 1.0, atol=0)  # exactly pi / pi
    np.testing.assert_allclose(float(mb["sampler_vs_old_logprob_max_abs"]), 0.01, rtol=1e-3)

    # The gradients themselves (Adam's update divides by their scale, so it would magnify fp32
    # rounding on near-zero entries): equal to fp32 noise.
    def grads(b):
        mb0 = jax.tree.map(lambda x: x[0], b)

        def f(params, mb):
            loss_sum, denom, _ = loss(program.model_def.build(params, state.frozen), mb)
            return loss_sum / denom

        with jax.set_mesh(mesh):
            return jax.jit(jax.grad(f))(state.params, mb0)

    g_old, g_fused = grads(with_old), grads(fused)
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_old))
    for x, y in zip(jax.tree.leaves(g_old), jax.tree.leaves(g_fused)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * scale)
