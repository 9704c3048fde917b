"""Training-side features: sharding metadata, freezing, remat, bf16 compute, KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ibis_jax.models.qwen2_5_vl import (
    KVCache,
    Qwen25VL,
    ShardingConfig,
    get_rope_index,
    trainable_filter,
    vision_layout,
)
from ibis_jax.models.qwen2_5_vl.testing import flax_logits, image_sequence


def test_every_param_carries_a_partition_spec(tiny_cfg):
    model = nnx.eval_shape(lambda: Qwen25VL(tiny_cfg, sharding=ShardingConfig.fsdp_tensor(), rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    specs = nnx.get_partition_spec(state)
    flat = dict(nnx.to_flat_state(specs))
    values = dict(nnx.to_flat_state(state))
    assert len(flat) == len(values) > 30  # the layers stacked: one parameter per kind
    for path, var in values.items():
        assert "out_sharding" in var.get_metadata(), path
    q = flat[("language_model", "layers", "self_attn", "q_proj", "kernel")]
    assert q.get_value() == P(None, "fsdp", "tensor")  # [layers, d, heads * head_dim]
    emb = flat[("language_model", "embed_tokens", "embedding")]
    assert emb.get_value() == P("tensor", "fsdp")


def test_trainable_filter_freezes_vit_but_not_merger(tiny_cfg):
    model = nnx.eval_shape(lambda: Qwen25VL(tiny_cfg, rngs=nnx.Rngs(0)))
    train = {p for p, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(freeze_vision=True)))}
    every = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    frozen = every - train
    assert frozen and all(p[0] == "visual" and p[1] != "merger" for p in frozen)
    assert any(p[:2] == ("visual", "merger") for p in train)
    assert ("visual", "patch_embed") in frozen
    assert train | frozen == every
    only_text = {p for p, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(True, train_merger=False)))}
    assert all(p[0] != "visual" for p in only_text)


def _loss_and_grads(model, ids, pv, grid, layout):
    def loss_fn(m):
        logits = m(ids, None, pv, grid, vision_layout=layout)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    return nnx.value_and_grad(loss_fn)(model)


@pytest.mark.slow
def test_remat_and_freeze_vision_gradients(flax_model, tiny_cfg):
    rng = np.random.default_rng(0)
    grid = np.array([[1, 4, 4]])
    ids = jnp.asarray(image_sequence(tiny_cfg, rng, grid, [3, 3])[None])
    pv = jnp.asarray(rng.standard_normal((16, tiny_cfg.vision.patch_dim)), jnp.float32)
    graphdef, state = nnx.split(flax_model)
    variants = {}
    kinds = {"plain": {}, "remat": {"remat": True}, "dots": {"remat": "dots_saveable"},
             "unrolled": {"scan_layers": False, "remat": "full"}, "frozen": {"freeze_vision": True}}
    for name, kw in kinds.items():
        m = nnx.eval_shape(lambda: Qwen25VL(tiny_cfg, rngs=nnx.Rngs(0), **kw))
        nnx.update(m, state)
        variants[name] = nnx.jit(_loss_and_grads)(m, ids, pv, grid, vision_layout(grid, tiny_cfg.vision))
    l0, g0 = variants["plain"]
    for name in ("remat", "dots", "unrolled"):  # the same maths, whatever is saved or scanned
        l1, g1 = variants[name]
        assert abs(float(l0) - float(l1)) < 1e-6, name
        diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), nnx.to_pure_dict(g0), nnx.to_pure_dict(g1))
        assert max(jax.tree.leaves(diff)) < 1e-5, name
    l2, g2 = variants["frozen"]
    assert abs(float(l0) - float(l2)) < 1e-6
    blk = g2["visual"]["blocks"]["attn"]["qkv"]["kernel"][...]  # stacked [blocks, ...]
    assert float(jnp.abs(blk).max()) == 0.0
    assert float(jnp.abs(g2["visual"]["merger"]["mlp_0"]["kernel"][...]).max()) > 0
    assert float(jnp.abs(g0["visual"]["blocks"]["attn"]["qkv"]["kernel"][...][0]).max()) > 0


def test_bf16_compute_close_to_fp32(hf_dir_and_model, flax_model):
    from ibis_jax.models.qwen2_5_vl import load_hf

    m = load_hf(hf_dir_and_model[0], dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    ids = np.arange(5, 50, 4)[None]
    lo, hi = flax_logits(m, ids), flax_logits(flax_model, ids)
    assert np.abs(lo - hi).max() < 0.05 * np.abs(hi).max()
    assert np.abs(lo - hi).max() > 0  # it did compute in bf16


def test_kv_cache_prefill_then_decode_matches_full_forward(flax_model, tiny_cfg):
    rng = np.random.default_rng(1)
    grid = np.array([[1, 4, 8]])
    ids = image_sequence(tiny_cfg, rng, grid, [3, 4])[None]
    pv = rng.standard_normal((32, tiny_cfg.vision.patch_dim)).astype(np.float32)
    full = flax_logits(flax_model, ids, None, pv, grid)
    pos, _ = get_rope_index(ids, None, grid, image_token_id=tiny_cfg.image_token_id)
    s = ids.shape[1]
    cache = KVCache.init(tiny_cfg.text, batch=1, max_len=s + 4)
    slots = np.zeros((1, s + 4), np.int32)
    slots[:, :s] = 1
    @nnx.jit
    def run(model, ids, pos, slots, cache, pv=None, layout=None):
        h, cache = model.language_model(model.embed(ids, pv, None, layout)[0], pos, slots, cache)
        return model.logits(h), cache

    layout = vision_layout(grid, tiny_cfg.vision)
    logits, cache = run(flax_model, ids[:, : s - 2], pos[:, :, : s - 2], slots, cache, pv, layout)
    assert int(cache.end) == s - 2
    assert np.abs(np.asarray(logits) - full[:, : s - 2]).max() < 1e-4
    for t in (s - 2, s - 1):  # two single-token decode steps
        logits, cache = run(flax_model, ids[:, t : t + 1], pos[:, :, t : t + 1], slots, cache)
        assert np.abs(np.asarray(logits)[:, 0] - full[:, t]).max() < 1e-4
    assert int(cache.end) == s


def test_optimizer_step_with_frozen_vision(flax_model, tiny_cfg):
    import optax

    rng = np.random.default_rng(3)
    grid = np.array([[1, 4, 4]])
    ids = jnp.asarray(image_sequence(tiny_cfg, rng, grid, [3, 5])[None])
    pv = jnp.asarray(rng.standard_normal((16, tiny_cfg.vision.patch_dim)), jnp.float32)
    layout = vision_layout(grid, tiny_cfg.vision)
    model = nnx.eval_shape(lambda: Qwen25VL(tiny_cfg, freeze_vision=True, rngs=nnx.Rngs(0)))
    nnx.update(model, nnx.state(flax_model))
    wrt = trainable_filter(freeze_vision=True)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=wrt)

    @nnx.jit
    def step(model, opt, ids, pv, grid, layout):
        def loss_fn(m):
            logits = m(ids, None, pv, grid, vision_layout=layout)[:, :-1]
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        opt.update(model, grads)
        return loss

    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    losses = [float(step(model, opt, ids, pv, grid, layout)) for _ in range(3)]
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(np.asarray(after["visual"]["patch_embed"]), before["visual"]["patch_embed"])
    merger = np.asarray(after["visual"]["merger"]["mlp_0"]["kernel"])
    assert not np.array_equal(merger, before["visual"]["merger"]["mlp_0"]["kernel"])
    assert not np.array_equal(np.asarray(after["lm_head"]), before["lm_head"])


def test_mlp_chunk_equals_whole_sequence(flax_model, tiny_cfg):
    """The MLP over sequence chunks (mlp_chunk, each rematerialised) gives the same logits and
    gradients as over the whole sequence."""
    graphdef, state = nnx.split(flax_model)
    ids = jnp.asarray(np.arange(5, 69).reshape(2, 32) % 400)
    out = {}
    for chunk in (0, 8):
        m = nnx.eval_shape(lambda: Qwen25VL(tiny_cfg, mlp_chunk=chunk, rngs=nnx.Rngs(0)))
        nnx.update(m, state)
        loss = lambda model: model(ids).astype(jnp.float32).std()
        out[chunk] = nnx.jit(nnx.value_and_grad(loss))(m)
    (l0, g0), (l1, g1) = out[0], out[8]
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), nnx.to_pure_dict(g0), nnx.to_pure_dict(g1))
    assert max(jax.tree.leaves(diff)) < 1e-6
