"""Configuration of the Qwen3-VL port (dense models): hyper-parameters of the ViT and the Qwen3 decoder.

`Qwen3VLConfig` mirrors the fields of transformers' `Qwen3VLConfig` that change the computation.
It is built from a Hugging Face `config.json` (the nested `text_config` / `vision_config` layout
every Qwen3-VL release uses) and written back with `to_hf_dict()`. Parameter sharding reuses
`qwen2_5_vl.config.ShardingConfig` (same tensor kinds, plus `head_norm_h` for the q/k norms).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar

from ibis_jax.models.qwen2_5_vl import config as qwen25_config
from ibis_jax.models.qwen2_5_vl.config import ShardingConfig
from ibis_jax.models.qwen2_5_vl.vlm_config import (TINY_TEXT, TINY_VISION, VisionLanguageConfig, VisionSizes,
                                                   read_hf_config, rope_parameters, text_kwargs, token_ids_of,
                                                   vision_kwargs)

__all__ = ["Qwen3VLConfig", "ShardingConfig", "TextConfig", "VisionConfig"]


@dataclasses.dataclass(frozen=True)
class VisionConfig(VisionSizes):
    """The ViT of Qwen3-VL (HF `vision_config`): SigLIP-2 style blocks (LayerNorm, gelu-tanh MLP
    with biases), a learned absolute position table, 2D RoPE, full attention per image frame."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    hidden_act: str = "gelu_pytorch_tanh"
    initializer_range: float = 0.02

    @property
    def num_grid_per_side(self) -> int:
        """Side of the square learned position grid (48 for 2304 entries)."""
        return math.isqrt(self.num_position_embeddings)


