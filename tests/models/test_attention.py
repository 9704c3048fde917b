"""Each attention backend (`models.attention`) equals the reference maths: causal, grouped-query,
left padding and packed sequences by segment ids; the splash kernel in Pallas interpret mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibis_jax.models.attention import causal_attention, resolve_backend
from ibis_jax.models.qwen2_5_vl.layers import MASK_VALUE, dot_attention


def _inputs(s=256, b=2, h=4, kv=2, d=32, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(k[0], (b, s, h, d))
    kk = jax.random.normal(k[1], (b, s, kv, d))
    v = jax.random.normal(k[2], (b, s, kv, d))
    seg = np.ones((b, s), np.int32)
    seg[0, :37] = 0  # row 0: left padding
    seg[1, 100:] = 2  # row 1: two packed sequences
    return q, kk, v, jnp.asarray(seg)


def _reference(q, k, v, seg, scale):
    """Per-row, per-segment causal attention with the additive-bias maths of the decoder before."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    causal = np.tril(np.ones((s, s), bool))
    same = np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :]
    bias = jnp.where(causal[None] & same, 0.0, MASK_VALUE)[:, None, None]
    out = dot_attention(q.reshape(b, s, kv, h // kv, d), k, v, bias, scale)
    return np.asarray(out.reshape(b, s, h, d))


@pytest.mark.parametrize("backend", ["xla", "dot_product", "splash_interpret"])
def test_backend_equals_reference(backend):
    q, k, v, seg = _inputs()
    scale = 32**-0.5
    ref = _reference(q, k, v, seg, scale)
    out = np.asarray(jax.jit(lambda *a: causal_attention(*a, scale=scale, backend=backend))(q, k, v, seg))
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(out[real], ref[real], atol=2e-5, rtol=2e-5)
    assert np.isfinite(out).all()  # padding attends padding: no fully masked row


@pytest.mark.parametrize("backend", ["dot_product", "splash_interpret"])
def test_backend_gradients_equal_xla(backend):
    q, k, v, seg = _inputs(s=128, h=2, kv=1, seed=1)
    w = jax.random.normal(jax.random.key(2), q.shape)
    real = (np.asarray(seg) > 0)[..., None, None]

    def loss(name):
        return lambda q, k, v: (causal_attention(q, k, v, seg, scale=0.2, backend=name) * w * real).sum()

    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss(backend), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)


def test_auto_picks_by_platform():
    assert resolve_backend("auto", "tpu") == "splash"
    assert resolve_backend("auto", "gpu") == "dot_product" and resolve_backend("auto", "cpu") == "xla"
    with pytest.raises(ValueError, match="attention backend"):
        resolve_backend("flash", "cpu")
