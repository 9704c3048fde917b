"""The Qwen3-VL vision tower: patch embedding + interpolated learned positions, full-attention
blocks per image frame, a 2x2 merger, and DeepStack mergers on intermediate blocks.

All images of a batch are packed along one token axis, like HF's `pixel_values` [patches, C*T*P*P]
(patches of each image in 2x2 merge-block order). What depends on the image sizes (which tokens
attend to each other, RoPE positions, the taps into the position table) is computed on the host by
`vision_layout(image_grid_thw, config)` into a `VisionLayout` of plain arrays; under `jax.jit`
pass the layout as an argument (its shapes depend only on the patch count and the largest frame).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ibis_jax.models.qwen2_5_vl.config import ShardingConfig
from ibis_jax.models.qwen2_5_vl import vision as qwen25_vision
from ibis_jax.models.qwen2_5_vl.layers import DType, embedding, partitioned, stacked
from ibis_jax.models.qwen2_5_vl.vision import (VisionAttention, _segment_gather, axial_rope, block_major_positions,
                                               vision_linear)

from .config import VisionConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Host-computed arrays for one packed batch of images (L patches, input order).

    rope_hw [L, 2]: (row, col) patch position of each token, for the 2D RoPE.
    image_gather [num_frames, frame_len]: token indices of each image frame, padded with L
        (attention is full within a frame and runs on these padded groups: O(L * frame_len)).
    interp_index [L, 4], interp_weight [L, 4] (fp32): the bilinear taps (align_corners) of each
        patch into the flattened square position table, resampled to its image's patch grid.
    """

    rope_hw: jax.Array
    image_gather: jax.Array
    interp_index: jax.Array
    interp_weight: jax.Array


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps (align_corners=True) on one axis: target `index` on an axis of `size`
    points resampled from `side` table points -> taps [N, 2] int, weights [N, 2] fp32."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0, None)
    return taps, weights.astype(np.float32)


def vision_layout(image_grid_thw: np.ndarray, config: VisionConfig, *, per_image: bool = True) -> VisionLayout:
    """Compute the `VisionLayout` of images with grids `image_grid_thw` [num_images, 3] (t, h, w in
    patches). Mirrors transformers' get_vision_position_ids / get_vision_cu_seqlens /
    get_vision_interpolation_indices_and_weights (bilinear, align_corners) for Qwen3-VL, as numpy.
    Every block attends within an image frame, so the features are per image whatever
    `per_image` says (the argument is Qwen2.5-VL's, whose full-attention blocks span the batch)."""
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    m = config.spatial_merge_size
    side = config.num_grid_per_side
    rope_hw, frames, index, weight = [], [], [], []
    frame_count = 0
    for t, h, w in grid.tolist():
        if h % m or w % m:
            raise ValueError(f"image_grid_thw ({t},{h},{w}): h and w must be multiples of merge size {m}")
        row, col = block_major_positions(h, w, m)
        rope_hw.append(np.tile(np.stack([row, col], -1), (t, 1)))
        h_taps, h_w = _axis_taps(row, np.full_like(row, h), side)
        w_taps, w_w = _axis_taps(col, np.full_like(col, w), side)
        index.append(np.tile((h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4), (t, 1)))
        weight.append(np.tile((h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4), (t, 1)))
        frames.append(np.repeat(np.arange(t) + frame_count, h * w))
        frame_count += t
    return VisionLayout(
        rope_hw=np.concatenate(rope_hw).astype(np.int32),
        image_gather=_segment_gather(np.concatenate(frames)),
        interp_index=np.concatenate(index).astype(np.int32),
        interp_weight=np.concatenate(weight).astype(np.float32),
    )


def layer_norm(dim: int, spec, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """torch-style LayerNorm (eps 1e-6, two-pass variance) with sharding metadata."""
    return nnx.LayerNorm(
        dim,
        epsilon=1e-6,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=partitioned(nnx.initializers.ones_init(), spec),
        bias_init=partitioned(nnx.initializers.zeros_init(), spec),
        rngs=rngs,
    )


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, sh: ShardingConfig, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        proj = vision_linear(cfg, sh, dtype, param_dtype, rngs)
        self.linear_fc1 = proj(cfg.hidden_size, cfg.intermediate_size, sh.vis_mlp_up_ef)
        self.linear_fc2 = proj(cfg.intermediate_size, cfg.hidden_size, sh.vis_mlp_down_fe)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=True))  # gelu_pytorch_tanh


