"""Causal self-attention of the decoder's full forward (training, scoring, prefill without a
cache), through one function with backends:

- ``xla``: the reference maths (fp32 scores and softmax as Hugging Face's eager attention), with
  the causal and segment mask applied as a boolean where, never a materialised fp32 bias;
- ``dot_product``: ``jax.nn.dot_product_attention`` (cuDNN's fused flash attention on GPUs; XLA
  elsewhere);
- ``splash``: the Pallas splash-attention kernel on TPUs (flash attention with a causal block-
  sparse mask and segment ids), inside ``jax.shard_map`` over the batch and head axes of the mesh
  (Mosaic kernels cannot be partitioned automatically).

``auto`` picks splash on TPU, dot_product on GPU, xla on CPU (`resolve_backend`, from the platform
the program is built for: ``ibis-jax plan`` compiles TPU programs on a CPU host).

Masking: ``segments`` int32 [B, S] (0 = padding). A token attends to earlier tokens of its own
segment: one id per packed sequence, and padding (0) attends padding only, so no row is ever fully
masked and every output stays finite. Real tokens never see padding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# splash_interpret: the splash kernel in Pallas interpret mode (any platform; tests)
BACKENDS = ("auto", "xla", "dot_product", "splash", "splash_interpret")
# Large finite negative: masked scores vanish in the softmax without infinities.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
SPLASH_BLOCK = 128  # splash tiles; sequences not a multiple of it use the XLA path


def resolve_backend(name: str, platform: str) -> str:
    """The backend `name` means on `platform` ("cpu" / "gpu" / "cuda" / "tpu")."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: use one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    return {"tpu": "splash", "gpu": "dot_product", "cuda": "dot_product", "rocm": "dot_product"}.get(platform, "xla")


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, scale: float,
                     backend: str = "xla") -> jax.Array:
    """q [B, S, H, D]; k, v [B, S, KV, D] (H a multiple of KV: grouped-query attention);
    segments int32 [B, S] -> [B, S, H, D] in v's dtype."""
    if backend in ("splash", "splash_interpret") and q.shape[1] % SPLASH_BLOCK == 0:
        return _splash(q, k, v, segments, scale, interpret=backend == "splash_interpret")
    if backend == "dot_product":
        return _dot_product(q, k, v, segments, scale)
    return _xla(q, k, v, segments, scale)


def allowed_mask(segments: jax.Array) -> jax.Array:
    """bool [B, S, S]: query i may attend key j (j <= i, same segment)."""
    s = segments.shape[1]
    causal = jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]
    return causal[None] & (segments[:, :, None] == segments[:, None, :])


def _xla(q, k, v, segments, scale):
    b, s, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, s, kv, h // kv, d)
    logits = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(allowed_mask(segments)[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(b, s, h, d)


def _dot_product(q, k, v, segments, scale):
    mask = allowed_mask(segments)[:, None]  # [B, 1, S, T]
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=scale)
    return out.astype(v.dtype)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, seq: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((seq, seq)) for _ in range(heads)])
    block = sk.BlockSizes(block_q=SPLASH_BLOCK, block_kv=SPLASH_BLOCK, block_kv_compute=SPLASH_BLOCK,
                          block_q_dkv=SPLASH_BLOCK, block_kv_dkv=SPLASH_BLOCK, block_kv_dkv_compute=SPLASH_BLOCK,
                          block_q_dq=SPLASH_BLOCK, block_kv_dq=SPLASH_BLOCK)
    return sk.make_splash_mha(mask, block_sizes=block, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, segments, scale, interpret: bool = False):
    """Splash attention per batch row, each device running its rows and heads (shard_map over the
    context mesh: batch over data x fsdp, heads over tensor where they divide)."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    mesh = jax.sharding.get_abstract_mesh()
    shape = dict(mesh.shape) if mesh is not None and mesh.shape else {}
    b, s, h, d = q.shape
    kv = k.shape[2]
    batch_axes = tuple(a for a in ("data", "fsdp") if shape.get(a, 1) > 1)
    ways = 1
    for a in batch_axes:
        ways *= shape[a]
    batch_spec = batch_axes if batch_axes and b % ways == 0 else None
    tensor = shape.get("tensor", 1)
    head_spec = "tensor" if tensor > 1 and kv % tensor == 0 else None

    def local(q, k, v, segments):
        hl, kvl = q.shape[2], k.shape[2]
        kernel = _splash_kernel(hl, s, interpret)
        qh = (q * scale).astype(q.dtype).transpose(0, 2, 1, 3)  # [b, H, S, D]
        kh, vh = (x.astype(q.dtype).transpose(0, 2, 1, 3) for x in (k, v))
        del kvl
        run = lambda qq, kk, vv, seg: kernel(qq, kk, vv, segment_ids=SegmentIds(q=seg, kv=seg))
        return jax.vmap(run)(qh, kh, vh, segments).transpose(0, 2, 1, 3).astype(v.dtype)

    if not shape:
        return local(q, k, v, segments)
    spec = P(batch_spec, None, head_spec, None)
    return jax.shard_map(local, in_specs=(spec, spec, spec, P(batch_spec, None)), out_specs=spec,
                         check_vma=False)(q, k, v, segments)


__all__ = ["BACKENDS", "resolve_backend", "causal_attention", "allowed_mask"]
