"""Decoder weights packed for skinny matmuls: the decode-time layout of the text model.

A decode step multiplies a handful of rows (one token per sequence) by every weight matrix, so
it is bound by how fast the kernels stream the weights. On XLA:CPU that depends on the layout and
on which operand is the left one: a kernel stored ``[out, in]`` (contraction dim minor, the
Hugging Face layout) and multiplied as ``W @ x^T`` streams at ~1.6x the rate of the trained
layout ``x @ W`` with ``W [in, out]`` (``bench/generate_vs_transformers.py`` and the numbers in
the README). Packing also fuses q/k/v into one matmul and gate/up into another, so a layer runs
four weight matmuls instead of seven.

Packing copies the weights, so it is for backends where that pays (CPU); on GPU/TPU the sampler
uses the model's own kernels (``SamplerConfig.packed_weights``). LoRA is already merged when a
trainer builds the model it samples with, so packing sees plain kernels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Up to this many rows, the weight is the left operand (streaming it); above it (prefill of long
# chunks) the usual `x @ W^T` is as fast and needs no transpose of a large output.
SKINNY_ROWS = 64


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedLayer:
    """One decoder layer: kernels ``[out, in]`` in the compute dtype."""

    qkv: jax.Array  # [(heads + 2 kv_heads) * head_dim, D]: q, k, v rows stacked
    qkv_bias: jax.Array  # [(heads + 2 kv_heads) * head_dim]
    o: jax.Array  # [D, heads * head_dim]
    gate_up: jax.Array  # [2 F, D]: gate rows, then up rows
    down: jax.Array  # [D, F]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedText:
    layers: tuple[PackedLayer, ...]
    lm_head: jax.Array  # [vocab, D] (the embedding itself when tied)


def packed_matmul(x: jax.Array, w_out_in: jax.Array, out_dtype=None) -> jax.Array:
    """x [..., in] @ w_out_in.T -> [..., out], with the weight as the left operand for few rows;
    out_dtype: the accumulation/output dtype (default: the inputs')."""
    lead, d_in = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, d_in)
    if rows.shape[0] <= SKINNY_ROWS:
        # The barrier keeps XLA from folding the transpose into the dot's output layout, which
        # would select the slow `x @ W` kernel again.
        out = jax.lax.optimization_barrier(jnp.einsum("od,nd->on", w_out_in, rows, preferred_element_type=out_dtype)).T
    else:
        out = jnp.einsum("nd,od->no", rows, w_out_in, preferred_element_type=out_dtype)
    return out.reshape(*lead, w_out_in.shape[0])


def pack_text(model) -> PackedText:
    """The packed copy of a `Qwen25VL`'s decoder weights (call under `jax.jit`): one
    `PackedLayer` per layer, cut from the stacked kernels once, so a decode step reads each
    layer's packed weights as arrays of their own."""
    lm = model.language_model
    dtype = lm.dtype
    attn, mlp = lm.layers.self_attn, lm.layers.mlp

    def t(linear) -> jax.Array:  # stacked [L, in, out] -> [L, out, in]
        return linear.kernel[...].astype(dtype).swapaxes(-1, -2)

    qkv = jnp.concatenate([t(attn.q_proj), t(attn.k_proj), t(attn.v_proj)], axis=1)
    # Qwen3 has no q/k/v biases: zeros keep one packed layout for both families.
    def bias(linear) -> jax.Array:  # stacked [L, out]
        return linear.bias[...] if linear.bias is not None else jnp.zeros(t(linear).shape[:-1], dtype)

    qkv_bias = jnp.concatenate([bias(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)], axis=-1).astype(dtype)
    o, down = t(attn.o_proj), t(mlp.down_proj)
    gate_up = jnp.concatenate([t(mlp.gate_proj), t(mlp.up_proj)], axis=1)
    layers = tuple(PackedLayer(qkv=qkv[i], qkv_bias=qkv_bias[i], o=o[i], gate_up=gate_up[i], down=down[i])
                   for i in range(lm.cfg.num_hidden_layers))
    if model.config.tie_word_embeddings:
        head = lm.embed_tokens.embedding[...].astype(dtype)
    else:
        head = model.lm_head[...].astype(dtype).T
    return PackedText(layers, head)
