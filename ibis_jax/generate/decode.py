"""The sampler's device programs: the decode state, the cached forward and the jitted calls.

Layout. One `DecodeState` holds a batch of conversations: per decoder layer a preallocated cache
k/v [B, kv_heads, T, head_dim] (head-major, the model's `KVCache` layout), `slot_valid` [B, T]
(which cache slots hold real tokens), `end` (the first free slot, shared by the batch),
`next_pos` [B] (the mRoPE position of each row's next text token) and the next-token `logits`
[B, V]. Every call appends a chunk of S slots at `end`: prompts and new user turns are
*left-padded* to S per row, padding slots stay invalid, so rows of different lengths share one
`end` and attention simply masks the holes.

The cached forward calls the model's own modules (embedding, decoder layers with their
`kv`/`kv_end` arguments, final norm, LM head): one set of parameters serves training and sampling,
for either policy family (`VisionLanguageModel`; Qwen3-VL's DeepStack features are added after
the first decoder layers at the image tokens of a prefill chunk). On CPU the decoder's kernels are
first packed for skinny matmuls (`models.qwen2_5_vl.packed`: a transposed, q/k/v- and
gate/up-fused copy, the layers' `packed` argument), which decodes ~1.3-1.4x faster there
(bench/generate_vs_transformers.py).

The programs: `_encode_images` (the vision tower), `_extend` (prefill / continuation), `_decode`
(the while-loop decode, which feeds every sampled token back so the cache holds the whole turn),
`_seed_prefix` (copy a cached text prefix into every row). `ibis-jax plan` compiles the same
ones for TPU/GPU targets on `empty_decode_state(..., abstract=True)`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ibis_jax.models.logits import suppress
from ibis_jax.models.qwen2_5_vl.layers import MASK_VALUE, layer_view, run_layers
from ibis_jax.models.qwen2_5_vl.packed import PackedText, pack_text, packed_matmul
from ibis_jax.models.qwen2_5_vl.text import add_deepstack, mrope_cos_sin
from ibis_jax.models.qwen2_5_vl.vlm import VisionLanguageModel

STOP_REASONS = ("", "eos", "stop_string", "max_tokens")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Decoding options (hashable: part of the decode compile key).

    temperature 0 = greedy. top_k 0 = off; top_p 1.0 = off. eos_token_ids None = the tokenizer's
    eos plus the model config's. Buckets: the padded sizes of batch, chunk (prompt or new turn)
    and cache; a length beyond the last bucket is rounded up to a multiple of it.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    # A click turn is complete at the ``</action>`` after its point's ")"; a terminate goes on to
    # its ``<answer>`` (a bare "</action>" stop would cut every answer off and fail the format
    # reward on every terminate). Well-trained turns end at EOS (``<|im_end|>``) anyway.
    stop_strings: tuple[str, ...] = (")\n</action>", "</answer>")
    eos_token_ids: tuple[int, ...] | None = None
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    chunk_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
    cache_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
    visual_buckets: tuple[int, ...] = (64, 256, 1024, 4096, 16384)
    # Decode with a packed copy of the decoder weights (see the module docstring). None: on a
    # CPU backend without a multi-device mesh, where it pays; the copy costs weight memory.
    packed_weights: bool | None = None
    # Token ids never sampled (their logits are set to SUPPRESSED first; the sampling log-probs
    # are of that distribution, the model log-probs are not). `ModelPolicy` suppresses the
    # model's multimodal placeholders.
    suppress_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplerConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplerConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError("SamplerConfig.top_k must be >= 0 and max_new_tokens >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """A batch of cached conversations (see the module docstring). B and T are bucketed."""

    # Per layer [B, kv_heads, T, head_dim] (a tuple: the unrolled / packed-weight path) or all
    # layers stacked [L, B, kv_heads, T, head_dim] (the scanned path). Either way the slot axis is
    # -2 and the row axis -4, so cache edits are written once for both (`jax.tree.map`).
    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    slot_valid: jax.Array  # bool [B, T]
    end: jax.Array  # int32 []: first free slot
    next_pos: jax.Array  # int32 [B]: mRoPE position of each row's next text token
    logits: jax.Array  # float32 [B, V]: next-token logits

    @property
    def batch(self) -> int:
        return self.slot_valid.shape[0]

    @property
    def max_len(self) -> int:
        return self.slot_valid.shape[1]


def _constrain(x: jax.Array, spec: P | None) -> jax.Array:
    return x if spec is None or spec == P() else jax.lax.with_sharding_constraint(x, spec)


def _forward_chunk(
    model: VisionLanguageModel,
    state: DecodeState,
    embeds: jax.Array,
    positions: jax.Array,
    chunk_valid: jax.Array,
    cache_spec: P | None,
    packed: PackedText | None,
    deepstack: jax.Array | None = None,
) -> tuple[DecodeState, jax.Array]:
    """Append a chunk at `state.end`: embeds [B, S, D], positions [3, B, S], chunk_valid bool
    [B, S]; packed: the decoder's packed weights or None; deepstack [n, B, S, D] (Qwen3-VL's
    visual features added after decoder layer i < n) or None. Returns (state with
    k/v/slot_valid/end updated, final-normed hidden [B, S, D]).

    Mirrors `TextModel.__call__` with a cache. A stacked cache runs the layers as one scan that
    carries the whole cache and updates each layer's slots in place; a per-layer cache (the
    packed-weight CPU path) runs them one by one, each layer's donated buffer updated in place."""
    lm = model.language_model
    x = embeds.astype(lm.dtype)
    s = x.shape[1]
    t = state.max_len
    cos, sin = mrope_cos_sin(positions, lm.cfg, lm.dtype)
    slot_valid = jax.lax.dynamic_update_slice(state.slot_valid, chunk_valid, (jnp.int32(0), state.end))
    q_slot = state.end + jnp.arange(s)
    allowed = (jnp.arange(t)[None, :] <= q_slot[:, None])[None] & slot_valid[:, None, :]  # [B, S, T]
    bias = jnp.where(allowed, 0.0, MASK_VALUE).astype(jnp.float32)
    act_spec = lm.act_spec
    x = _constrain(x, act_spec)
    if isinstance(state.k, tuple):
        ks, vs = [], []
        for i in range(len(state.k)):
            layer = layer_view(lm.layers, i)
            x, (k, v) = layer(x, cos, sin, bias, (state.k[i], state.v[i]), state.end,
                              packed=None if packed is None else packed.layers[i])
            if deepstack is not None and i < deepstack.shape[0]:
                x = x + deepstack[i]
            ks.append(_constrain(k, cache_spec))
            vs.append(_constrain(v, cache_spec))
            x = _constrain(x, act_spec)
        k, v = tuple(ks), tuple(vs)
    else:
        layer_spec = None if cache_spec is None else P(None, *cache_spec)

        def step(layer, carry, index):
            h, k, v = carry
            h, (k, v) = layer(h, cos, sin, bias, (k, v), state.end, layer_index=index)
            if deepstack is not None:
                h = add_deepstack(h, deepstack, index)
            return (_constrain(h, act_spec), _constrain(k, layer_spec), _constrain(v, layer_spec)), None

        (x, k, v), _ = run_layers(lm.layers, step, (x, state.k, state.v), jnp.arange(state.k.shape[0]))
    x = lm.norm(x)
    new = dataclasses.replace(state, k=k, v=v, slot_valid=slot_valid, end=state.end + s)
    return new, x


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_images(graphdef, params, pixel_values, layout):
    """(visual tokens [N, D], DeepStack features [n, N, D] or None) of the images."""
    model = nnx.merge(graphdef, params)
    return model.image_features(pixel_values, layout)


