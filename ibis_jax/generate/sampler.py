"""A jitted KV-cache sampler for the Flax Qwen2.5-VL: multimodal prefill, while-loop decode,
continuation of a cached conversation.

Layout. One `DecodeState` holds a batch of conversations: per decoder layer a preallocated cache
k/v [B, kv_heads, T, head_dim] (head-major, the model's `KVCache` layout), `slot_valid` [B, T]
(which cache slots hold real tokens), `end` (the first free slot, shared by the batch),
`next_pos` [B] (the mRoPE position of each row's next text token) and the next-token `logits`
[B, V]. Every call appends a chunk of S slots at `end`:
prompts and new user turns are *left-padded* to S per row, padding slots stay invalid, so rows of
different lengths share one `end` and attention simply masks the holes.

Positions. A chunk's 3D positions are `get_rope_index` of the chunk alone plus the row's
`next_pos` (the rule is a running sum, so this equals `get_rope_index` of the whole
conversation); the row's next text position is then max(chunk positions) + 1 (transformers'
`rope_deltas`). Generated tokens take `next_pos`, `next_pos + 1`, ... on all three axes.

Compilation. Prefill/extend are jitted per (batch bucket, chunk bucket, cache bucket, visual-token
bucket); the vision tower per image-size set, in groups of power-of-two image counts; decode per (batch bucket, cache bucket, sampling
options). The cache is donated to every call, so it is updated in place.

The decode loop feeds every sampled token back (also the last one), so after `generate` the cache
holds prompt + generated tokens of every row (tokens after a row's stop are marked invalid) and a
new user turn can be appended with `extend` without re-encoding the conversation.

The cached forward calls the model's own modules (embedding, decoder layers with their
`kv`/`kv_end` arguments, final norm, LM head): one set of parameters serves training and sampling.
On CPU the decoder's kernels are first packed for skinny matmuls (`models.qwen2_5_vl.packed`: a
transposed, q/k/v- and gate/up-fused copy made once per call, the layers' `packed` argument),
which decodes ~1.3-1.4x faster there (bench/generate_vs_transformers.py);
`SamplerConfig.packed_weights` overrides the choice.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ibis_jax.buckets import fit_bucket
from ibis_jax.generate.stop import StopAutomaton
from ibis_jax.models.logits import suppress
from ibis_jax.models.qwen2_5_vl import Qwen25VL, get_rope_index, vision_layout
from ibis_jax.models.qwen2_5_vl.layers import MASK_VALUE, layer_view, run_layers
from ibis_jax.models.qwen2_5_vl.packed import PackedText, pack_text, packed_matmul
from ibis_jax.models.qwen2_5_vl.processor import eos_token_ids
from ibis_jax.models.qwen2_5_vl.text import mrope_cos_sin

STOP_REASONS = ("", "eos", "stop_string", "max_tokens")
# The logit of a suppressed token: finite (an entropy over it stays 0 * x = 0, not NaN), far below
# anything a model produces, so its probability is exactly 0 in float32.
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


def bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; past the last one, the next multiple of the last bucket."""
    return fit_bucket(n, buckets, overflow="round_up")


def power_of_two_groups(n: int) -> list[int]:
    """n as a sum of distinct powers of two, largest first (7 -> [4, 2, 1])."""
    return [1 << k for k in reversed(range(n.bit_length())) if n >> k & 1]


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


