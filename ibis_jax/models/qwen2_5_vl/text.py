"""The Qwen2 decoder of Qwen2.5-VL: GQA with q/k/v biases, multimodal RoPE, RMSNorm, SwiGLU.

The same classes run the Qwen3 decoder of Qwen3-VL, switched by the text config's `qkv_bias`
(False), `qk_norm` (per-head RMSNorm on q and k before RoPE) and `mrope_interleaved` (t/h/w
frequency bands interleaved), plus DeepStack: visual features added to the hidden states after
the first decoder layers (`TextModel.__call__(..., deepstack=...)`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from ibis_jax.models.attention import causal_attention

from .config import ShardingConfig, TextConfig
from .layers import (MASK_VALUE, DType, RMSNorm, StackSettings, apply_rope, cached_attention, embedding, linear,
                     run_layers, stacked)
from .packed import PackedLayer, packed_matmul


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values of every decoder layer for `max_len` slots, stacked like the layers.

    k, v [layers, batch, kv_heads, max_len, head_dim] (head-major: a decode step reads each head's
    slots contiguously, no per-step transpose of the cache); `end` (int32 scalar) is the first free
    slot: a call with S new tokens writes slots [end, end + S) and returns a cache with end + S.
    """

    k: jax.Array
    v: jax.Array
    end: jax.Array

    @classmethod
    def init(cls, cfg: TextConfig, batch: int, max_len: int, dtype: DType = jnp.float32) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def mrope_axis_of_band(sections: tuple[int, int, int], interleaved: bool) -> np.ndarray:
    """Which position axis (0 t, 1 h, 2 w) drives each of the sum(sections) frequency bands."""
    if not interleaved:
        return np.repeat(np.arange(3) % 3, sections)
    band = np.arange(sum(sections))
    axis = np.zeros_like(band)
    axis[(band % 3 == 1) & (band < 3 * sections[1])] = 1
    axis[(band % 3 == 2) & (band < 3 * sections[2])] = 2
    return axis


def mrope_cos_sin(
    position_ids: jax.Array, cfg: TextConfig, dtype: DType
) -> tuple[jax.Array, jax.Array]:
    """position_ids [3, B, S] (temporal, height, width) -> cos, sin [B, S, head_dim] in `dtype`.

    Frequency band i of the half head_dim takes its position from axis 0/1/2 according to
    `mrope_section` (e.g. 16 temporal, 24 height, 24 width bands), as HF's Qwen2_5_VLRotaryEmbedding:
    contiguous bands, or with `cfg.mrope_interleaved` (Qwen3-VL) bands cycling t, h, w
    (band i is h if i % 3 == 1 and i < 3 * sections[1], w if i % 3 == 2 and i < 3 * sections[2],
    else t). The angle product stays in fp32 (positions reach 1e5; bf16 angles would be useless).
    """
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
    axis_of_band = mrope_axis_of_band(cfg.mrope_section, cfg.mrope_interleaved)  # [half]
    pos = position_ids.astype(jnp.float32)  # [3, B, S]
    pos_per_band = jnp.take(pos, jnp.asarray(axis_of_band), axis=0)  # [half, B, S]
    freqs = jnp.moveaxis(pos_per_band, 0, -1) * jnp.asarray(inv_freq[:half])  # [B, S, half]
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)


