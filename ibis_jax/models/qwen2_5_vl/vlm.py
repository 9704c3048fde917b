"""What every policy family's model is: a vision tower, a decoder and an LM head, called the same way.

`VisionLanguageModel` holds the family-independent part of Qwen2.5-VL and Qwen3-VL:

  - `model(input_ids, attention_mask, pixel_values, image_grid_thw) -> logits [B, S, vocab]`
    (HF names and layouts); `hidden_states(...)` is the same without the LM head, and
    `logits(hidden)` the head alone (a trainer computes log-probs chunk by chunk with it);
  - `embed(...) -> (embeddings, deepstack)`: token embeddings with the visual tokens scattered at
    the image tokens, and the DeepStack features the decoder adds after its first layers (Qwen3-VL;
    None for Qwen2.5-VL). A caller that runs the decoder itself (the sampler) passes both on;
  - `image_features(pixel_values, layout) -> (visual tokens, deepstack or None)`, image by image;
  - `vision_layout(image_grid_thw, per_image=...)`: the vision tower's host-side layout (masks,
    positions), computed outside jit and passed in;
  - `position_ids(...)`: the 3D mRoPE positions of `get_rope_index` (the same rule for still
    images in both families).

A family subclasses it with its own vision tower (`vision_tower`), layout function and
`image_features`; the decoder (`text.TextModel`, switched to Qwen3 by its config) and the head are
shared. It lives in this package because Qwen3-VL is built on Qwen2.5-VL's layers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ShardingConfig
from .layers import DType, StackSettings, partitioned
from .positions import get_rope_index
from .text import TextModel


def is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


class VisionLanguageModel(nnx.Module):
    """Vision tower + decoder + LM head (untied unless the config ties them).

    dtype: compute dtype (activations); param_dtype: storage dtype of parameters.
    remat: rematerialise each vision block and decoder layer in the backward pass: a policy name
        of `layers.REMAT_POLICIES` ("none", "full", "dots_saveable", ...); True means "full".
    scan_layers: run the stacked decoder layers and vision blocks as `lax.scan`s (one layer
        compiled whatever the depth); False runs them one by one (same parameters, debugging).
    attention: the decoder's full-forward attention backend (`models.attention`: xla,
        dot_product, splash; resolve "auto" for a platform with `attention.resolve_backend`).
    freeze_vision: stop gradients at the vision tower's outputs (the projectors still train); pair
        with the family's `trainable_filter(freeze_vision=True)` for the optimizer.
    """

    vision_tower: type  # the family's vision transformer class
    layout_fn: Callable[..., Any]  # the family's `vision_layout(image_grid_thw, vision_config, ...)`
    projectors: tuple[str, ...] = ("merger",)  # vision sub-modules that train under freeze_vision

    def __init__(
        self,
        config: Any,
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
        stack = StackSettings(dtype, param_dtype, {True: "full", False: "none"}.get(remat, remat), scan_layers)
        self.visual = self.vision_tower(config.vision, sharding, stack, rngs=rngs)
        self.language_model = TextModel(config.text, sharding, stack, attention=attention, mlp_chunk=mlp_chunk,
                                        rngs=rngs)
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
    def image_features(self, pixel_values: jax.Array, layout: Any) -> tuple[jax.Array, jax.Array | None]:
        """pixel_values [L, C*T*P*P] -> (visual tokens [L / 4, D] in image order, DeepStack
        features [n, L / 4, D] or None)."""
        raise NotImplementedError

    def vision_layout(self, image_grid_thw: np.ndarray, *, per_image: bool = True) -> Any:
        """The vision tower's layout of images with grids `image_grid_thw` [images, 3] (host side).
        per_image: each image attends to itself only, with a leading image axis when the grids are
        equal, so an image's features do not depend on the others in the batch."""
        return type(self).layout_fn(np.asarray(image_grid_thw), self.config.vision, per_image=per_image)

    def _layout(self, image_grid_thw: jax.Array | None, layout: Any | None) -> Any:
        if layout is not None:
            return layout
        if not is_concrete(image_grid_thw):
            raise ValueError(
                "image_grid_thw is traced (inside jit): pass vision_layout=model.vision_layout(image_grid_thw) "
                "computed on the host as an argument instead"
            )
        return self.vision_layout(image_grid_thw)

    def scatter_images(self, input_ids: jax.Array, emb: jax.Array, features: jax.Array,
                       deepstack: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """Scatter visual features [N, D] (N >= the number of image tokens, padded) at the image
        tokens of `input_ids` in row-major order (HF's masked_scatter); DeepStack features
        [n, N, D] likewise into [n, B, S, D], zeros elsewhere."""
        is_img = jnp.asarray(input_ids) == self.config.image_token_id
        src = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, features.shape[0] - 1).reshape(is_img.shape)
        emb = jnp.where(is_img[..., None], features.astype(emb.dtype)[src], emb)
        if deepstack is not None:
            deepstack = jnp.where(is_img[None, ..., None], deepstack.astype(emb.dtype)[:, src], jnp.zeros((), emb.dtype))
        return emb, deepstack

    def embed(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        vision_layout: Any | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """(token embeddings [B, S, D] with the visual tokens at the image tokens, DeepStack
        features [n, B, S, D] at the same positions or None)."""
        emb = self.language_model.embed_tokens(jnp.asarray(input_ids))
        if pixel_values is None:
            return emb, None
        n_visual = pixel_values.shape[0] // self.config.vision.spatial_merge_size**2
        n_tok = int(np.sum(np.asarray(input_ids) == self.config.image_token_id)) if is_concrete(input_ids) else None
        if n_tok is not None and n_tok != n_visual:
            raise ValueError(
                f"input_ids hold {n_tok} image tokens but pixel_values give {n_visual} visual "
                "tokens; the prompt must carry one <|image_pad|> per merged patch (t*h*w/4 per image)"
            )
        feats, deep = self.image_features(pixel_values, self._layout(image_grid_thw, vision_layout))
        return self.scatter_images(input_ids, emb, feats, deep)

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
        vision_layout: Any | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, S, D] (the model without its LM head).

        input_ids [B, S] int; attention_mask [B, S] (1 real, 0 pad); pixel_values
        [patches, C*T*P*P] of all images of the batch; image_grid_thw [images, 3]; position_ids
        [3, B, S] or [B, S] (default: get_rope_index); vision_layout: `self.vision_layout(...)`
        computed on the host (required under jit when there are images)."""
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

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        """Logits [B, S, vocab] fp32 of `hidden_states(...)` (the same arguments: input_ids,
        attention_mask, pixel_values, image_grid_thw, position_ids, vision_layout=)."""
        return self.logits(self.hidden_states(*args, **kwargs))

    @classmethod
    def trainable_filter(cls, freeze_vision: bool = False, train_merger: bool = True) -> nnx.filterlib.Filter:
        """An nnx filter of the parameters to optimise: all of them, or (freeze_vision) all but the
        vision tower, keeping its projectors (`projectors`) trainable unless train_merger=False.

        Example: `nnx.Optimizer(model, optax.adamw(1e-5), wrt=Qwen25VL.trainable_filter(freeze_vision=True))`.
        """
        if not freeze_vision:
            return nnx.Param
        projectors = cls.projectors

        def frozen(path, _value) -> bool:
            names = [str(p) for p in path]
            if not names or names[0] != "visual":
                return False
            return not (train_merger and len(names) > 1 and names[1] in projectors)

        return nnx.All(nnx.Param, nnx.Not(frozen))
