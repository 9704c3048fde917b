"""Qwen2.5-VL (HF `Qwen2_5_VLForConditionalGeneration`) as a trainable Flax NNX module.

Call: `model(input_ids, attention_mask, pixel_values, image_grid_thw) -> logits [B, S, vocab]`
with HF names and layouts. Pieces for later users:
  - `model.hidden_states(...)` -> final-normed hidden [B, S, D] without the LM head (compute
    log-probs chunk by chunk with `model.logits(hidden_chunk)`);
  - `model.embed(...)`, `model.language_model(embeds, position_ids, mask, cache)` and `KVCache`
    for a sampler with prefill + decode;
  - `get_rope_index` for 3D positions; `vision_layout` to precompute the vision masks on the host
    so a jitted step takes them as arrays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import Qwen25VLConfig, ShardingConfig
from .layers import DType, check_remat_policy, partitioned
from .text import KVCache, TextModel
from .vision import VisionLayout, VisionTransformer, image_order, vision_layout


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


def _is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


class Qwen25VL(nnx.Module):
    """Qwen2.5-VL: vision tower + Qwen2 decoder + LM head (untied unless the config ties them).

    dtype: compute dtype (activations); param_dtype: storage dtype of parameters.
    remat: rematerialise each vision block and decoder layer in the backward pass: a policy name
        of `layers.REMAT_POLICIES` ("none", "full", "dots_saveable", ...); True means "full".
    scan_layers: run the stacked decoder layers and vision blocks as `lax.scan`s (one layer
        compiled whatever the depth); False runs them one by one (same parameters, debugging).
    attention: the decoder's full-forward attention backend (`models.attention`: xla,
        dot_product, splash; resolve "auto" for a platform with `attention.resolve_backend`).
    freeze_vision: stop gradients at the ViT output (the merger/projector still trains); pair with
        `trainable_filter(freeze_vision=True)` for the optimizer.
    """

    def __init__(
        self,
        config: Qwen25VLConfig,
        *,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        sharding: ShardingConfig = ShardingConfig(),
        remat: bool | str = False,
        scan_layers: bool = True,
        attention: str = "xla",
        mlp_chunk: int = 0,
        freeze_vision: bool = False,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.sharding = sharding
        policy = check_remat_policy({True: "full", False: "none"}.get(remat, remat))
        kw = dict(dtype=dtype, param_dtype=param_dtype, remat=policy, scan_layers=scan_layers, rngs=rngs)
        self.visual = VisionTransformer(config.vision, sharding, **kw)
        self.language_model = TextModel(config.text, sharding, attention=attention, mlp_chunk=mlp_chunk, **kw)
        if not config.tie_word_embeddings:
            t = config.text
            self.lm_head = nnx.Param(
                partitioned(nnx.initializers.normal(t.initializer_range), sharding.lm_head_dv)(
                    rngs.params(), (t.hidden_size, t.vocab_size), param_dtype
                )
            )
        self.dtype = dtype
        self.freeze_vision = freeze_vision

    # ------------------------------------------------------------------ pieces
    def image_features(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        """pixel_values [L, C*T*P*P] -> visual tokens [L / 4, D] in image order."""
        vis = self.visual
        h = vis.encode(pixel_values, layout)
        if self.freeze_vision:
            h = jax.lax.stop_gradient(h)
        return image_order(vis.merger(h), layout)

    def _layout(self, image_grid_thw: jax.Array | None, vision_layout_: VisionLayout | None) -> VisionLayout:
        if vision_layout_ is not None:
            return vision_layout_
        if not _is_concrete(image_grid_thw):
            raise ValueError(
                "image_grid_thw is traced (inside jit): pass vision_layout=vision_layout(image_grid_thw, "
                "config.vision) computed on the host as an argument instead"
            )
        return vision_layout(np.asarray(image_grid_thw), self.config.vision, per_image=True)

    def embed(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        vision_layout: VisionLayout | None = None,
    ) -> jax.Array:
        """Token embeddings [B, S, D] with visual tokens scattered at the image-token positions
        (in row-major order, like HF's masked_scatter)."""
        emb = self.language_model.embed_tokens(jnp.asarray(input_ids))
        if pixel_values is None:
            return emb
        n_visual = pixel_values.shape[0] // self.config.vision.spatial_merge_size**2
        n_tok = int(np.sum(np.asarray(input_ids) == self.config.image_token_id)) if _is_concrete(input_ids) else None
        if n_tok is not None and n_tok != n_visual:
            raise ValueError(
                f"input_ids hold {n_tok} image tokens but pixel_values give {n_visual} visual "
                "tokens; the prompt must carry one <|image_pad|> per merged patch (t*h*w/4 per image)"
            )
        feats = self.image_features(pixel_values, self._layout(image_grid_thw, vision_layout)).astype(emb.dtype)
        is_img = jnp.asarray(input_ids) == self.config.image_token_id
        src = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, feats.shape[0] - 1).reshape(is_img.shape)
        return jnp.where(is_img[..., None], feats[src], emb)

    def position_ids(self, input_ids, attention_mask, image_grid_thw) -> jax.Array:
        """[3, B, S] positions from `get_rope_index` (text-only sequences get 0, 1, 2, ... after padding)."""
        pos, _ = get_rope_index(
            input_ids,
            attention_mask,
            image_grid_thw,
            image_token_id=self.config.image_token_id,
            spatial_merge_size=self.config.vision.spatial_merge_size,
        )
        return pos

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., vocab] (fp32 accumulation)."""
        if self.config.tie_word_embeddings:
            w = self.language_model.embed_tokens.embedding[...].astype(self.dtype)
            return jnp.einsum("...d,vd->...v", hidden, w, preferred_element_type=jnp.float32)
        w = self.lm_head[...].astype(self.dtype)
        return jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        vision_layout: VisionLayout | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, S, D] (the model without its LM head)."""
        if position_ids is None and pixel_values is not None and image_grid_thw is None:
            raise ValueError(
                "pixel_values given without image_grid_thw: the 3D positions need it (pass image_grid_thw, "
                "traced is fine under jit, or explicit position_ids)"
            )
        emb = self.embed(input_ids, pixel_values, image_grid_thw, vision_layout)
        if position_ids is None:
            position_ids = self.position_ids(input_ids, attention_mask, image_grid_thw)
        elif position_ids.ndim == 2:
            position_ids = jnp.broadcast_to(position_ids[None], (3, *position_ids.shape))
        hidden, _ = self.language_model(emb, position_ids, attention_mask)
        return hidden

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        vision_layout: VisionLayout | None = None,
    ) -> jax.Array:
        """input_ids [B, S] int; attention_mask [B, S] (1 real, 0 pad); pixel_values
        [patches, C*T*P*P] of all images of the batch; image_grid_thw [images, 3]; position_ids
        [3, B, S] or [B, S] (default: get_rope_index). Returns logits [B, S, vocab] fp32."""
        h = self.hidden_states(
            input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, vision_layout=vision_layout
        )
        return self.logits(h)


def trainable_filter(freeze_vision: bool = False, train_merger: bool = True) -> nnx.filterlib.Filter:
    """An nnx filter of the parameters to optimise: all of them, or (freeze_vision) all but the
    vision tower, keeping its merger (the projector) trainable unless train_merger=False.

    Example: `nnx.Optimizer(model, optax.adamw(1e-5), wrt=trainable_filter(freeze_vision=True))`.
    """
    if not freeze_vision:
        return nnx.Param

    def frozen(path, _value) -> bool:
        names = [str(p) for p in path]
        if not names or names[0] != "visual":
            return False
        return not (train_merger and len(names) > 1 and names[1] == "merger")

    return nnx.All(nnx.Param, nnx.Not(frozen))


__all__ = ["Qwen25VL", "get_rope_index", "trainable_filter", "KVCache", "VisionLayout", "vision_layout"]
