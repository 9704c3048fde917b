"""Small building blocks shared by the vision tower and the decoder."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

DType = Any

# Large finite negative instead of -inf: fully masked rows (left padding) stay finite, so
# padding never turns losses or gradients into NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def partitioned(init: nnx.Initializer, spec: P) -> nnx.Initializer:
    """An initializer that records `spec` as the parameter's sharding metadata.

    eager_sharding=False: the model can be built without a mesh (tests, eval_shape); the trainer
    reads the specs with `nnx.get_partition_spec` and shards under jit.
    """
    return nnx.with_partitioning(init, spec, eager_sharding=False)


def linear(
    d_in: int,
    d_out: int,
    *,
    bias: bool,
    kernel_spec: P,
    bias_spec: P,
    dtype: DType,
    param_dtype: DType,
    rngs: nnx.Rngs,
    std: float = 0.02,
) -> nnx.Linear:
    """nnx.Linear (kernel [d_in, d_out]) with sharding metadata on kernel and bias."""
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(nnx.initializers.normal(std), kernel_spec),
        bias_init=partitioned(nnx.initializers.zeros_init(), bias_spec),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """Qwen RMSNorm: normalise in fp32, cast back to the input dtype, then scale (HF order)."""

    def __init__(self, dim: int, *, eps: float, spec: P, param_dtype: DType):
        self.weight = nnx.Param(partitioned(nnx.initializers.ones_init(), spec)(None, (dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(dtype)
        return self.weight[...].astype(dtype) * normed


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., heads, head_dim]; cos/sin broadcastable to x once a heads axis is added."""
    return x * cos[..., None, :] + rotate_half(x) * sin[..., None, :]


def dot_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, scale: float
) -> jax.Array:
    """Grouped-query attention with an additive bias.

    q [B, S, KV, G, D] (G query heads per kv head), k/v [B, T, KV, D], bias broadcastable to
    [B, KV, G, S, T]. Logits and softmax in fp32 (HF softmaxes in fp32 too), output [B, S, KV, G, D].
    """
    logits = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits + bias, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgst,btkd->bskgd", probs, v)
