"""The Qwen2.5-VL vision tower: patch embedding, windowed/full attention blocks, 2x2 patch merger.

All images of a batch are packed along one token axis, like HF's `pixel_values` [patches, C*T*P*P].
Which token may attend to which is data-dependent (image sizes), so it is computed on the host
by `vision_layout(image_grid_thw, config)` into a `VisionLayout` of plain integer arrays; under
`jax.jit` pass the layout as an argument (its shapes depend only on the number of patches).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from .config import ShardingConfig, VisionConfig
from .layers import (MASK_VALUE, DType, Linear, RMSNorm, StackSettings, apply_rope, dot_attention, linear,
                     partitioned, stacked, with_remat)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Host-computed index arrays for one packed batch of images (L patches, L/4 merged tokens).

    window_index [L/4]: merged-token order used inside the tower (window by window, HF's
        `get_vision_window_index`); reverse_index [L/4] undoes it after the merger.
    rope_hw [L, 2]: (row, col) patch position of each token, already in window order.
    window_segments [L]: id of the attention window of each token (window order).
    image_segments [L]: id of the image/frame of each token (window order), for full attention.
    window_gather [num_windows, window_len]: token indices of each window, padded with L;
        image_gather [num_frames, frame_len] likewise per image frame. Attention runs on these
        padded groups, so its cost is O(L * group_len), never O(L^2) over the packed batch.
    """

    window_index: jax.Array
    reverse_index: jax.Array
    rope_hw: jax.Array
    window_segments: jax.Array
    image_segments: jax.Array
    window_gather: jax.Array
    image_gather: jax.Array


def _segment_gather(segments: np.ndarray) -> np.ndarray:
    """Contiguous segment ids [L] -> indices [num_segments, max_len], padded with L."""
    n = len(segments)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(segments)) + 1, [n]])
    lengths = np.diff(bounds)
    gather = np.full((len(lengths), int(lengths.max())), n, np.int32)
    for i, (start, length) in enumerate(zip(bounds[:-1], lengths)):
        gather[i, :length] = np.arange(start, start + length)
    return gather


