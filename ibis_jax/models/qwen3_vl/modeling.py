"""Qwen3-VL (HF `Qwen3VLForConditionalGeneration`, dense) as a trainable Flax NNX module.

Call: `model(input_ids, attention_mask, pixel_values, image_grid_thw) -> logits [B, S, vocab]`
with HF names and layouts, the same signature and attribute names as `Qwen25VL`
(`language_model` with `embed_tokens`, stacked `layers`, `norm`; `visual`; `lm_head` unless tied).
The decoder is the shared one of `qwen2_5_vl.text` switched to Qwen3 by the text config (q/k
norms, no biases, interleaved mRoPE). What differs for a caller:
  - `image_features(...)` returns (visual tokens, DeepStack features) and `embed(...)` returns
    (embeddings, DeepStack features scattered at the image tokens): the decoder must get both
    (`language_model(embeds, position_ids, mask, cache, deepstack=...)`), or the images lose the
    features DeepStack adds after the first decoder layers;
  - `vision_layout` is this module's (`qwen3_vl.vision.vision_layout`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ibis_jax.models.qwen2_5_vl.config import ShardingConfig
from ibis_jax.models.qwen2_5_vl.layers import DType, check_remat_policy, partitioned
from ibis_jax.models.qwen2_5_vl.modeling import get_rope_index as _qwen2_5_rope_index
from ibis_jax.models.qwen2_5_vl.text import KVCache, TextModel

from .config import Qwen3VLConfig
from .vision import VisionLayout, VisionTransformer, vision_layout


def get_rope_index(
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    image_grid_thw: jax.Array | None,
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """3D (temporal, height, width) RoPE positions of HF Qwen3-VL `get_rope_index`, for images.

    For still images Qwen3-VL's rule is Qwen2.5-VL's: text advances all three axes by 1; an image
    of merged grid (t, h', w') starting at p gives its tokens (p + t_i, p + h_i, p + w_i) and the
    next text starts at p + max(h', w'). (They differ for video only: Qwen3-VL splits a video into
    one grid per frame separated by timestamps; video is not ported.) Shapes and padding as
    `qwen2_5_vl.get_rope_index`: position_ids [3, B, S], rope_deltas [B, 1].
    """
    return _qwen2_5_rope_index(input_ids, attention_mask, image_grid_thw, image_token_id=image_token_id,
                               spatial_merge_size=spatial_merge_size)


def _is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


class Qwen3VL(nnx.Module):
    """Qwen3-VL: vision tower (+ DeepStack mergers) + Qwen3 decoder + LM head (untied unless the
    config ties them).

    dtype: compute dtype (activations); param_dtype: storage dtype of parameters.
    remat: rematerialise each vision block and decoder layer in the backward pass: a policy name
        of `layers.REMAT_POLICIES` ("none", "full", "dots_saveable", ...); True means "full".
    scan_layers: run the stacked decoder layers and vision blocks as `lax.scan`s; False runs them
        one by one (same parameters, debugging).
    freeze_vision: stop gradients at the ViT outputs (the final one and the DeepStack taps); the
        merger and the DeepStack mergers still train. Pair with `trainable_filter(freeze_vision=True)`.
    """

    def __init__(
        self,
        config: Qwen3VLConfig,
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
    def image_features(self, pixel_values: jax.Array, layout: VisionLayout) -> tuple[jax.Array, jax.Array | None]:
        """pixel_values [L, C*T*P*P] -> (visual tokens [L / 4, D], DeepStack features
        [n, L / 4, D] or None), in image order."""
        vis = self.visual
        h, taps = vis.encode(pixel_values, layout)
        if self.freeze_vision:
            h = jax.lax.stop_gradient(h)
            taps = [jax.lax.stop_gradient(t) for t in taps]
        return vis.merger(h), (vis.deepstack(taps) if taps else None)

    def _layout(self, image_grid_thw: jax.Array | None, vision_layout_: VisionLayout | None) -> VisionLayout:
        if vision_layout_ is not None:
            return vision_layout_
        if not _is_concrete(image_grid_thw):
            raise ValueError(
                "image_grid_thw is traced (inside jit): pass vision_layout=qwen3_vl.vision_layout(image_grid_thw, "
                "config.vision) computed on the host as an argument instead"
            )
        return vision_layout(np.asarray(image_grid_thw), self.config.vision)

    def embed(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        vision_layout: VisionLayout | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """(token embeddings [B, S, D] with visual tokens scattered at the image-token positions in
        row-major order (HF's masked_scatter), DeepStack features [n, B, S, D] at the same
        positions and zeros elsewhere, or None without images / taps)."""
        emb = self.language_model.embed_tokens(jnp.asarray(input_ids))
        if pixel_values is None:
            return emb, None
        n_visual = pixel_values.shape[0] // self.config.vision.spatial_merge_size**2
        n_tok = int(np.sum(np.asarray(input_ids) == self.config.image_token_id)) if _is_concrete(input_ids) else None
        if n_tok is not None and n_tok != n_visual:
            raise ValueError(
                f"input_ids hold {n_tok} image tokens but pixel_values give {n_visual} visual "
                "tokens; the prompt must carry one <|image_pad|> per merged patch (t*h*w/4 per image)"
            )
        feats, deep = self.image_features(pixel_values, self._layout(image_grid_thw, vision_layout))
        is_img = jnp.asarray(input_ids) == self.config.image_token_id
        src = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, feats.shape[0] - 1).reshape(is_img.shape)
        emb = jnp.where(is_img[..., None], feats.astype(emb.dtype)[src], emb)
        if deep is not None:
            deep = jnp.where(is_img[None, ..., None], deep.astype(emb.dtype)[:, src], jnp.zeros((), emb.dtype))
        return emb, deep

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
        emb, deepstack = self.embed(input_ids, pixel_values, image_grid_thw, vision_layout)
        if position_ids is None:
            position_ids = self.position_ids(input_ids, attention_mask, image_grid_thw)
        elif position_ids.ndim == 2:
            position_ids = jnp.broadcast_to(position_ids[None], (3, *position_ids.shape))
        hidden, _ = self.language_model(emb, position_ids, attention_mask, deepstack=deepstack)
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
    vision tower, keeping its merger and DeepStack mergers (the projectors) trainable unless
    train_merger=False."""
    if not freeze_vision:
        return nnx.Param

    def frozen(path, _value) -> bool:
        names = [str(p) for p in path]
        if not names or names[0] != "visual":
            return False
        return not (train_merger and len(names) > 1 and names[1] in ("merger", "deepstack_merger_list"))

    return nnx.All(nnx.Param, nnx.Not(frozen))


__all__ = ["Qwen3VL", "get_rope_index", "trainable_filter", "KVCache", "VisionLayout", "vision_layout"]
