"""The update step: exact token mean under gradient accumulation; LoRA init, merge and export."""

import jax
import jax.numpy as jnp
import numpy as np

from ibis_jax.models.qwen2_5_vl.layers import layer_view
from flax import nnx

from helpers import make_config, write_dataset
from ibis_jax.models.qwen2_5_vl.tiny import tiny_config
from ibis_jax.train.loss import LOSSES
from ibis_jax.train.mesh import make_mesh
from ibis_jax.train.optim import make_optimizer
from ibis_jax.train.pipeline import make_pipeline
from ibis_jax.train.sft import with_vision_layout
from ibis_jax.train.state import ModelDef, init_fn_for, make_model, split_model
from ibis_jax.train.step import make_train_step


def _setup(cfg, tok_dir):
    mcfg = tiny_config(tok_dir)
    tx, schedule = make_optimizer(cfg, 10)
    key = jax.random.key(0)
    graphdef, _, _, _ = split_model(nnx.eval_shape(lambda: make_model(cfg, mcfg, key)), cfg)
    model_def = ModelDef(graphdef, mcfg, cfg.lora_rank, cfg.lora_alpha)
    state = jax.jit(init_fn_for(cfg, mcfg, tx))(key)
    jitted = jax.jit(make_train_step(model_def, LOSSES["sft"], tx, schedule))
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])  # the model's activation constraints name mesh axes

    def step(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    return mcfg, model_def, step, state


def test_accumulation_is_exact_token_mean(tmp_path, tok_dir):
    data = write_dataset(str(tmp_path / "data"), records=2)
    cfg2 = make_config(batch_size=4, grad_accum=2, seq_buckets=(1024,), lr=1e-2)
    mcfg, _, step, state = _setup(cfg2, tok_dir)
    b2 = next(make_pipeline(data, tok_dir, cfg2).iterator())
    # the same 4 samples as one micro-batch: concatenate along the batch (and packed-image) axis
    b1 = {k: (v.reshape(1, -1, *v.shape[2:]) if v.ndim > 1 else v.sum(keepdims=True)) for k, v in b2.items()}
    w = b2["weights"]
    assert w[0].sum() != w[1].sum()  # unequal denominators: a mean of micro-batch means would be wrong
    s2, m2 = step(state, with_vision_layout(b2, mcfg.vision, {}))
    s1, m1 = step(state, with_vision_layout(b1, mcfg.vision, {}))
    assert m1["loss_denominator"] == m2["loss_denominator"] == w.sum()
    assert abs(float(m1["loss"]) - float(m2["loss"])) < 1e-5
    assert abs(float(m1["grad_norm"]) - float(m2["grad_norm"])) < 1e-4 * float(m1["grad_norm"])
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), s1.params, s2.params)
    # Adam moves every param by ~lr = 1e-2; fp32 summation order differs, and Adam's
    # normalisation magnifies that on near-zero gradients: a few % of one update at most.
    assert max(jax.tree.leaves(diff)) < 0.05 * 1e-2


def test_lora_trains_adapters_only_and_merges_on_export(tmp_path, tok_dir):
    from ibis_jax.models.qwen2_5_vl import load_hf, save_hf

    data = write_dataset(str(tmp_path / "data"), records=2)
    cfg = make_config(batch_size=2, lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "v_proj"), lr=1e-2)
    mcfg, model_def, step, state = _setup(cfg, tok_dir)
    assert set(state.params) == {f"language_model/layers/self_attn/{m}/kernel" for m in ("q_proj", "v_proj")}
    a = state.params["language_model/layers/self_attn/q_proj/kernel"]["a"]
    assert a.shape == (2, 128, 4)  # [layers, d_in, rank], over the stacked kernel
    assert a.dtype == jnp.float32
    # b = 0 at init: the merged model is the base model
    merged0 = model_def.all_params(state.params, state.frozen)
    for x, y in zip(jax.tree.leaves(merged0), jax.tree.leaves(state.frozen)):
        np.testing.assert_array_equal(x, y)
    batch = with_vision_layout(next(make_pipeline(data, tok_dir, cfg).iterator()), mcfg.vision, {})
    frozen_before = jax.device_get(state.frozen)
    new, m = step(state, batch)
    for x, y in zip(jax.tree.leaves(new.frozen), jax.tree.leaves(frozen_before)):
        np.testing.assert_array_equal(x, y)  # the base weights never move
    ab = jax.tree.map(lambda x: x[1], new.params["language_model/layers/self_attn/v_proj/kernel"])  # layer 1
    assert float(jnp.abs(ab["b"]).max()) > 0
    merged = model_def.all_params(new.params, new.frozen)
    base = new.frozen["language_model"]["layers"]["self_attn"]["v_proj"]["kernel"][1]
    want = base + (8.0 / 4) * ab["a"] @ ab["b"]
    got = merged["language_model"]["layers"]["self_attn"]["v_proj"]["kernel"][1]
    np.testing.assert_allclose(got, want, atol=1e-6)
    # export: save_hf of the merged model, load back
    save_hf(model_def.build(new.params, new.frozen, merged=True), str(tmp_path / "hf"))
    loaded = load_hf(str(tmp_path / "hf"))
    np.testing.assert_allclose(layer_view(loaded.language_model.layers, 1).self_attn.v_proj.kernel[...], got, atol=0)
    untouched = layer_view(loaded.language_model.layers, 1).self_attn.k_proj.kernel[...]
    np.testing.assert_array_equal(untouched, new.frozen["language_model"]["layers"]["self_attn"]["k_proj"]["kernel"][1])


def test_grpo_logprob_pass_runs_with_remat_and_equals_without(tmp_path, tok_dir):
    """The old/reference log-prob pass maps over micro-batches; with remat=True its model must be
    built inside the mapped body (nnx.remat on a module of the outer trace raised TraceContextError:
    every remat config's GRPO and `ibis-jax plan --stage grpo` failed)."""
    from ibis_jax.rl.loss import make_token_logprobs

    data = write_dataset(str(tmp_path / "data"), records=2)
    results = []
    for remat in (False, True):
        cfg = make_config(batch_size=2, grad_accum=2, seq_buckets=(1024,), remat=remat)
        mcfg, model_def, _, state = _setup(cfg, tok_dir)
        batch = with_vision_layout(next(make_pipeline(data, tok_dir, cfg).iterator()), mcfg.vision, {})
        fn = jax.jit(make_token_logprobs(model_def, 1.0, mcfg.multimodal_token_ids))
        with jax.set_mesh(make_mesh((1, 1, 1), jax.devices()[:1])):
            results.append(np.asarray(fn(state.params, state.frozen, batch)))
    assert results[0].shape == (2, 1, 1024) and np.isfinite(results[0]).all()  # grad_accum 2 x 1 row
    np.testing.assert_allclose(results[1], results[0], atol=1e-5)