def add_deepstack(h: jax.Array, deepstack: jax.Array, index: jax.Array) -> jax.Array:
    """h [B, S, D] after decoder layer `index` (traced under scan) plus deepstack[index] when
    index < n (deepstack [n, B, S, D]); later layers add nothing (HF `_deepstack_process`)."""
    n = deepstack.shape[0]
    add = jax.lax.dynamic_index_in_dim(deepstack, jnp.minimum(index, n - 1), 0, keepdims=False)
    return h + jnp.where(index < n, add.astype(h.dtype), jnp.zeros((), h.dtype))


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, sh: ShardingConfig, dtype: DType, param_dtype: DType, rngs: nnx.Rngs,
                 attention: str = "xla"):
        d, dh = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, std=cfg.initializer_range)
        bias = cfg.qkv_bias
        self.q_proj = linear(d, cfg.num_attention_heads * dh, bias=bias, kernel_spec=sh.q_weight_dq,
                             bias_spec=sh.qkv_bias_q, **kw)
        self.k_proj = linear(d, cfg.num_key_value_heads * dh, bias=bias, kernel_spec=sh.kv_weight_dk,
                             bias_spec=sh.qkv_bias_q, **kw)
        self.v_proj = linear(d, cfg.num_key_value_heads * dh, bias=bias, kernel_spec=sh.kv_weight_dk,
                             bias_spec=sh.qkv_bias_q, **kw)
        self.o_proj = linear(cfg.num_attention_heads * dh, d, bias=False, kernel_spec=sh.o_weight_qd,
                             bias_spec=sh.qkv_bias_q, **kw)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's q and k, before RoPE
            self.q_norm = RMSNorm(dh, eps=cfg.rms_norm_eps, spec=sh.head_norm_h, param_dtype=param_dtype)
            self.k_norm = RMSNorm(dh, eps=cfg.rms_norm_eps, spec=sh.head_norm_h, param_dtype=param_dtype)
        self.qk_norm = cfg.qk_norm
        self.kv_heads = cfg.num_key_value_heads
        self.groups = cfg.num_attention_heads // cfg.num_key_value_heads
        self.head_dim = dh
        self.attention = attention  # the full-forward backend (`models.attention`)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        bias: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None = None,
        kv_end: jax.Array | None = None,
        packed: PackedLayer | None = None,
        layer_index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, S, D]; cos/sin [B, S, head_dim]; bias: without a cache the segment ids int32
        [B, S] of `models.attention` (0 = padding), with one an additive [B, S, T] over the cache
        slots; kv: this layer's cache (k, v) [B, KV, T, head_dim] written at slot kv_end, or,
        with `layer_index`, every layer's stacked cache [L, B, KV, T, head_dim] updated in place at
        that layer (a scan over layers carries the whole cache, so no per-layer copy is made);
        packed: this layer's decode-packed weights, used instead of the module's kernels.
        Returns ([B, S, D], updated (k, v) or None)."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x, packed)
        q = q.reshape(b, s, -1, self.head_dim)
        k = k.reshape(b, s, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        v = v.reshape(b, s, self.kv_heads, self.head_dim)
        if kv is None:
            out = causal_attention(q, k, v, bias, scale=self.head_dim**-0.5, backend=self.attention)
        else:
            q = q.reshape(b, s, self.kv_heads, self.groups, self.head_dim)
            zero = jnp.zeros((), jnp.int32)
            end = jnp.asarray(kv_end, jnp.int32)
            if layer_index is None:
                start = (zero, zero, end, zero)
                k = jax.lax.dynamic_update_slice(kv[0], k.swapaxes(1, 2).astype(kv[0].dtype), start)
                v = jax.lax.dynamic_update_slice(kv[1], v.swapaxes(1, 2).astype(kv[1].dtype), start)
                kv = (k, v)
            else:
                start = (jnp.asarray(layer_index, jnp.int32), zero, zero, end, zero)
                kv = tuple(jax.lax.dynamic_update_slice(c, new.swapaxes(1, 2)[None].astype(c.dtype), start)
                           for c, new in zip(kv, (k, v)))
                k, v = (jax.lax.dynamic_index_in_dim(c, start[0], 0, keepdims=False) for c in kv)
            out = cached_attention(q, k.astype(x.dtype), v.astype(x.dtype), bias, self.head_dim**-0.5,
                                   limit=end + s)
        out = out.reshape(b, s, -1)
        return (self.o_proj(out) if packed is None else packed_matmul(out, packed.o)), kv

    def _qkv(self, x: jax.Array, packed: PackedLayer | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        if packed is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        qkv = packed_matmul(x, packed.qkv) + packed.qkv_bias
        n_q, n_kv = self.kv_heads * self.groups * self.head_dim, self.kv_heads * self.head_dim
        return qkv[..., :n_q], qkv[..., n_q:n_q + n_kv], qkv[..., n_q + n_kv:]


class MLP(nnx.Module):
    """SwiGLU. mlp_chunk > 0: the full forward runs it over `mlp_chunk` sequence positions at a
    time, each chunk rematerialised, so one layer's backward holds [B, mlp_chunk, F] of MLP
    activations instead of [B, S, F] (at 7B, S 1280 and 24 rows a chip: 1.1 GiB per copy)."""

    def __init__(self, cfg: TextConfig, sh: ShardingConfig, dtype: DType, param_dtype: DType, rngs: nnx.Rngs,
                 mlp_chunk: int = 0):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.mlp_chunk = mlp_chunk
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs, std=cfg.initializer_range,
                  bias_spec=sh.qkv_bias_q)
        self.gate_proj = linear(d, f, kernel_spec=sh.mlp_up_df, **kw)
        self.up_proj = linear(d, f, kernel_spec=sh.mlp_up_df, **kw)
        self.down_proj = linear(f, d, kernel_spec=sh.mlp_down_fd, **kw)

    def __call__(self, x: jax.Array, packed: PackedLayer | None = None) -> jax.Array:
        if packed is not None:
            gate, up = jnp.split(packed_matmul(x, packed.gate_up), 2, axis=-1)
            return packed_matmul(jax.nn.silu(gate) * up, packed.down)
        mlp = lambda h: self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))
        b, s, d = x.shape
        c = self.mlp_chunk
        if not c or s <= c or s % c:
            return mlp(x)
        chunks = x.reshape(b, s // c, c, d).swapaxes(0, 1)  # [S / c, B, c, D]: the row axis keeps its sharding
        out = jax.lax.map(jax.checkpoint(mlp), chunks)
        return out.swapaxes(0, 1).reshape(b, s, d)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, sh: ShardingConfig, dtype: DType, param_dtype: DType, rngs: nnx.Rngs,
                 attention: str = "xla", mlp_chunk: int = 0):
        self.self_attn = Attention(cfg, sh, dtype, param_dtype, rngs, attention)
        self.mlp = MLP(cfg, sh, dtype, param_dtype, rngs, mlp_chunk)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, spec=sh.norm_d, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, spec=sh.norm_d, param_dtype=param_dtype
        )

    def __call__(
        self, x: jax.Array, *args: Any, packed: PackedLayer | None = None, **kwargs: Any
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Pre-norm residual block: `Attention.__call__` on the normed `x` with the other arguments
        (cos, sin, bias, the cache, layer_index), then the MLP; packed: this layer's decode-packed
        weights for both."""
        h, kv = self.self_attn(self.input_layernorm(x), *args, packed=packed, **kwargs)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), packed), kv


class TextModel(nnx.Module):
    """Embedding, decoder layers and final norm (HF `model.language_model`).

    The decoder layers are one stacked module (`layers`: every parameter [num_layers, ...]) run
    by a `lax.scan`, so XLA compiles one layer whatever the depth; `scan_layers=False` runs the
    same parameters layer by layer (debugging). remat: a policy name of `layers.REMAT_POLICIES`.
    """

    def __init__(
        self,
        cfg: TextConfig,
        sh: ShardingConfig,
        stack: StackSettings,
        *,
        attention: str = "xla",
        mlp_chunk: int = 0,
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        dtype, param_dtype = stack.dtype, stack.param_dtype
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, spec=sh.emb_vd, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs, std=cfg.initializer_range)
        self.layers = stacked(lambda r: DecoderLayer(cfg, sh, dtype, param_dtype, r, attention, mlp_chunk),
                              cfg.num_hidden_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, spec=sh.norm_d, param_dtype=param_dtype)
        self.act_spec = sh.act_btd
        stack.keep(self)

    def _constrain(self, x: jax.Array) -> jax.Array:
        # Activation sharding [batch, seq, d]; a no-op unless the spec names mesh axes, in which
        # case the caller runs under `jax.set_mesh(mesh)`.
        if self.act_spec == P():
            return x
        return jax.lax.with_sharding_constraint(x, self.act_spec)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        position_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        deepstack: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """inputs_embeds [B, S, D]; position_ids [3, B, S]; attention_mask [B, S] (no cache) or
        [B, max_len] over cache slots (with cache; 1 = a real token) -> (normed hidden [B, S, D], cache).
        deepstack [n, B, S, D] (Qwen3-VL): added to the hidden states after decoder layer i < n
        (visual features at the image tokens, zeros elsewhere)."""
        x = inputs_embeds.astype(self.dtype)
        b, s, _ = x.shape
        cos, sin = mrope_cos_sin(position_ids, self.cfg, self.dtype)
        x = self._constrain(x)
        if cache is None:
            # Segment ids (1 real, 0 padding): the attention backend builds its own mask.
            segments = jnp.ones((b, s), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)

            def layer_step(layer, h, index):
                h, _ = layer(h, cos, sin, segments)
                if deepstack is not None:  # Qwen3-VL: visual features added after the first layers
                    h = add_deepstack(h, deepstack, index)
                return self._constrain(h), None

            x, _ = run_layers(self.layers, layer_step, x, jnp.arange(self.cfg.num_hidden_layers),
                              scan=self.scan_layers, remat=self.remat)
        else:
            offset, t = cache.end, cache.k.shape[3]
            key_valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
            q_slot = offset + jnp.arange(s)
            allowed = (jnp.arange(t)[None, :] <= q_slot[:, None])[None] & key_valid[:, None, :]  # [B, S, T]
            bias = jnp.where(allowed, 0.0, MASK_VALUE).astype(jnp.float32)

            def cached_step(layer, carry, index):
                h, k, v = carry
                h, (k, v) = layer(h, cos, sin, bias, (k, v), offset, layer_index=index)
                if deepstack is not None:
                    h = add_deepstack(h, deepstack, index)
                return (self._constrain(h), k, v), None

            (x, k, v), _ = run_layers(self.layers, cached_step, (x, cache.k, cache.v),
                                      jnp.arange(self.cfg.num_hidden_layers), scan=self.scan_layers)
            cache = KVCache(k, v, cache.end + s)
        return self.norm(x), cache