def block_major_positions(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of an h x w patch grid in the processor's block-major order
    (merged-token blocks of m x m, block after block), as two [h*w] arrays."""
    row, col = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    row = row.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    col = col.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    return row, col


def vision_layout(image_grid_thw: np.ndarray, config: VisionConfig, *, per_image: bool = False) -> VisionLayout:
    """Compute the `VisionLayout` of images with grids `image_grid_thw` [num_images, 3] (t, h, w
    in patches). Mirrors transformers' get_vision_position_ids / get_vision_window_index /
    get_vision_cu_seqlens (Qwen2.5-VL), as numpy.

    per_image: when every image has the same grid, the layout of one image with a leading axis of
    1 on every array: the tower then encodes the images as a batch `[images, patches, dim]`
    (windows by local indices, no gather across images), so the images shard over the mesh's
    batch axes like any batch and each chip encodes only its own (`VisionTransformer.encode`).
    Mixed sizes fall back to the packed layout."""
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    if per_image and len(grid) and (grid == grid[0]).all():
        one = vision_layout(grid[:1], config)
        return jax.tree.map(lambda x: x[None], one)
    m = config.spatial_merge_size
    unit = m * m
    win = config.window_size // m // config.patch_size  # window side in merged tokens
    window_index, window_ids, image_ids, rope_hw = [], [], [], []
    merged_offset = 0
    window_count = 0
    frame_count = 0
    for t, h, w in grid.tolist():
        if h % m or w % m:
            raise ValueError(f"image_grid_thw ({t},{h},{w}): h and w must be multiples of merge size {m}")
        gh, gw = h // m, w // m
        hw = np.tile(np.stack(block_major_positions(h, w, m), -1), (t, 1))  # [t*h*w, 2]
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        nwh, nww = -(-gh // win), -(-gw // win)
        padded = np.full((t, nwh * win, nww * win), -1, np.int64)
        padded[:, :gh, :gw] = index
        padded = padded.reshape(t, nwh, win, nww, win).transpose(0, 1, 3, 2, 4).reshape(t, nwh * nww, win * win)
        order, wid = [], []
        for f in range(t):
            for j in range(nwh * nww):
                members = padded[f, j][padded[f, j] >= 0]
                if len(members):  # empty (all-padding) windows vanish, as with unique_consecutive
                    order.append(members)
                    wid.append(np.full(len(members) * unit, window_count))
                    window_count += 1
        local = np.concatenate(order)
        window_index.append(local + merged_offset)
        window_ids.append(np.concatenate(wid))
        # Frame of each merged token: window order keeps frames contiguous.
        image_ids.append(np.repeat(local // (gh * gw) + frame_count, unit))
        patch_order = (local[:, None] * unit + np.arange(unit)[None]).reshape(-1)
        rope_hw.append(hw[patch_order])
        merged_offset += t * gh * gw
        frame_count += t
    window_index = np.concatenate(window_index).astype(np.int32)
    window_segments = np.concatenate(window_ids).astype(np.int32)
    image_segments = np.concatenate(image_ids).astype(np.int32)
    return VisionLayout(
        window_index=window_index,
        reverse_index=np.argsort(window_index).astype(np.int32),
        rope_hw=np.concatenate(rope_hw).astype(np.int32),
        window_segments=window_segments,
        image_segments=image_segments,
        window_gather=_segment_gather(window_segments),
        image_gather=_segment_gather(image_segments),
    )


def axial_rope(rope_hw: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2D RoPE of the Qwen ViTs: rope_hw [L, 2] (row, col) -> cos, sin [L, head_dim] in fp32,
    (h freqs, w freqs) over head_dim/4 frequencies each, repeated twice."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, half, 2, dtype=np.float32) / half))
    freqs = jnp.asarray(rope_hw).astype(jnp.float32)[..., None] * inv_freq  # [L, 2, head_dim/4]
    freqs = freqs.reshape(freqs.shape[0], -1)
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


def vision_linear(cfg: Any, sh: ShardingConfig, dtype: DType, param_dtype: DType,
                  rngs: nnx.Rngs) -> Callable[[int, int, P], Linear]:
    """`(d_in, d_out, kernel_spec) -> linear(...)` as both families' vision towers build every
    projection: with a bias (spec `vis_bias_e`), kernel drawn with the config's initializer_range."""
    kw = dict(bias=True, bias_spec=sh.vis_bias_e, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
              std=cfg.initializer_range)
    return lambda d_in, d_out, kernel_spec: linear(d_in, d_out, kernel_spec=kernel_spec, **kw)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, sh: ShardingConfig, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        e = cfg.hidden_size
        proj = vision_linear(cfg, sh, dtype, param_dtype, rngs)
        self.qkv = proj(e, 3 * e, sh.vis_qkv_e3e)
        self.proj = proj(e, e, sh.vis_proj_ee)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, gather: jax.Array) -> jax.Array:
        """x [L, E]; cos/sin [L, head_dim] fp32; gather [groups, len] token indices of each
        attention group (window or frame), padded with L -> [L, E]."""
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # HF rotates in fp32 whatever the compute dtype.
        q = apply_rope(q.astype(jnp.float32), cos, sin).astype(x.dtype)
        k = apply_rope(k.astype(jnp.float32), cos, sin).astype(x.dtype)
        q, k, v = (jnp.take(t, gather, axis=0, mode="fill", fill_value=0) for t in (q, k, v))  # [G, N, H, D]
        bias = jnp.where(gather < n, 0.0, MASK_VALUE)[:, None, None, None, :]  # padded keys
        out = dot_attention(q[:, :, :, None], k, v, bias, self.head_dim**-0.5)  # [G, N, H, 1, D]
        out = jnp.zeros((n, x.shape[1]), out.dtype).at[gather.reshape(-1)].set(
            out.reshape(-1, x.shape[1]), mode="drop"
        )
        return self.proj(out)


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, sh: ShardingConfig, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size
        proj = vision_linear(cfg, sh, dtype, param_dtype, rngs)
        self.gate_proj = proj(e, f, sh.vis_mlp_up_ef)
        self.up_proj = proj(e, f, sh.vis_mlp_up_ef)
        self.down_proj = proj(f, e, sh.vis_mlp_down_fe)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, sh: ShardingConfig, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6, spec=sh.norm_d, param_dtype=param_dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6, spec=sh.norm_d, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, sh, dtype, param_dtype, rngs)
        self.mlp = VisionMLP(cfg, sh, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, gather: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, gather)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then groups of m*m neighbouring patches concatenated -> MLP(GELU) -> text width."""

    def __init__(self, cfg: VisionConfig, sh: ShardingConfig, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        inner = cfg.hidden_size * cfg.spatial_merge_size**2
        proj = vision_linear(cfg, sh, dtype, param_dtype, rngs)
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6, spec=sh.norm_d, param_dtype=param_dtype)
        self.mlp_0 = proj(inner, inner, sh.merger_up_mm)
        self.mlp_2 = proj(inner, cfg.out_hidden_size, sh.merger_down_md)
        self.inner = inner

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [L, E] -> [L / m^2, out_hidden_size]."""
        x = self.ln_q(x).reshape(-1, self.inner)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