@dataclasses.dataclass(frozen=True)
class TextConfig(qwen25_config.TextConfig):
    """The Qwen3 decoder (HF `text_config`): the shared decoder's fields (`qwen2_5_vl.text`) with
    per-head q/k RMSNorm, no attention biases, interleaved multimodal RoPE, and head_dim a field
    of its own (4B: hidden 2560, 32 heads of 128). The released sizes start from `qwen3_8b()`."""

    head_dim: int = 128

    # The switches of the shared decoder that make it Qwen3: class constants, so they are fixed
    # for the family and never written to config.json.
    qkv_bias: ClassVar[bool] = False
    qk_norm: ClassVar[bool] = True
    mrope_interleaved: ClassVar[bool] = True

    @classmethod
    def qwen3_8b(cls, **changes: Any) -> "TextConfig":
        """The Qwen3-8B decoder of Qwen3-VL-8B (the other sizes are `changes` of it)."""
        released = cls(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=5000000.0,
                       mrope_section=(24, 20, 20), max_position_embeddings=262144)
        return dataclasses.replace(released, **changes)


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig(VisionLanguageConfig):
    """Everything that defines the computation of `Qwen3VLForConditionalGeneration`."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig.qwen3_8b)

    model_type: ClassVar[str] = "qwen3_vl"
    architecture: ClassVar[str] = "Qwen3VLForConditionalGeneration"

    def check(self) -> None:
        v, t = self.vision, self.text
        if v.head_dim % 4:
            raise ValueError(f"vision_config head_dim {v.head_dim} must be a multiple of 4 (2D RoPE over h and w)")
        if v.num_grid_per_side**2 != v.num_position_embeddings:
            raise ValueError(
                f"vision_config.num_position_embeddings {v.num_position_embeddings} must be a square (e.g. 2304 = 48^2)"
            )
        if any(not 0 <= i < v.depth for i in v.deepstack_visual_indexes) or \
                list(v.deepstack_visual_indexes) != sorted(set(v.deepstack_visual_indexes)):
            raise ValueError(
                f"vision_config.deepstack_visual_indexes {v.deepstack_visual_indexes} must be increasing block "
                f"indexes below depth {v.depth}"
            )
        if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
            raise ValueError("vision_config.deepstack_visual_indexes has more entries than text decoder layers")
        if v.hidden_act != "gelu_pytorch_tanh":
            raise ValueError("vision_config.hidden_act must be 'gelu_pytorch_tanh' (as in every released Qwen3-VL)")
        if t.hidden_act != "silu":
            raise ValueError("text_config.hidden_act must be 'silu' (as in every released Qwen3-VL)")

    # ------------------------------------------------------------------ presets
    # The released sizes (config.json of the Qwen/Qwen3-VL-*-Instruct repos); `from_hf_config`
    # on the downloaded directory is authoritative.
    @classmethod
    def qwen3_vl_8b(cls) -> "Qwen3VLConfig":
        """Qwen/Qwen3-VL-8B-Instruct (SigLIP-2 so400m ViT, Qwen3-8B decoder)."""
        return cls()

    @classmethod
    def qwen3_vl_4b(cls) -> "Qwen3VLConfig":
        """Qwen/Qwen3-VL-4B-Instruct (SigLIP-2 large ViT, Qwen3-4B decoder, tied embeddings)."""
        return cls(
            vision=VisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2560,
                                deepstack_visual_indexes=(5, 11, 17)),
            text=TextConfig.qwen3_8b(hidden_size=2560, intermediate_size=9728),
            tie_word_embeddings=True,
        )

    @classmethod
    def qwen3_vl_2b(cls) -> "Qwen3VLConfig":
        """Qwen/Qwen3-VL-2B-Instruct (SigLIP-2 large ViT, Qwen3-1.7B decoder, tied embeddings)."""
        return cls(
            vision=VisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2048,
                                deepstack_visual_indexes=(5, 11, 17)),
            text=TextConfig.qwen3_8b(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                     num_attention_heads=16),
            tie_word_embeddings=True,
        )

    @classmethod
    def tiny(cls, vocab_size: int = 512, **token_ids: int) -> "Qwen3VLConfig":
        """A CPU-sized model for tests: 3 text layers, 4 vision blocks with DeepStack taps after
        blocks 0 and 2, an 8x8 position table (so every test image interpolates it), and
        head_dim 48 != hidden / heads (as the 4B), so a wrong head_dim cannot pass parity.
        `token_ids` overrides image_token_id / vision_start_token_id / ... to match a small tokenizer."""
        return cls(
            vision=VisionConfig(**TINY_VISION, num_position_embeddings=64, deepstack_visual_indexes=(0, 2)),
            text=TextConfig.qwen3_8b(**TINY_TEXT, vocab_size=vocab_size, num_hidden_layers=3, head_dim=48,
                                     mrope_section=(8, 8, 8)),
            **token_ids,
        )

    # ------------------------------------------------------------------ HF io
    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | os.PathLike) -> "Qwen3VLConfig":
        """Build from an HF `config.json` dict, file path, or model directory (nested layout:
        `text_config` with `rope_parameters` or the older `rope_scaling`, `vision_config`)."""
        config = read_hf_config(config, cls.model_type,
                                " (MoE checkpoints, 'qwen3_vl_moe', are not supported by this port)")
        text = dict(config.get("text_config") or {})
        if text.get("attention_bias"):
            raise ValueError("config text_config.attention_bias=true is not supported (released Qwen3-VL: false)")
        rope = rope_parameters(text)
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"config text_config rope_type {rope.get('rope_type')!r}: only 'default' is supported")
        if rope.get("mrope_interleaved") is False:
            raise ValueError("config text_config mrope_interleaved=false: Qwen3-VL always interleaves the mRoPE axes")
        defaults = TextConfig.qwen3_8b()
        tkw = text_kwargs(defaults, text)
        if tkw.get("num_key_value_heads") is None:
            tkw["num_key_value_heads"] = tkw.get("num_attention_heads", defaults.num_attention_heads)
        if tkw.get("head_dim") is None:
            tkw.pop("head_dim", None)

        vis = dict(config.get("vision_config") or {})
        vkw = vision_kwargs(VisionConfig, vis, indexes="deepstack_visual_indexes")
        tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        return cls(vision=VisionConfig(**vkw), text=dataclasses.replace(defaults, **tkw), tie_word_embeddings=bool(tie),
                   **token_ids_of(config))

    def hf_text_settings(self) -> dict[str, Any]:
        return dict(
            rope_parameters={
                "rope_type": "default",
                "mrope_section": list(self.text.mrope_section),
                "mrope_interleaved": True,
                "rope_theta": self.text.rope_theta,
            },
            attention_bias=False,
            attention_dropout=0.0,
            use_cache=True,
        )
