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
from typing import Any

from ibis_jax.models.qwen2_5_vl.config import ShardingConfig  # noqa: F401  (re-exported)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
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
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of `pixel_values`: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def num_grid_per_side(self) -> int:
        """Side of the square learned position grid (48 for 2304 entries)."""
        return math.isqrt(self.num_position_embeddings)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen3 decoder (HF `text_config`): per-head q/k RMSNorm, no attention biases,
    interleaved multimodal RoPE. head_dim is its own field (4B: hidden 2560, 32 heads of 128)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5000000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    max_position_embeddings: int = 262144
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None

    # The switches of the shared decoder (`qwen2_5_vl.text`) that make it Qwen3: properties, so
    # they are fixed for the family and never written to config.json.
    @property
    def qkv_bias(self) -> bool:
        return False

    @property
    def qk_norm(self) -> bool:
        return True

    @property
    def mrope_interleaved(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    """Everything that defines the computation of `Qwen3VLForConditionalGeneration`."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    @property
    def multimodal_token_ids(self) -> tuple[int, ...]:
        """The placeholder ids the processor writes around and for visual tokens (never to be
        generated: each image-pad id is a slot for the next visual feature)."""
        return (self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id)

    def __post_init__(self):
        v, t = self.vision, self.text
        if v.hidden_size % v.num_heads:
            raise ValueError(f"vision_config.hidden_size {v.hidden_size} not divisible by num_heads {v.num_heads}")
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
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError("text_config.num_attention_heads must be a multiple of num_key_value_heads")
        if 2 * sum(t.mrope_section) != t.head_dim:
            raise ValueError(
                f"text_config rope mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}"
            )
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(
                f"vision_config.out_hidden_size {v.out_hidden_size} must equal text hidden_size {t.hidden_size}"
            )
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
            text=TextConfig(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36),
            tie_word_embeddings=True,
        )

    @classmethod
    def qwen3_vl_2b(cls) -> "Qwen3VLConfig":
        """Qwen/Qwen3-VL-2B-Instruct (SigLIP-2 large ViT, Qwen3-1.7B decoder, tied embeddings)."""
        return cls(
            vision=VisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2048,
                                deepstack_visual_indexes=(5, 11, 17)),
            text=TextConfig(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
            tie_word_embeddings=True,
        )

    @classmethod
    def tiny(cls, vocab_size: int = 512, **token_ids: int) -> "Qwen3VLConfig":
        """A CPU-sized model for tests: 3 text layers, 4 vision blocks with DeepStack taps after
        blocks 0 and 2, an 8x8 position table (so every test image interpolates it), and
        head_dim 48 != hidden / heads (as the 4B), so a wrong head_dim cannot pass parity.
        `token_ids` overrides image_token_id / vision_start_token_id / ... to match a small tokenizer."""
        return cls(
            vision=VisionConfig(
                depth=4,
                hidden_size=64,
                intermediate_size=96,
                num_heads=4,
                out_hidden_size=128,
                num_position_embeddings=64,
                deepstack_visual_indexes=(0, 2),
            ),
            text=TextConfig(
                vocab_size=vocab_size,
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=48,
                mrope_section=(8, 8, 8),
                max_position_embeddings=4096,
                bos_token_id=None,
                eos_token_id=None,
            ),
            **token_ids,
        )

    # ------------------------------------------------------------------ HF io
    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | os.PathLike) -> "Qwen3VLConfig":
        """Build from an HF `config.json` dict, file path, or model directory (nested layout:
        `text_config` with `rope_parameters` or the older `rope_scaling`, `vision_config`)."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            from ibis_jax.fileio import read_json

            config = read_json(path, "model config (config.json)")
        if config.get("model_type") not in (None, "qwen3_vl"):
            raise ValueError(
                f"config model_type is {config.get('model_type')!r}; expected 'qwen3_vl' "
                "(MoE checkpoints, 'qwen3_vl_moe', are not supported by this port)"
            )
        text = dict(config.get("text_config") or {})
        if text.get("attention_bias"):
            raise ValueError("config text_config.attention_bias=true is not supported (released Qwen3-VL: false)")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"config text_config rope_type {rope.get('rope_type')!r}: only 'default' is supported")
        if rope.get("mrope_interleaved") is False:
            raise ValueError("config text_config mrope_interleaved=false: Qwen3-VL always interleaves the mRoPE axes")
        tkw = {f.name: text[f.name] for f in dataclasses.fields(TextConfig) if f.name in text}
        if tkw.get("num_key_value_heads") is None:
            tkw["num_key_value_heads"] = tkw.get("num_attention_heads", TextConfig.num_attention_heads)
        if tkw.get("head_dim") is None:
            tkw.pop("head_dim", None)
        tkw["rope_theta"] = float(rope.get("rope_theta", text.get("rope_theta", TextConfig.rope_theta)))
        tkw["mrope_section"] = tuple(rope.get("mrope_section", TextConfig.mrope_section))

        vis = dict(config.get("vision_config") or {})
        vkw = {f.name: vis[f.name] for f in dataclasses.fields(VisionConfig) if f.name in vis}
        for name in ("patch_size", "temporal_patch_size"):
            if isinstance(vkw.get(name), (list, tuple)):
                raise ValueError(f"config vision_config.{name} must be an int")
        vrope = vis.get("rope_parameters") or {}
        vkw["rope_theta"] = float(vrope.get("rope_theta", vis.get("rope_theta", VisionConfig.rope_theta)))
        vkw["deepstack_visual_indexes"] = tuple(vkw.get("deepstack_visual_indexes",
                                                        VisionConfig.deepstack_visual_indexes))

        tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        top = {
            k: config[k]
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            if k in config
        }
        return cls(vision=VisionConfig(**vkw), text=TextConfig(**tkw), tie_word_embeddings=bool(tie), **top)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` content that transformers' `Qwen3VLConfig` reads (nested layout)."""
        t, v = self.text, self.vision
        text = dataclasses.asdict(t)
        text.pop("rope_theta")
        text.pop("mrope_section")
        text.update(
            model_type="qwen3_vl_text",
            rope_parameters={
                "rope_type": "default",
                "mrope_section": list(t.mrope_section),
                "mrope_interleaved": True,
                "rope_theta": t.rope_theta,
            },
            attention_bias=False,
            attention_dropout=0.0,
            use_cache=True,
        )
        vision = dataclasses.asdict(v)
        vision.pop("rope_theta")
        vision.update(
            model_type="qwen3_vl_vision",
            deepstack_visual_indexes=list(v.deepstack_visual_indexes),
            rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
        )
        return {
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": "qwen3_vl",
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