def image_order(merged: jax.Array, layout: VisionLayout) -> jax.Array:
    """Merged tokens [L / m^2, D] from the tower's window order back to image order."""
    if layout.reverse_index.ndim == 2:  # per-image layout: each image's tokens in its own order
        images = merged.reshape(-1, layout.reverse_index.shape[1], merged.shape[-1])
        return jnp.take(images, layout.reverse_index[0], axis=1).reshape(merged.shape)
    return merged[layout.reverse_index]


def attention_period(depth: int, fullatt: tuple[int, ...]) -> int | None:
    """p when the full-attention blocks are every p-th one, last in each group of p (Qwen2.5-VL:
    7, 15, 23, 31 of 32 -> 8); None otherwise."""
    for p in range(2, depth + 1):
        if depth % p == 0 and tuple(fullatt) == tuple(range(p - 1, depth, p)):
            return p
    return None


def attention_runs(depth: int, fullatt: tuple[int, ...]) -> list[tuple[int, int, bool]]:
    """The blocks as runs of one attention kind: (start, stop, full attention)."""
    runs: list[tuple[int, int, bool]] = []
    for i in range(depth):
        full = i in fullatt
        if runs and runs[-1][2] == full:
            runs[-1] = (runs[-1][0], i + 1, full)
        else:
            runs.append((i, i + 1, full))
    return runs