def _logits(model: VisionLanguageModel, hidden: jax.Array, packed: PackedText | None) -> jax.Array:
    """hidden [B, D] -> float32 logits [B, V]."""
    if packed is None:
        return model.logits(hidden).astype(jnp.float32)
    return packed_matmul(hidden, packed.lm_head, jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _pack(graphdef, params) -> PackedText:
    return pack_text(nnx.merge(graphdef, params))


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_spec"), donate_argnames=("state",))
def _extend(graphdef, params, packed, state: DecodeState, input_ids, chunk_valid, positions, next_pos, features,
            cache_spec, deepstack=None):
    """Prefill / continuation: append the chunk, set next_pos, logits of each row's last slot.
    features [N, D] (N >= the chunk's image tokens, padded) or None; deepstack [n, N, D] or None."""
    model = nnx.merge(graphdef, params)
    embeds = model.language_model.embed_tokens(input_ids)
    if features is not None:
        embeds, deepstack = model.scatter_images(input_ids, embeds, features, deepstack)
    state, hidden = _forward_chunk(model, state, embeds, positions, chunk_valid, cache_spec, packed, deepstack)
    logits = _logits(model, hidden[:, -1], packed)  # left padding: the last slot is every row's last token
    return dataclasses.replace(state, next_pos=next_pos, logits=logits)


def _sample(logits: jax.Array, keys: jax.Array, cfg: SamplerConfig) -> tuple[jax.Array, jax.Array]:
    """logits float32 [B, V], keys [B] -> (token int32 [B], log-prob under the sampling
    distribution float32 [B])."""
    logits = suppress(logits, cfg.suppress_token_ids)
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape[0], jnp.float32)
    x = logits / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, cfg.top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if cfg.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (ties at the
        # threshold kept; the most likely token is always kept).
        sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = before < cfg.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, -jnp.inf, x)
    token = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), token[:, None], axis=-1)[:, 0]
    return token, logp


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "cache_spec"), donate_argnames=("state",))
def _decode(graphdef, params, packed, state: DecodeState, key, row_live, stop_table, eos_ids, cfg: SamplerConfig,
            cache_spec):
    """The while-loop decode. row_live bool [B] (False for batch padding); stop_table int32
    [states, V]; eos_ids int32 [E]. Returns (state, tokens int32 [B, M], logp [B, M],
    model_logp [B, M], lengths int32 [B] (tokens up to and including the stop token),
    reason int32 [B] indexing STOP_REASONS)."""
    model = nnx.merge(graphdef, params)
    b, m = state.batch, cfg.max_new_tokens
    match_state = stop_table.shape[0] - 1
    row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(b))
    zeros_f = jnp.zeros((b, m), jnp.float32)

    def body(carry):
        i, st, tokens, logp, model_logp, done, reason, stop_q, lengths = carry
        live = ~done
        keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(row_keys)
        token, lp = _sample(st.logits, keys, cfg)
        mlp = jnp.take_along_axis(jax.nn.log_softmax(st.logits, axis=-1), token[:, None], axis=-1)[:, 0]
        tokens = tokens.at[:, i].set(jnp.where(live, token, 0))
        logp = logp.at[:, i].set(jnp.where(live, lp, 0.0))
        model_logp = model_logp.at[:, i].set(jnp.where(live, mlp, 0.0))
        stop_q = stop_table[stop_q, token]
        hit_stop = stop_q == match_state
        hit_eos = jnp.isin(token, eos_ids)
        hit_len = i + 1 >= m
        new_reason = jnp.where(hit_eos, 1, jnp.where(hit_stop, 2, jnp.where(hit_len, 3, 0)))
        reason = jnp.where(live & (reason == 0), new_reason, reason)
        # Feed the token back even on the last step: the cache then holds the whole turn.
        pos = jnp.broadcast_to(st.next_pos[None, :, None], (3, b, 1))
        embeds = model.language_model.embed_tokens(token[:, None])
        st, hidden = _forward_chunk(model, st, embeds, pos, live[:, None], cache_spec, packed)
        logits = _logits(model, hidden[:, -1], packed)
        st = dataclasses.replace(st, logits=logits, next_pos=st.next_pos + live.astype(jnp.int32))
        done = done | (reason != 0)
        return i + 1, st, tokens, logp, model_logp, done, reason, stop_q, lengths + live.astype(jnp.int32)

    def cond(carry):
        i, done = carry[0], carry[5]
        return (i < m) & ~jnp.all(done)

    init = (jnp.int32(0), state, jnp.zeros((b, m), jnp.int32), zeros_f, zeros_f, ~row_live,
            jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.int32))
    _, state, tokens, logp, model_logp, _, reason, _, lengths = jax.lax.while_loop(cond, body, init)
    return state, tokens, logp, model_logp, lengths, reason