class VisionBlock(qwen25_vision.VisionBlock):
    """Qwen2.5-VL's pre-norm block (the same attention) with LayerNorms and the gelu-tanh MLP."""

    def __init__(self, cfg: VisionConfig, sh: ShardingConfig, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(cfg.hidden_size, sh.vis_bias_e, **kw)
        self.norm2 = layer_norm(cfg.hidden_size, sh.vis_bias_e, **kw)
        self.attn = VisionAttention(cfg, sh, dtype, param_dtype, rngs)
        self.mlp = VisionMLP(cfg, sh, dtype, param_dtype, rngs)


class PatchMerger(nnx.Module):
    """LayerNorm, m*m neighbouring patches concatenated -> fc1, GELU (exact), fc2 -> text width.
    postshuffle (the DeepStack mergers): the norm runs on the concatenated 4E vector instead."""

    def __init__(self, cfg: VisionConfig, sh: ShardingConfig, dtype: DType, param_dtype: DType, rngs: nnx.Rngs,
                 *, postshuffle: bool):
        inner = cfg.hidden_size * cfg.spatial_merge_size**2
        proj = vision_linear(cfg, sh, dtype, param_dtype, rngs)
        self.norm = layer_norm(inner if postshuffle else cfg.hidden_size, sh.vis_bias_e, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
        self.linear_fc1 = proj(inner, inner, sh.merger_up_mm)
        self.linear_fc2 = proj(inner, cfg.out_hidden_size, sh.merger_down_md)
        self.inner = inner
        self.postshuffle = postshuffle

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [L, E] -> [L / m^2, out_hidden_size]."""
        x = self.norm(x.reshape(-1, self.inner)) if self.postshuffle else self.norm(x).reshape(-1, self.inner)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


def block_segments(depth: int, taps: tuple[int, ...]) -> list[tuple[int, int]]:
    """The blocks as runs [start, stop) that end after each DeepStack tap (and at the last block)."""
    bounds = sorted({i + 1 for i in taps} | {depth})
    return list(zip([0, *bounds[:-1]], bounds))


class VisionTransformer(qwen25_vision.VisionTower):
    """Patch embedding, position table, the stacked blocks (`blocks`: every parameter
    [depth, ...]), the merger and the stacked DeepStack mergers (`deepstack_merger_list`:
    [len(deepstack_visual_indexes), ...], None when there are none).

    With `scan_layers` the blocks run as one `lax.scan` per run between DeepStack taps (the taps
    are read between the scans, so no per-block output is stacked); otherwise block by block.
    remat: a policy name of `layers.REMAT_POLICIES`, per block.
    """

    block_class = VisionBlock

    def build_inputs(self, cfg: VisionConfig, sh: ShardingConfig, dtype: DType, param_dtype: DType,
                     rngs: nnx.Rngs) -> None:
        # Conv3d with stride = kernel is a matmul over flattened patches (kernel [C*T*P*P, E]).
        proj = vision_linear(cfg, sh, dtype, param_dtype, rngs)
        self.patch_embed = proj(cfg.patch_dim, cfg.hidden_size, sh.patch_pe)
        self.pos_embed = embedding(cfg.num_position_embeddings, cfg.hidden_size, spec=sh.patch_pe, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs, std=cfg.initializer_range)

    def build_outputs(self, cfg: VisionConfig, sh: ShardingConfig, dtype: DType, param_dtype: DType,
                      rngs: nnx.Rngs) -> None:
        self.merger = PatchMerger(cfg, sh, dtype, param_dtype, rngs, postshuffle=False)
        n_taps = len(cfg.deepstack_visual_indexes)
        self.deepstack_merger_list = (
            stacked(lambda r: PatchMerger(cfg, sh, dtype, param_dtype, r, postshuffle=True), n_taps, rngs)
            if n_taps else None
        )

    def encode(self, pixel_values: jax.Array, layout: VisionLayout) -> tuple[jax.Array, list[jax.Array]]:
        """pixel_values [L, C*T*P*P] -> (hidden states after the last block [L, E], the hidden
        states after each DeepStack block, a list of [L, E]), in input order."""
        x = self.patch_embed(jnp.asarray(pixel_values).astype(self.dtype))
        table = self.pos_embed.embedding[...]
        pos = (table[layout.interp_index] * jnp.asarray(layout.interp_weight)[..., None].astype(table.dtype)).sum(1)
        x = x + pos.astype(x.dtype)
        cos, sin = axial_rope(layout.rope_hw, self.cfg.head_dim, self.cfg.rope_theta)
        graphdef, state = nnx.split(self.blocks)
        step = self.block_step(graphdef, cos, sin, layout.image_gather)
        taps = []
        for start, stop in block_segments(self.cfg.depth, tuple(self.cfg.deepstack_visual_indexes)):
            if self.scan_layers:
                x, _ = jax.lax.scan(step, x, jax.tree.map(lambda a: a[start:stop], state))
            else:
                for i in range(start, stop):
                    x, _ = step(x, jax.tree.map(lambda a: a[i], state))
            if stop - 1 in self.cfg.deepstack_visual_indexes:
                taps.append(x)
        return x, taps

    def deepstack(self, taps: list[jax.Array]) -> jax.Array:
        """The DeepStack mergers on their taps: n x [L, E] -> [n, L / m^2, out_hidden_size]."""
        graphdef, state = nnx.split(self.deepstack_merger_list)
        return jax.vmap(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.stack(taps))

    def __call__(self, pixel_values: jax.Array, layout: VisionLayout) -> tuple[jax.Array, jax.Array | None]:
        """pixel_values [L, C*T*P*P] -> (visual tokens [L / m^2, out_hidden_size], DeepStack
        features [n, L / m^2, out_hidden_size] or None), in input order."""
        h, taps = self.encode(pixel_values, layout)
        return self.merger(h), (self.deepstack(taps) if taps else None)
