"""Qwen3-VL (HF `Qwen3VLForConditionalGeneration`, dense) as a trainable Flax NNX module.

Called like `Qwen25VL` (`vlm.VisionLanguageModel`: `model(input_ids, attention_mask,
pixel_values, image_grid_thw) -> logits`, `hidden_states`, `embed`, `image_features`,
`vision_layout`). The decoder is the shared one of `qwen2_5_vl.text` switched to Qwen3 by the text
config (q/k norms, no biases, interleaved mRoPE). Qwen3-VL's own part is its vision tower: a learned
absolute position table interpolated to each image's grid, full attention within each image, and
DeepStack: `image_features` returns (visual tokens, DeepStack features) and `embed` scatters both,
so the decoder adds the features of intermediate vision layers after its first layers.
"""

from __future__ import annotations

import jax

from ibis_jax.models.qwen2_5_vl.positions import get_rope_index
from ibis_jax.models.qwen2_5_vl.text import KVCache
from ibis_jax.models.qwen2_5_vl.vlm import VisionLanguageModel

from .vision import VisionLayout, VisionTransformer, vision_layout


class Qwen3VL(VisionLanguageModel):
    """Qwen3-VL: vision tower (+ DeepStack mergers) + Qwen3 decoder + LM head (the options:
    `VisionLanguageModel`; freeze_vision stops gradients at the final output and the DeepStack taps,
    the merger and the DeepStack mergers still train)."""

    vision_tower = VisionTransformer
    layout_fn = staticmethod(vision_layout)
    projectors = ("merger", "deepstack_merger_list")

    def image_features(self, pixel_values: jax.Array, layout: VisionLayout) -> tuple[jax.Array, jax.Array | None]:
        """pixel_values [L, C*T*P*P] -> (visual tokens [L / 4, D], DeepStack features
        [n, L / 4, D] or None), in image order."""
        vis = self.visual
        h, taps = vis.encode(pixel_values, layout)
        if self.freeze_vision:
            h = jax.lax.stop_gradient(h)
            taps = [jax.lax.stop_gradient(t) for t in taps]
        return vis.merger(h), (vis.deepstack(taps) if taps else None)


trainable_filter = Qwen3VL.trainable_filter

__all__ = ["Qwen3VL", "get_rope_index", "trainable_filter", "KVCache", "VisionLayout", "vision_layout"]