@dataclasses.dataclass(frozen=True)
class Completion:
    """One row's generation. token_ids exactly as sampled (the stop token included);
    logprobs float32 [n] under the sampling distribution (0 for greedy: it is deterministic);
    model_logprobs float32 [n] under the unmodified model (temperature 1, no truncation)."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: np.ndarray
    model_logprobs: np.ndarray
    stop_reason: str  # "eos" | "stop_string" | "max_tokens"


# ---------------------------------------------------------------------------- the cached forward
def _constrain(x: jax.Array, spec: P | None) -> jax.Array:
    return x if spec is None or spec == P() else jax.lax.with_sharding_constraint(x, spec)


def _forward_chunk(
    model: Qwen25VL,
    state: DecodeState,
    embeds: jax.Array,
    positions: jax.Array,
    chunk_valid: jax.Array,
    cache_spec: P | None,
    packed: PackedText | None,
) -> tuple[DecodeState, jax.Array]:
    """Append a chunk at `state.end`: embeds [B, S, D], positions [3, B, S], chunk_valid bool
    [B, S]; packed: the decoder's packed weights or None. Returns (state with k/v/slot_valid/end
    updated, final-normed hidden [B, S, D]).

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
                              None if packed is None else packed.layers[i])
            ks.append(_constrain(k, cache_spec))
            vs.append(_constrain(v, cache_spec))
            x = _constrain(x, act_spec)
        k, v = tuple(ks), tuple(vs)
    else:
        layer_spec = None if cache_spec is None else P(None, *cache_spec)

        def step(layer, carry, index):
            h, k, v = carry
            h, (k, v) = layer(h, cos, sin, bias, (k, v), state.end, layer_index=index)
            return (_constrain(h, act_spec), _constrain(k, layer_spec), _constrain(v, layer_spec)), None

        (x, k, v), _ = run_layers(lm.layers, step, (x, state.k, state.v), jnp.arange(state.k.shape[0]))
    x = lm.norm(x)
    new = dataclasses.replace(state, k=k, v=v, slot_valid=slot_valid, end=state.end + s)
    return new, x


def _embed_chunk(model: Qwen25VL, input_ids: jax.Array, features: jax.Array | None) -> jax.Array:
    """Token embeddings [B, S, D] with visual features [N, D] (N >= number of image tokens,
    padded) scattered at the image tokens in row-major order (as `Qwen25VL.embed`)."""
    emb = model.language_model.embed_tokens(input_ids)
    if features is None:
        return emb
    is_img = input_ids == model.config.image_token_id
    src = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, features.shape[0] - 1).reshape(is_img.shape)
    return jnp.where(is_img[..., None], features.astype(emb.dtype)[src], emb)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_images(graphdef, params, pixel_values, layout):
    model = nnx.merge(graphdef, params)
    return model.image_features(pixel_values, layout)


