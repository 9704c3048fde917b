"""Small building blocks shared by the vision tower and the decoder."""

from __future__ import annotations

import dataclasses
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


class Linear(nnx.Linear):
    """nnx.Linear with an optional low-rank adapter applied to the activations: with `lora_a`
    [d_in, r] and `lora_b` [r, d_out] attached (`attach_adapter`), y = x W + b + s (x A) B, so the
    frozen W gets no weight gradient (the backward contracts into dA and dB directly)."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        y = super().__call__(inputs, out_sharding=out_sharding)
        a = getattr(self, "lora_a", None)
        if a is None:
            return y
        low = jnp.einsum("...i,ir->...r", inputs, a[...].astype(inputs.dtype), preferred_element_type=jnp.float32)
        delta = jnp.einsum("...r,ro->...o", low, self.lora_b[...], preferred_element_type=jnp.float32)
        return (y.astype(jnp.float32) + self.lora_scale * delta).astype(y.dtype)


def attach_adapter(module: nnx.Linear, a: jax.Array, b: jax.Array, scale: float) -> None:
    """Give a `Linear` (or a stacked one: a, b with its leading layer axis) the adapter (a, b)."""
    module.lora_a = nnx.Variable(a)
    module.lora_b = nnx.Variable(b)
    module.lora_scale = float(scale)


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
) -> Linear:
    """`Linear` (kernel [d_in, d_out]) with sharding metadata on kernel and bias."""
    return Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(nnx.initializers.normal(std), kernel_spec),
        bias_init=partitioned(nnx.initializers.zeros_init(), bias_spec),
        rngs=rngs,
    )


def embedding(num: int, dim: int, *, spec: P, dtype: DType, param_dtype: DType, rngs: nnx.Rngs,
              std: float = 0.02) -> nnx.Embed:
    """`nnx.Embed` (table [num, dim], normal(std) init) with sharding metadata on the table."""
    return nnx.Embed(num, dim, dtype=dtype, param_dtype=param_dtype,
                     embedding_init=partitioned(nnx.initializers.normal(std), spec), rngs=rngs)


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


# Cache slots per block of the length-bounded attention: decode reads only the blocks up to the
# last written slot, not the whole bucket.
CACHE_BLOCK = 128


def cached_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, scale: float, limit: jax.Array | None = None
) -> jax.Array:
    """Grouped-query attention over a head-major cache.

    q [B, S, KV, G, D]; k/v [B, KV, T, D]; bias [B, S, T] additive; limit (int32 scalar): slots
    at or past it are empty and skipped. fp32 logits and softmax as `dot_attention`; output
    [B, S, KV, G, D]. The G query heads of a kv head and the S positions are flattened into one
    row axis, so each (batch, kv head) pair is one plain matmul. With a limit and a cache longer
    than one block, the slots are visited block by block (online softmax, as flash attention)
    up to the limit, so a decode step costs the filled length rather than the bucket.
    """
    b, s, kv, g, d = q.shape
    t = k.shape[2]
    rows = q.transpose(0, 2, 3, 1, 4).reshape(b, kv, g * s, d)
    row_bias = jnp.broadcast_to(bias[:, None, None], (b, 1, g, s, t)).reshape(b, 1, g * s, t)

    def unflatten(out):
        return out.reshape(b, kv, g, s, d).transpose(0, 3, 1, 2, 4)

    if limit is None or t <= CACHE_BLOCK or t % CACHE_BLOCK:
        logits = jnp.einsum("bkqd,bktd->bkqt", rows, k, preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(logits + row_bias, axis=-1).astype(v.dtype)
        return unflatten(jnp.einsum("bkqt,bktd->bkqd", probs, v))

    # Slot-major inside a block: the cache block is the left operand of both matmuls (K [T, D]
    # @ q^T, then p [T, q] contracted with V [T, D]); for the few query rows of a decode step
    # XLA:CPU streams that ~4x faster than the q-major `q @ K^T` (docs/benchmarks.md).
    block_bias = row_bias.swapaxes(-1, -2)  # [b, 1, t, q]

    def block(j, carry):
        m, l, acc = carry  # running max, sum of exp, weighted values: [b, kv, q] / [b, kv, q, d]
        start = j * CACHE_BLOCK
        kb = jax.lax.dynamic_slice_in_dim(k, start, CACHE_BLOCK, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(v, start, CACHE_BLOCK, axis=2)
        bb = jax.lax.dynamic_slice_in_dim(block_bias, start, CACHE_BLOCK, axis=2)
        logits = jnp.einsum("bktd,bkqd->bktq", kb, rows, preferred_element_type=jnp.float32) * scale + bb
        m_new = jnp.maximum(m, logits.max(-2))
        p = jnp.exp(logits - m_new[:, :, None])
        rescale = jnp.exp(m - m_new)
        acc = acc * rescale[..., None] + jnp.einsum("bktq,bktd->bkqd", p.astype(v.dtype), vb,
                                                     preferred_element_type=jnp.float32)
        return m_new, l * rescale + p.sum(-2), acc

    init = (jnp.full((b, kv, g * s), -jnp.inf, jnp.float32), jnp.zeros((b, kv, g * s), jnp.float32),
            jnp.zeros((b, kv, g * s, d), jnp.float32))
    n_blocks = jnp.clip((limit + CACHE_BLOCK - 1) // CACHE_BLOCK, 1, t // CACHE_BLOCK)
    _, l, acc = jax.lax.fori_loop(0, n_blocks, block, init)
    return unflatten((acc / l[..., None]).astype(v.dtype))


# ---------------------------------------------------------------------------- stacked layers
# Rematerialisation policies of a layer's backward, by name (MaxText's names): what the forward
# keeps for the backward. "full" keeps only the layer's input (the scan carry) and recomputes the
# rest; "dots_saveable" keeps matmul outputs and recomputes the element-wise work.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat_policy(name: str) -> str:
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {name!r}: use one of {', '.join(REMAT_POLICIES)}")
    return name


def with_remat(fn, policy: str):
    """``fn`` rematerialised in the backward pass under the named policy ("none": as it is)."""
    check_remat_policy(policy)
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy])


@dataclasses.dataclass(frozen=True)
class StackSettings:
    """How a stack of layers (the decoder, a vision tower) is built and run: the compute and
    parameter dtypes, the remat policy per layer (a name of `REMAT_POLICIES`), and whether one
    `lax.scan` runs the layers (False: a Python loop over them, for debugging)."""

    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    remat: str = "none"
    scan_layers: bool = True

    def __post_init__(self):
        check_remat_policy(self.remat)

    def keep(self, module: nnx.Module) -> None:
        """Set `module.dtype`, `.remat` and `.scan_layers` (what the stack's forward pass reads)."""
        module.dtype, module.remat, module.scan_layers = self.dtype, self.remat, self.scan_layers


def stacked(make, n: int, rngs: nnx.Rngs):
    """``n`` modules ``make(rngs)`` as one module whose parameters carry a leading layer axis
    ``[n, ...]`` (sharding metadata gains a leading ``None``), each layer with its own init key."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def create(r):
        return make(r)

    return create(rngs)


def layer_count(stack: nnx.Module) -> int:
    return jax.tree.leaves(nnx.state(stack))[0].shape[0]


def layer_view(stack: nnx.Module, index: int | slice) -> nnx.Module:
    """Layer ``index`` of a stacked module as a module of its own (a slice, not a copy of the
    graph): for the unrolled path, tests and the per-layer parity checks."""
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))


def run_layers(stack: nnx.Module, body, carry, xs=None, *, scan: bool = True, remat: str = "none"):
    """Run ``body(layer, carry, x) -> (carry, y)`` over the layers of a stacked module.

    scan: one ``lax.scan`` over the layer axis, so XLA compiles one layer whatever the depth;
    False: a Python loop over layer views (every layer compiled; for debugging). Both read the
    same stacked parameters and give the same numbers. xs / ys: per-layer inputs and outputs
    with a leading layer axis (or None). remat: a name in ``REMAT_POLICIES``, applied per layer.
    """
    graphdef, state = nnx.split(stack)

    def step(c, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    step = with_remat(step, remat)
    if scan:
        return jax.lax.scan(step, carry, (state, xs))
    n = jax.tree.leaves(state)[0].shape[0]
    ys = []
    for i in range(n):
        carry, y = step(carry, jax.tree.map(lambda a: a[i], (state, xs)))
        ys.append(y)
    if all(y is None for y in ys):
        return carry, None
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
