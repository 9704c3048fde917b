"""The 3D (temporal, height, width) mRoPE positions of a batch of multimodal sequences: HF
`get_rope_index` for still images, the same rule in Qwen2.5-VL and Qwen3-VL (they differ for video
only, which is not ported)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("image_token_id", "spatial_merge_size"))
def get_rope_index(
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    image_grid_thw: jax.Array | None,
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """3D (temporal, height, width) RoPE positions of HF Qwen2.5-VL `get_rope_index`, for images.

    input_ids [B, S]; attention_mask [B, S] (1 real, 0 padding; left or right); image_grid_thw
    [num_images, 3] in patches, images in row-major order of their appearance in the batch.
    Text tokens advance all three axes by 1; an image of merged grid (t, h', w') starting at
    position p gives its tokens (p + t_i, p + h_i, p + w_i) and moves the next text to
    p + max(h', w') (HF's rule; temporal extent is ignored for still images).
    Returns position_ids [3, B, S] (0 at padding) and rope_deltas [B, 1] = max position + 1 - valid
    length, which a sampler adds to the text positions of generated tokens.
    Pure jnp with static shapes: works on numpy inputs and inside jit.
    """
    ids = jnp.asarray(input_ids)
    b, s = ids.shape
    mask = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    is_img = (ids == image_token_id) & mask
    if image_grid_thw is None:
        is_img = jnp.zeros_like(is_img)
        grid = jnp.ones((1, 3), jnp.int32)
    else:
        grid = jnp.asarray(image_grid_thw, jnp.int32).reshape(-1, 3)
    gh = grid[:, 1] // spatial_merge_size
    gw = grid[:, 2] // spatial_merge_size

    # A run of image tokens = one image. Runs are numbered in batch row-major order.
    prev_img = jnp.pad(is_img[:, :-1], ((0, 0), (1, 0)))
    run_start = is_img & ~prev_img
    image_idx = jnp.clip(jnp.cumsum(run_start.reshape(-1)).reshape(b, s) - 1, 0, grid.shape[0] - 1)
    idx = jnp.broadcast_to(jnp.arange(s), (b, s))
    start_idx = jax.lax.cummax(jnp.where(run_start, idx, -1), axis=1)
    j = idx - start_idx  # offset inside the image's run
    h_, w_ = gh[image_idx], gw[image_idx]
    next_img = jnp.pad(is_img[:, 1:], ((0, 0), (0, 1)))
    run_end = is_img & ~next_img
    # How far each token moves the running position: text 1, an image max(h', w') at its last token.
    step = jnp.where(is_img, jnp.where(run_end, jnp.maximum(h_, w_), 0), mask.astype(jnp.int32))
    base = jnp.cumsum(step, axis=1) - step  # exclusive: the run start position for image tokens
    t_pos = base + j // (h_ * w_)
    h_pos = base + (j // w_) % h_
    w_pos = base + j % w_
    pos = jnp.stack([jnp.where(is_img, p, base) for p in (t_pos, h_pos, w_pos)])
    pos = jnp.where(mask[None], pos, 0).astype(jnp.int32)
    deltas = pos.max(axis=(0, 2)) + 1 - mask.sum(-1)
    return pos, deltas[:, None].astype(jnp.int32)