def _logits(model: Qwen25VL, hidden: jax.Array, packed: PackedText | None) -> jax.Array:
    """hidden [B, D] -> float32 logits [B, V]."""
    if packed is None:
        return model.logits(hidden).astype(jnp.float32)
    return packed_matmul(hidden, packed.lm_head, jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _pack(graphdef, params) -> PackedText:
    return pack_text(nnx.merge(graphdef, params))


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_spec"), donate_argnames=("state",))
def _extend(graphdef, params, packed, state: DecodeState, input_ids, chunk_valid, positions, next_pos, features,
            cache_spec):
    """Prefill / continuation: append the chunk, set next_pos, logits of each row's last slot."""
    model = nnx.merge(graphdef, params)
    embeds = _embed_chunk(model, input_ids, features)
    state, hidden = _forward_chunk(model, state, embeds, positions, chunk_valid, cache_spec, packed)
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


# ---------------------------------------------------------------------------- host side
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


@dataclasses.dataclass
class Chunk:
    """Host arrays of one appended chunk (left-padded): input_ids/valid [B, S], positions
    [3, B, S], next_pos [B], features [N, D] or None."""

    input_ids: np.ndarray
    valid: np.ndarray
    positions: np.ndarray
    next_pos: np.ndarray


class Sampler:
    """Prefill, decode and continue batches of multimodal conversations with a `Qwen25VL`.

    model: the Flax model (its parameters are read at each call, so a trainer may update them);
    tokenizer: the HF tokenizer (decoding text, stop strings, eos); mesh: when given, the cache
    is sharded over kv heads on the mesh's "tensor" axis and over the batch on ("data", "fsdp")
    when those divide; every call runs under `jax.set_mesh(mesh)`.
    """

    def __init__(self, model: Qwen25VL, tokenizer, config: SamplerConfig = SamplerConfig(), *,
                 mesh: jax.sharding.Mesh | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.mesh = mesh
        vocab = model.config.text.vocab_size
        self.stop = StopAutomaton.for_tokenizer(tokenizer, config.stop_strings, vocab)
        eos = config.eos_token_ids
        self.eos_ids = tuple(eos) if eos is not None else eos_token_ids(tokenizer, model.config.text)
        self._stop_table = jnp.asarray(self.stop.table)
        self._eos = jnp.asarray(np.asarray(self.eos_ids or (-1,), np.int32))
        self._packed: tuple | None = None  # (ids of the param leaves, the leaves, PackedText)
        self._prefixes: dict = {}  # prefix ids -> (param leaves, k, v, valid, next_pos): see prefill_shared

    # -------------------------------------------------------------- pieces
    def _split(self):
        """(graphdef, params, packed weights or None) of the model's current parameters."""
        graphdef, params = nnx.split(self.model)
        if not self._use_packed():
            return graphdef, params, None
        leaves = jax.tree.leaves(params)
        key = tuple(id(x) for x in leaves)
        if self._packed is None or self._packed[0] != key:
            # Keep the leaves alive with the key: their ids cannot be reused while cached.
            self._packed = (key, leaves, self._run(_pack, graphdef, params))
        return graphdef, params, self._packed[2]

    def _use_packed(self) -> bool:
        if self.config.packed_weights is not None:
            return self.config.packed_weights
        return jax.default_backend() == "cpu" and (self.mesh is None or self.mesh.size == 1)

    def _cache_spec(self, batch: int) -> P | None:
        return cache_spec(self.mesh, self.model.config.text.num_key_value_heads, batch)

    def stacked_cache(self) -> bool:
        """Whether the cache is stacked over layers (the scanned decode) or one array per layer
        (packed weights, or a model built with scan_layers=False)."""
        return not self._use_packed() and self.model.language_model.scan_layers

    def init_state(self, batch: int, max_len: int) -> DecodeState:
        """An empty cache for `batch` rows and `max_len` slots (both already bucketed)."""
        return empty_decode_state(self.model.config.text, self.model.language_model.dtype, batch, max_len,
                                  stacked=self.stacked_cache(), mesh=self.mesh, spec=self._cache_spec(batch))

    def _features(self, graphdef, params, pixel_values, image_grid_thw) -> jax.Array | None:
        """Visual features of the images, encoded in groups of power-of-two image counts (5
        images: 4 + 1), each image's features independent of the others': a batch of n images
        of one size compiles the tower for at most log2(n) + 1 shapes (not one per count), and
        no padding image is encoded."""
        if pixel_values is None:
            return None
        grid = np.asarray(image_grid_thw).reshape(-1, 3)
        patches = grid.prod(-1)
        parts, first, offset = [], 0, 0
        for size in power_of_two_groups(len(grid)):
            n = int(patches[first:first + size].sum())
            layout = vision_layout(grid[first:first + size], self.model.config.vision, per_image=True)
            parts.append(_encode_images(graphdef, params, jnp.asarray(pixel_values[offset:offset + n]), layout))
            first, offset = first + size, offset + n
        feats = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
        n = bucket(feats.shape[0], self.config.visual_buckets)
        return jnp.pad(feats, ((0, n - feats.shape[0]), (0, 0)))

    def _chunk(self, rows: Sequence[np.ndarray], batch: int, next_pos: np.ndarray,
               image_grid_thw: np.ndarray | None, size: int | None = None) -> Chunk:
        """Left-pad `rows` (1-D id arrays; missing rows of the batch bucket are empty) to a chunk
        bucket (or `size`) and compute the 3D positions offset by each row's next_pos."""
        s = size or bucket(max(max((len(r) for r in rows), default=1), 1), self.config.chunk_buckets)
        ids = np.zeros((batch, s), np.int32)
        valid = np.zeros((batch, s), bool)
        for i, r in enumerate(rows):
            if len(r):
                ids[i, s - len(r):] = r
                valid[i, s - len(r):] = True
        cfg = self.model.config
        pos, deltas = get_rope_index(ids, valid.astype(np.int32), image_grid_thw,
                                     image_token_id=cfg.image_token_id,
                                     spatial_merge_size=cfg.vision.spatial_merge_size)
        pos = np.asarray(pos) + next_pos[None, :, None] * valid[None]
        # transformers' rope_deltas: the next text position is max(position) + 1 of the row.
        n_valid = valid.sum(-1)
        new_next = np.where(n_valid > 0, next_pos + n_valid + np.asarray(deltas)[:, 0], next_pos)
        return Chunk(ids, valid, pos.astype(np.int32), new_next.astype(np.int32))

    def _run(self, fn, *args, **kw):
        if self.mesh is None:
            return fn(*args, **kw)
        with jax.set_mesh(self.mesh):
            return fn(*args, **kw)

    # -------------------------------------------------------------- public API
    def prefill(self, prompts: Sequence[np.ndarray], pixel_values: np.ndarray | None = None,
                image_grid_thw: np.ndarray | None = None, *, reserve: int | None = None) -> DecodeState:
        """Encode prompts (1-D id arrays, `<|image_pad|>` already expanded) with their images
        (pixel_values [patches, C*T*P*P], image_grid_thw [images, 3] in row-major order of the
        prompts). The cache gets room for the prompt chunk + `reserve` (default max_new_tokens)
        slots, bucketed."""
        b = bucket(len(prompts), self.config.batch_buckets)
        reserve = self.config.max_new_tokens if reserve is None else reserve
        chunk = self._chunk(prompts, b, np.zeros(b, np.int32), image_grid_thw)
        state = self.init_state(b, bucket(chunk.input_ids.shape[1] + reserve, self.config.cache_buckets))
        return self._append(state, chunk, pixel_values, image_grid_thw)

    def prefill_shared(self, prefix: np.ndarray, suffixes: Sequence[np.ndarray], pixel_values: np.ndarray | None = None,
                       image_grid_thw: np.ndarray | None = None, *, reserve: int | None = None) -> DecodeState:
        """`prefill` of prompts that all start with the text-only `prefix` (e.g. the system turn):
        the prefix is encoded once and kept (per parameter set), each call copies its cache into
        every row and encodes only the `suffixes` (the rest of each prompt, with its images).
        Equal to `prefill(prefix + suffix)` up to float rounding (the prefix sits in its own chunk)."""
        prefix = np.asarray(prefix, np.int32)
        if self.model.config.image_token_id in prefix or self.model.config.video_token_id in prefix:
            raise ValueError("prefill_shared: the shared prefix must be text only (no image tokens)")
        _, params = nnx.split(self.model)
        leaves = jax.tree.leaves(params)
        key = (tuple(prefix.tolist()), tuple(id(x) for x in leaves))
        if key not in self._prefixes:
            if len(self._prefixes) >= 4:
                self._prefixes.pop(next(iter(self._prefixes)))
            # Once per prefix: a chunk of its own length (rounded to 16), not a bucket's.
            chunk = self._chunk([prefix], 1, np.zeros(1, np.int32), None, size=-(-len(prefix) // 16) * 16)
            end = chunk.input_ids.shape[1]
            st = self._append(self.init_state(1, end), chunk, None, None)
            first = lambda c: c[..., :1, :, :end, :]  # row 0, slots [0, end)
            self._prefixes[key] = (leaves, jax.tree.map(first, st.k), jax.tree.map(first, st.v),
                                   st.slot_valid[0, :end], int(st.next_pos[0]))
        _, pk, pv, pvalid, pnext = self._prefixes[key]
        b = bucket(len(suffixes), self.config.batch_buckets)
        reserve = self.config.max_new_tokens if reserve is None else reserve
        chunk = self._chunk(suffixes, b, np.full(b, pnext, np.int32), image_grid_thw)
        state = self.init_state(b, bucket(pvalid.shape[0] + chunk.input_ids.shape[1] + reserve,
                                          self.config.cache_buckets))
        state = self._run(_seed_prefix, state, pk, pv, pvalid, jnp.int32(pnext))
        return self._append(state, chunk, pixel_values, image_grid_thw)

    def extend(self, state: DecodeState, turns: Sequence[np.ndarray], pixel_values: np.ndarray | None = None,
               image_grid_thw: np.ndarray | None = None, *, reserve: int | None = None) -> DecodeState:
        """Continue cached conversations: append `turns[i]` (1-D ids, e.g. the end of the
        assistant turn + a new user turn with its image + the generation prompt) to row i.
        The cache grows to the next bucket when the turn + `reserve` new tokens do not fit.
        `state` is donated: use the returned one."""
        if len(turns) > state.batch:
            raise ValueError(f"extend got {len(turns)} turns for a state of {state.batch} rows")
        chunk = self._chunk(turns, state.batch, np.asarray(state.next_pos), image_grid_thw)
        reserve = self.config.max_new_tokens if reserve is None else reserve
        need = int(state.end) + chunk.input_ids.shape[1] + reserve
        if need > state.max_len:
            state = self._grow(state, bucket(need, self.config.cache_buckets))
        return self._append(state, chunk, pixel_values, image_grid_thw)

    def _grow(self, state: DecodeState, max_len: int) -> DecodeState:
        extra = max_len - state.max_len
        spec = self._cache_spec(state.batch)

        def pad_slots(x, axis):  # the slot axis: 1 of slot_valid [B, T], -2 of k/v [..., B, KV, T, D]
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, extra)
            y = jnp.pad(x, widths)
            if spec is None or x.ndim < 4:
                return y
            return jax.device_put(y, NamedSharding(self.mesh, P(*(None,) * (x.ndim - 4), *spec)))

        cache = lambda c: pad_slots(c, -2)
        return dataclasses.replace(state, k=jax.tree.map(cache, state.k), v=jax.tree.map(cache, state.v),
                                   slot_valid=pad_slots(state.slot_valid, 1))

    def _append(self, state, chunk: Chunk, pixel_values, image_grid_thw) -> DecodeState:
        graphdef, params, packed = self._split()
        feats = self._run(self._features, graphdef, params, pixel_values, image_grid_thw)
        return self._run(_extend, graphdef, params, packed, state, jnp.asarray(chunk.input_ids), jnp.asarray(chunk.valid),
                         jnp.asarray(chunk.positions), jnp.asarray(chunk.next_pos), feats,
                         cache_spec=self._cache_spec(state.batch))

    def decode(self, state: DecodeState, num_rows: int, key: jax.Array | None = None
               ) -> tuple[DecodeState, list[Completion]]:
        """Sample up to max_new_tokens for the first `num_rows` rows (the rest is batch padding).
        `key` (a jax PRNG key) is required unless greedy; the same key gives the same tokens.
        `state` is donated: use the returned one."""
        if key is None:
            if not self.config.greedy:
                raise ValueError("SamplerConfig.temperature > 0 needs an explicit PRNG key: decode(..., key=jax.random.key(seed))")
            key = jax.random.key(0)
        if int(state.end) + self.config.max_new_tokens > state.max_len:
            state = self._grow(state, bucket(int(state.end) + self.config.max_new_tokens, self.config.cache_buckets))
        graphdef, params, packed = self._split()
        live = np.arange(state.batch) < num_rows
        state, tokens, logp, model_logp, lengths, reason = self._run(
            _decode, graphdef, params, packed, state, key, jnp.asarray(live), self._stop_table, self._eos,
            cfg=self.config, cache_spec=self._cache_spec(state.batch))
        tokens, logp, model_logp, lengths, reason = jax.device_get((tokens, logp, model_logp, lengths, reason))
        out = []
        for r in range(num_rows):
            n = int(lengths[r])
            ids = tuple(int(t) for t in tokens[r, :n])
            text_ids = [t for t in ids if t not in self.eos_ids]
            out.append(Completion(ids, self.tokenizer.decode(text_ids, skip_special_tokens=False),
                                  np.asarray(logp[r, :n], np.float32), np.asarray(model_logp[r, :n], np.float32),
                                  STOP_REASONS[int(reason[r])]))
        return state, out

    def generate(self, prompts: Sequence[np.ndarray], pixel_values: np.ndarray | None = None,
                 image_grid_thw: np.ndarray | None = None, key: jax.Array | None = None, *,
                 prefix: np.ndarray | None = None) -> list[Completion]:
        """prefill + decode; one `Completion` per prompt. prefix: a text-only start shared by
        every prompt, whose cache is kept between calls (`prefill_shared`); the prompts are then
        the rest of each prompt."""
        if prefix is not None and len(prefix):
            state = self.prefill_shared(prefix, prompts, pixel_values, image_grid_thw)
        else:
            state = self.prefill(prompts, pixel_values, image_grid_thw)
        return self.decode(state, len(prompts), key)[1]