@functools.partial(jax.jit, donate_argnames=("state",))
def _seed_prefix(state: DecodeState, prefix_k, prefix_v, prefix_valid, prefix_next):
    """Copy a cached prefix (k/v [..., 1, KV, P, D] as the state's, valid [P], its next position)
    into slots [0, P) of every row of an empty `state`; `end` becomes P."""
    p = prefix_valid.shape[0]

    def put(x, y):
        rows = y.shape[:-4] + (x.shape[-4],) + y.shape[-3:]
        return x.at[..., :p, :].set(jnp.broadcast_to(y, rows).astype(x.dtype))

    return dataclasses.replace(
        state, k=jax.tree.map(put, state.k, prefix_k), v=jax.tree.map(put, state.v, prefix_v),
        slot_valid=state.slot_valid.at[:, :p].set(prefix_valid[None]),
        end=jnp.asarray(p, jnp.int32), next_pos=jnp.full_like(state.next_pos, prefix_next))


def empty_decode_state(cfg, dtype, batch: int, max_len: int, *, stacked: bool, mesh=None, spec: P | None = None,
                       abstract: bool = False) -> DecodeState:
    """An empty `DecodeState` (the sampler's, and what `ibis-jax plan` compiles against): k/v of
    `cfg.num_hidden_layers` layers, stacked or per layer, sharded by `spec` [B, KV, T, head_dim]
    on `mesh`; abstract: `ShapeDtypeStruct`s with those shardings (nothing allocated)."""
    layers, shape = cfg.num_hidden_layers, (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    full = ((layers,) + shape) if stacked else shape
    layer_spec = None if spec is None else (P(None, *spec) if stacked else spec)
    rep = None if mesh is None else NamedSharding(mesh, P())

    def make(shape_, dtype_, spec_=None):
        sharding = None if mesh is None else (NamedSharding(mesh, spec_) if spec_ is not None else rep)
        if abstract:
            return jax.ShapeDtypeStruct(shape_, jnp.dtype(dtype_), sharding=sharding)
        z = jnp.zeros(shape_, dtype_)
        return z if sharding is None or spec_ is None else jax.device_put(z, sharding)

    cache = (lambda: make(full, dtype, layer_spec)) if stacked else (
        lambda: tuple(make(full, dtype, layer_spec) for _ in range(layers)))
    return DecodeState(k=cache(), v=cache(), slot_valid=make((batch, max_len), jnp.bool_),
                       end=make((), jnp.int32), next_pos=make((batch,), jnp.int32),
                       logits=make((batch, cfg.vocab_size), jnp.float32))


def cache_spec(mesh: jax.sharding.Mesh | None, kv_heads: int, batch: int) -> P | None:
    """The k/v cache's PartitionSpec [B, kv_heads, T, head_dim]: kv heads over "tensor" and rows
    over ("data", "fsdp") where those divide; None without a mesh."""
    if mesh is None:
        return None
    shape = dict(mesh.shape)
    heads = "tensor" if shape.get("tensor", 1) > 1 and kv_heads % shape["tensor"] == 0 else None
    bax = tuple(a for a in ("data", "fsdp") if shape.get(a, 1) > 1)
    ways = int(np.prod([shape[a] for a in bax])) if bax else 1
    batch_ax = bax if bax and batch % ways == 0 else None
    return P(batch_ax, heads, None, None)
