"""LoRA on the activations (the training forward) equals LoRA merged into the kernels (the
rollouts' and the export's form), and its backward forms no weight gradient of the frozen base."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ibis_jax.models.qwen2_5_vl import Qwen25VLConfig
from ibis_jax.train.config import TrainConfig
from ibis_jax.train.optim import make_optimizer
from ibis_jax.train.program import build_program
from ibis_jax.train.mesh import make_mesh


def _program(**kw):
    config = TrainConfig(lora_rank=4, lora_alpha=8.0, mesh_shape=(1, 1, 1), freeze_vision=True, **kw)
    tx, schedule = make_optimizer(config, 10)
    return build_program(config, Qwen25VLConfig.tiny(), make_mesh(config.mesh_shape, jax.devices()[:1]), tx, schedule)


def test_activation_form_equals_merged_kernels():
    program = _program()
    state = program.init(jax.random.key(0))
    # non-zero B (B starts at zero: both forms would equal the base trivially)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), state.params)
    ids = np.arange(3, 40).reshape(1, -1) % 400
    with jax.set_mesh(program.mesh):  # the model's activation constraints name the mesh's axes
        act = program.model_def.build(params, state.frozen)(ids)
        merged = program.model_def.build(params, state.frozen, merged=True)(ids)
        base = program.model_def.build(jax.tree.map(jnp.zeros_like, params), state.frozen)(ids)
    np.testing.assert_allclose(act, merged, atol=2e-5, rtol=2e-5)
    assert float(jnp.abs(act - base).max()) > 1e-3  # the adapters do act


def test_backward_forms_no_base_weight_gradient():
    """The step's HLO holds no dot producing a [d_in, d_out] kernel-shaped gradient per layer."""
    program = _program()
    cfg = Qwen25VLConfig.tiny().text
    state = program.init(jax.random.key(0))
    ids = jnp.asarray(np.arange(3, 40).reshape(1, -1) % 400)

    def loss(params):
        return program.model_def.build(params, state.frozen)(ids).sum()

    with jax.set_mesh(program.mesh):
        hlo = jax.jit(jax.grad(loss)).lower(state.params).compile().as_text()
    import re

    d, f = cfg.hidden_size, cfg.intermediate_size
    # an up-projection weight gradient would be a dot producing f32[d, f]
    produced = re.findall(r"= f32\[(\d+),(\d+)\]\{[^}]*\} dot\(", hlo)
    assert (str(d), str(f)) not in produced
    # the same check finds the weight gradient when the adapters are merged into the kernels
    def merged_loss(params):
        return program.model_def.build(params, state.frozen, merged=True)(ids).sum()

    with jax.set_mesh(program.mesh):
        merged_hlo = jax.jit(jax.grad(merged_loss)).lower(state.params).compile().as_text()
    assert (str(d), str(f)) in re.findall(r"= f32\[(\d+),(\d+)\]\{[^}]*\} dot\(", merged_hlo)
