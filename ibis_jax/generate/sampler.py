"""A jitted KV-cache sampler for the policy models (Qwen2.5-VL, Qwen3-VL): multimodal prefill,
while-loop decode, continuation of a cached conversation. The host side; the device programs and
the cache layout are `generate.decode`'s.

Positions. A chunk's 3D positions are `get_rope_index` of the chunk alone plus the row's
`next_pos` (the rule is a running sum, so this equals `get_rope_index` of the whole
conversation); the row's next text position is then max(chunk positions) + 1 (transformers'
`rope_deltas`). Generated tokens take `next_pos`, `next_pos + 1`, ... on all three axes.

Compilation. Prefill/extend are jitted per (batch bucket, chunk bucket, cache bucket, visual-token
bucket); the vision tower per image-size set, in groups of power-of-two image counts; decode per
(batch bucket, cache bucket, sampling options). The cache is donated to every call, so it is
updated in place.

After `generate` the cache holds prompt + generated tokens of every row (tokens after a row's stop
are marked invalid), so a new user turn can be appended with `extend` without re-encoding the
conversation. On CPU the decoder's kernels are packed for skinny matmuls (see `generate.decode`);
`SamplerConfig.packed_weights` overrides the choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ibis_jax.buckets import fit_bucket
from ibis_jax.generate.decode import (STOP_REASONS, DecodeState, SamplerConfig, _decode, _encode_images, _extend,
                                      _pack, _seed_prefix, cache_spec, empty_decode_state)
from ibis_jax.generate.stop import StopAutomaton
from ibis_jax.models.qwen2_5_vl.positions import get_rope_index
from ibis_jax.models.qwen2_5_vl.processor import check_image_tokens, eos_token_ids
from ibis_jax.models.qwen2_5_vl.vlm import VisionLanguageModel


def bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; past the last one, the next multiple of the last bucket."""
    return fit_bucket(n, buckets, overflow="round_up")


def power_of_two_groups(n: int) -> list[int]:
    """n as a sum of distinct powers of two, largest first (7 -> [4, 2, 1])."""
    return [1 << k for k in reversed(range(n.bit_length())) if n >> k & 1]


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


@dataclasses.dataclass
class Chunk:
    """Host arrays of one appended chunk (left-padded): input_ids/valid [B, S], positions
    [3, B, S], next_pos [B], features [N, D] or None."""

    input_ids: np.ndarray
    valid: np.ndarray
    positions: np.ndarray
    next_pos: np.ndarray


class Sampler:
    """Prefill, decode and continue batches of multimodal conversations with a `Qwen25VL` or `Qwen3VL`.

    model: the Flax model (its parameters are read at each call, so a trainer may update them);
    tokenizer: the HF tokenizer (decoding text, stop strings, eos); mesh: when given, the cache
    is sharded over kv heads on the mesh's "tensor" axis and over the batch on ("data", "fsdp")
    when those divide; every call runs under `jax.set_mesh(mesh)`.
    """

    def __init__(self, model: VisionLanguageModel, tokenizer, config: SamplerConfig = SamplerConfig(), *,
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

    def _features(self, graphdef, params, pixel_values, image_grid_thw) -> tuple[jax.Array | None, jax.Array | None]:
        """(visual features [N, D], DeepStack features [n, N, D] or None) of the images, padded to
        a visual bucket, encoded in groups of power-of-two image counts (5 images: 4 + 1), each
        image's features independent of the others': a batch of n images of one size compiles
        the tower for at most log2(n) + 1 shapes (not one per count), and no padding image is
        encoded."""
        if pixel_values is None:
            return None, None
        grid = np.asarray(image_grid_thw).reshape(-1, 3)
        patches = grid.prod(-1)
        parts, first, offset = [], 0, 0
        for size in power_of_two_groups(len(grid)):
            n = int(patches[first:first + size].sum())
            layout = self.model.vision_layout(grid[first:first + size], per_image=True)
            parts.append(_encode_images(graphdef, params, jnp.asarray(pixel_values[offset:offset + n]), layout))
            first, offset = first + size, offset + n
        feats = jnp.concatenate([f for f, _ in parts])
        pad = bucket(feats.shape[0], self.config.visual_buckets) - feats.shape[0]
        feats = jnp.pad(feats, ((0, pad), (0, 0)))
        if parts[0][1] is None:
            return feats, None
        deep = jnp.concatenate([d for _, d in parts], axis=1)
        return feats, jnp.pad(deep, ((0, 0), (0, pad), (0, 0)))

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
        cfg = self.model.config
        check_image_tokens(chunk.input_ids, cfg.image_token_id, image_grid_thw, cfg.vision.spatial_merge_size,
                           "sampler")
        graphdef, params, packed = self._split()
        feats, deep = self._run(self._features, graphdef, params, pixel_values, image_grid_thw)
        return self._run(_extend, graphdef, params, packed, state, jnp.asarray(chunk.input_ids), jnp.asarray(chunk.valid),
                         jnp.asarray(chunk.positions), jnp.asarray(chunk.next_pos), feats,
                         cache_spec=self._cache_spec(state.batch), deepstack=deep)

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
