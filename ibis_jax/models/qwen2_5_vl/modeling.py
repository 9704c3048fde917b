"""Qwen2.5-VL (HF `Qwen2_5_VLForConditionalGeneration`) as a trainable Flax NNX module.

Call: `model(input_ids, attention_mask, pixel_values, image_grid_thw) -> logits [B, S, vocab]`
with HF names and layouts; the pieces a trainer or sampler uses (`hidden_states`, `logits`,
`embed`, `image_features`, `vision_layout`, `language_model(embeds, position_ids, mask, cache)`)
are `vlm.VisionLanguageModel`'s, shared with Qwen3-VL. Qwen2.5-VL's own part is its vision tower:
windowed attention blocks with a few full-attention ones, 2D RoPE only (no absolute position),
no DeepStack.
"""

from __future__ import annotations

import jax

from .positions import get_rope_index
from .text import KVCache
from .vision import VisionLayout, VisionTransformer, image_order, vision_layout
from .vlm import VisionLanguageModel


class Qwen25VL(VisionLanguageModel):
    """Qwen2.5-VL: vision tower + Qwen2 decoder + LM head (the options: `VisionLanguageModel`)."""

    vision_tower = VisionTransformer
    layout_fn = staticmethod(vision_layout)
    projectors = ("merger",)

    def image_features(self, pixel_values: jax.Array, layout: VisionLayout) -> tuple[jax.Array, None]:
        """pixel_values [L, C*T*P*P] -> (visual tokens [L / 4, D] in image order, None)."""
        vis = self.visual
        h = vis.encode(pixel_values, layout)
        if self.freeze_vision:
            h = jax.lax.stop_gradient(h)
        return image_order(vis.merger(h), layout), None


trainable_filter = Qwen25VL.trainable_filter

__all__ = ["Qwen25VL", "get_rope_index", "trainable_filter", "KVCache", "VisionLayout", "vision_layout"]