class VisionTower(nnx.Module):
    """What the vision transformers of both families share: the config, the stacked blocks
    (`blocks`: every parameter [depth, ...], of the family's `block_class`), the compute dtype,
    remat (a policy name of `layers.REMAT_POLICIES`, per block) and scan_layers. A family builds
    its input embedding in `build_inputs` and its mergers in `build_outputs` (in that order
    around the blocks: the order the parameters are drawn in)."""

    block_class: type

    def __init__(
        self,
        cfg: Any,
        sh: ShardingConfig,
        stack: StackSettings,
        *,
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        dtype, param_dtype = stack.dtype, stack.param_dtype
        self.build_inputs(cfg, sh, dtype, param_dtype, rngs)
        block_class = self.block_class
        self.blocks = stacked(lambda r: block_class(cfg, sh, dtype, param_dtype, r), cfg.depth, rngs)
        self.build_outputs(cfg, sh, dtype, param_dtype, rngs)
        stack.keep(self)

    def build_inputs(self, cfg: Any, sh: ShardingConfig, dtype: DType, param_dtype: DType,
                     rngs: nnx.Rngs) -> None:
        raise NotImplementedError

    def build_outputs(self, cfg: Any, sh: ShardingConfig, dtype: DType, param_dtype: DType,
                      rngs: nnx.Rngs) -> None:
        raise NotImplementedError

    def block_step(self, graphdef: Any, cos: jax.Array, sin: jax.Array, gather: jax.Array) -> Callable:
        """One block as a scan step `(h, block state) -> (h, None)` (blocks split as `graphdef`,
        rematerialised per `remat`), attending within the groups of `gather`."""

        def step(h, block_state):
            return nnx.merge(graphdef, block_state)(h, cos, sin, gather), None

        return with_remat(step, self.remat)


class VisionTransformer(VisionTower):
    """Patch embedding, the stacked blocks (`blocks`: every parameter [depth, ...]) and the merger.

    With `scan_layers` the blocks run as scans: when the full-attention blocks are periodic
    (Qwen2.5-VL: one every 8) as an outer scan over groups of `p` blocks, each an inner scan over
    its windowed blocks plus its full-attention block, so XLA compiles two blocks whatever the
    depth; otherwise one scan per run of blocks of one kind. remat: a policy name per block.
    """

    block_class = VisionBlock

    def build_inputs(self, cfg: VisionConfig, sh: ShardingConfig, dtype: DType, param_dtype: DType,
                     rngs: nnx.Rngs) -> None:
        self.patch_embed = nnx.Param(
            partitioned(nnx.initializers.normal(cfg.initializer_range), sh.patch_pe)(
                rngs.params(), (cfg.patch_dim, cfg.hidden_size), param_dtype
            )
        )

    def build_outputs(self, cfg: VisionConfig, sh: ShardingConfig, dtype: DType, param_dtype: DType,
                      rngs: nnx.Rngs) -> None:
        self.merger = PatchMerger(cfg, sh, dtype, param_dtype, rngs)
        self.batch_axes = sh.act_btd[0] if len(sh.act_btd) else None  # the mesh axes a batch splits over

    def rope(self, rope_hw: jax.Array) -> tuple[jax.Array, jax.Array]:
        """rope_hw [L, 2] -> cos, sin [L, head_dim] in fp32 (`axial_rope`)."""
        return axial_rope(rope_hw, self.cfg.head_dim, self.cfg.rope_theta)

    def encode(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        """pixel_values [L, C*T*P*P] -> hidden states before the merger [L, E], in window order
        (a per-image layout: each image's patches in its own window order, image after image)."""
        if layout.rope_hw.ndim == 3:  # vision_layout(per_image=True): a batch of equal images
            one = jax.tree.map(lambda x: x[0], layout)
            images = pixel_values.reshape(-1, one.rope_hw.shape[0], pixel_values.shape[-1])
            images = self._constrain_images(images)
            encode = jax.vmap(lambda pv: self._encode_packed(pv, one))
            groups = self._image_groups(images.shape[0])
            if groups == 1:
                out = encode(images)
            else:
                # A few images per chip at a time (their full-attention scores are the tower's
                # peak): [groups, images / groups] with the second axis still each chip's own.
                n = images.shape[0]
                split = images.reshape(n // groups, groups, *images.shape[1:]).swapaxes(0, 1)
                out = jax.lax.map(lambda g: encode(self._constrain_images(g, axis=0)), split)
                out = out.swapaxes(0, 1).reshape(n, *out.shape[2:])
            return self._constrain_images(out).reshape(-1, out.shape[-1])
        return self._encode_packed(pixel_values, layout)

    # Images each chip encodes at once (`_image_groups`): the tower's peak is one block's
    # full-attention scores over them, [images, heads, patches, patches] in fp32.
    IMAGES_AT_ONCE = 8

    def _batch_ways(self) -> int:
        """How many ways the mesh's batch axes split a batch (1 without a mesh)."""
        if self.batch_axes is None:
            return 1
        mesh = jax.sharding.get_abstract_mesh()
        sizes = dict(mesh.shape) if mesh is not None and mesh.shape else {}
        names = self.batch_axes if isinstance(self.batch_axes, tuple) else (self.batch_axes,)
        return int(np.prod([sizes.get(a, 1) for a in names])) if sizes else 1

    def _image_groups(self, images: int) -> int:
        """Into how many sequential groups `images` are cut: the fewest that leave each chip at
        most IMAGES_AT_ONCE images at a time, dividing every chip's share evenly."""
        ways = self._batch_ways()
        per_chip = images // ways if images % ways == 0 else images
        for groups in range(1, per_chip + 1):
            if per_chip % groups == 0 and per_chip // groups <= self.IMAGES_AT_ONCE:
                return groups
        return 1

    def _constrain_images(self, x: jax.Array, axis: int = 0) -> jax.Array:
        """[images, patches, ...] laid out over the mesh's batch axes where they divide the images."""
        ways = self._batch_ways()
        if ways == 1 or x.shape[axis] % ways:
            return x
        spec = [None] * x.ndim
        spec[axis] = self.batch_axes
        return jax.lax.with_sharding_constraint(x, P(*spec))

    def _encode_packed(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        m2 = self.cfg.spatial_merge_size**2
        x = jnp.asarray(pixel_values).astype(self.dtype) @ self.patch_embed[...].astype(self.dtype)
        n, e = x.shape
        x = x.reshape(n // m2, m2, e)[layout.window_index].reshape(n, e)
        cos, sin = self.rope(layout.rope_hw)
        # Block-diagonal attention: within windows for most blocks, within whole frames for
        # `fullatt_block_indexes` (HF's cu_window_seqlens / cu_seqlens).
        graphdef, state = nnx.split(self.blocks)
        window = self.block_step(graphdef, cos, sin, layout.window_gather)
        full = self.block_step(graphdef, cos, sin, layout.image_gather)
        depth, fullatt = self.cfg.depth, tuple(self.cfg.fullatt_block_indexes)
        take = lambda tree, index: jax.tree.map(lambda a: a[index], tree)
        if not self.scan_layers:
            for i in range(depth):
                x, _ = (full if i in fullatt else window)(x, take(state, i))
            return x
        period = attention_period(depth, fullatt)
        if period is not None:
            groups = jax.tree.map(lambda a: a.reshape(depth // period, period, *a.shape[1:]), state)

            def group(h, group_state):
                h, _ = jax.lax.scan(window, h, take(group_state, slice(0, period - 1)))
                return full(h, take(group_state, period - 1))

            x, _ = jax.lax.scan(group, x, groups)
            return x
        for start, stop, is_full in attention_runs(depth, fullatt):
            x, _ = jax.lax.scan(full if is_full else window, x, take(state, slice(start, stop)))
        return x

    def __call__(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        """pixel_values [L, C*T*P*P] -> visual tokens [L / m^2, out_hidden_size] in input order."""
        return image_order(self.merger(self.encode(pixel_values, layout)), layout)
