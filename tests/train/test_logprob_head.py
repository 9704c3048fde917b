"""The chunked log-prob head (`train.loss.chunked_token_logprobs`): values and gradients equal the
full-logits maths, and under `value_and_grad` it keeps no fp32 [tokens, vocab] residuals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ibis_jax.train.loss import chunked_token_logprobs


def _reference(h, w, t):
    logits = h @ w
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), t[..., None], -1)[..., 0]
    p = jax.nn.softmax(logits, -1)
    return logp, -(p * jax.nn.log_softmax(logits, -1)).sum(-1)


def test_values_and_gradients_equal_the_full_logits():
    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (3, 37, 16))
    w = jax.random.normal(k[1], (16, 50)) * 0.3
    t = jax.random.randint(k[2], (3, 37), 0, 50)
    weights = jax.random.uniform(k[3], (3, 37))
    ref_lp, ref_ent = _reference(h, w, t)
    for chunk in (16, 37, 111, 512):  # uneven, one row, every token, more than all tokens
        lp, ent = chunked_token_logprobs(lambda x: x @ w, h, t, chunk)
        np.testing.assert_allclose(lp, ref_lp, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(ent, ref_ent, rtol=1e-6, atol=1e-5)
        loss = lambda fn: lambda h, w: (fn(h, w) * weights).sum()
        g_ref = jax.grad(loss(lambda h, w: _reference(h, w, t)[0]), argnums=(0, 1))(h, w)
        g_new = jax.grad(loss(lambda h, w: chunked_token_logprobs(lambda x: x @ w, h, t, chunk)[0]),
                         argnums=(0, 1))(h, w)
        for a, b in zip(g_new, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_backward_keeps_no_full_logits():
    """The compiled gradient's temporaries stay far below one fp32 [tokens, vocab] copy."""
    n, d, v = 2048, 64, 8192
    h = jax.ShapeDtypeStruct((4, n // 4, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    t = jax.ShapeDtypeStruct((4, n // 4), jnp.int32)
    f = jax.jit(jax.grad(lambda h, w, t: chunked_token_logprobs(lambda x: x @ w, h, t, 128)[0].sum(), argnums=(0, 1)))
    temp = f.lower(h, w, t).compile().memory_analysis().temp_size_in_bytes
    full = n * v * 4
    assert temp < full / 4, (temp, full)
