"""Configuration of the Qwen2.5-VL port: model hyper-parameters and parameter sharding.

`Qwen25VLConfig` mirrors the fields of transformers' `Qwen2_5_VLConfig` that change the
computation. It is built from a Hugging Face `config.json` (both the flat pre-v5 layout and the
nested `text_config` layout of transformers >= 5) and written back with `to_hf_dict()` (nested
layout); the parts both families share are `vlm_config`'s.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

from jax.sharding import PartitionSpec as P

from .vlm_config import (TINY_TEXT, TINY_VISION, VisionLanguageConfig, VisionSizes, read_hf_config, text_kwargs,
                         token_ids_of, vision_kwargs)


@dataclasses.dataclass(frozen=True)
class VisionConfig(VisionSizes):
    """The ViT of Qwen2.5-VL (HF `vision_config`)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    initializer_range: float = 0.02


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder (HF `text_config`)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None

    # Switches of the shared decoder (`text.py`; Qwen3-VL's TextConfig flips them): class
    # constants, so they never reach config.json.
    qkv_bias: ClassVar[bool] = True
    qk_norm: ClassVar[bool] = False
    mrope_interleaved: ClassVar[bool] = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig(VisionLanguageConfig):
    """Everything that defines the computation of `Qwen2_5_VLForConditionalGeneration`."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)

    model_type: ClassVar[str] = "qwen2_5_vl"
    architecture: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"

    def check(self) -> None:
        v, t = self.vision, self.text
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(
                f"text_config.hidden_size {t.hidden_size} not divisible by num_attention_heads {t.num_attention_heads}"
            )
        if v.hidden_act != "silu" or t.hidden_act != "silu":
            raise ValueError("only hidden_act='silu' is supported (as in every released Qwen2.5-VL)")

    # ------------------------------------------------------------------ presets
    @classmethod
    def qwen2_5_vl_3b(cls) -> "Qwen25VLConfig":
        """Qwen/Qwen2.5-VL-3B-Instruct."""
        return cls(
            vision=VisionConfig(out_hidden_size=2048),
            text=TextConfig(
                vocab_size=151936,
                hidden_size=2048,
                intermediate_size=11008,
                num_hidden_layers=36,
                num_attention_heads=16,
                num_key_value_heads=2,
            ),
            tie_word_embeddings=True,
        )

    @classmethod
    def qwen2_5_vl_7b(cls) -> "Qwen25VLConfig":
        """Qwen/Qwen2.5-VL-7B-Instruct (the IBISAgent policy)."""
        return cls(vision=VisionConfig(out_hidden_size=3584), text=TextConfig())

    @classmethod
    def tiny(cls, vocab_size: int = 512, **token_ids: int) -> "Qwen25VLConfig":
        """A CPU-sized model for tests and demos: 2 text layers, 4 vision blocks (2 windowed, 2 full).

        window_size 56 px = a 2x2 window of merged tokens, so a 112x112 image already has 4 windows.
        `token_ids` overrides image_token_id / vision_start_token_id / ... to match a small tokenizer.
        """
        return cls(
            vision=VisionConfig(**TINY_VISION, window_size=56, fullatt_block_indexes=(1, 3)),
            text=TextConfig(**TINY_TEXT, vocab_size=vocab_size, num_hidden_layers=2, mrope_section=(4, 6, 6)),
            **token_ids,
        )

    # ------------------------------------------------------------------ HF io
    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | os.PathLike) -> "Qwen25VLConfig":
        """Build from an HF `config.json` dict, file path, or model directory.

        Accepts the flat layout of transformers < 5 (text fields at top level, `rope_scaling`)
        and the nested one of transformers >= 5 (`text_config`, `rope_parameters`).
        """
        config = read_hf_config(config, cls.model_type)
        text = dict(config.get("text_config") or {})
        # Flat (pre-v5) configs keep text fields at the top; nested ones may still carry some there.
        for f in dataclasses.fields(TextConfig):
            if f.name not in text and f.name in config:
                text[f.name] = config[f.name]
        for k in ("rope_scaling", "rope_parameters", "rope_theta", "use_sliding_window"):
            if k not in text and k in config:
                text[k] = config[k]
        if text.get("use_sliding_window"):
            raise ValueError("config text use_sliding_window=true is not supported by this port")

        vis = dict(config.get("vision_config") or {})
        if "embed_dim" in vis and "hidden_size" not in vis:  # Qwen2-VL style name
            vis["hidden_size"] = vis["embed_dim"]
        tie = config.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False)
        return cls(vision=VisionConfig(**vision_kwargs(VisionConfig, vis, indexes="fullatt_block_indexes")),
                   text=TextConfig(**text_kwargs(TextConfig, text)), tie_word_embeddings=bool(tie),
                   **token_ids_of(config))

    def hf_text_settings(self) -> dict[str, Any]:
        return dict(
            rope_parameters={
                "rope_type": "default",
                "type": "mrope",
                "mrope_section": list(self.text.mrope_section),
                "rope_theta": self.text.rope_theta,
            },
            use_sliding_window=False,
            sliding_window=None,
            attention_dropout=0.0,
            use_cache=True,
        )


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """PartitionSpecs for every parameter, named by tensor dims (mesh axes: data, fsdp, tensor).

    Letters: v vocab, d model dim, f mlp dim, q q-heads*head_dim, k kv-heads*head_dim, h head_dim
    (Qwen3's per-head q/k norms), p patch dim, e vision dim, m merger dim. Kernels are stored [in, out] (flax), the transpose of HF's [out, in].
    """

    emb_vd: P = P()
    lm_head_dv: P = P()
    q_weight_dq: P = P()
    kv_weight_dk: P = P()
    qkv_bias_q: P = P()
    o_weight_qd: P = P()
    mlp_up_df: P = P()
    mlp_down_fd: P = P()
    norm_d: P = P()
    head_norm_h: P = P()
    patch_pe: P = P()
    vis_qkv_e3e: P = P()
    vis_proj_ee: P = P()
    vis_bias_e: P = P()
    vis_mlp_up_ef: P = P()
    vis_mlp_down_fe: P = P()
    merger_up_mm: P = P()
    merger_down_md: P = P()
    act_btd: P = P()

    @classmethod
    def no_sharding(cls) -> "ShardingConfig":
        return cls()

    @classmethod
    def fsdp_tensor(cls) -> "ShardingConfig":
        """FSDP over the input dim, tensor parallel over heads / mlp dim (Megatron-style): the
        kernels that fan out (q/k/v, MLP up, merger up, lm_head) split their output dim over
        `tensor` and their input over `fsdp`; the ones that fan back in (attention out, MLP down,
        merger down, and the [vocab, d] embedding) the other way round. Norms and vision biases
        are replicated; activations split their batch over data x fsdp."""
        fan_out = ("lm_head_dv", "q_weight_dq", "kv_weight_dk", "mlp_up_df", "vis_qkv_e3e", "vis_mlp_up_ef",
                   "merger_up_mm")
        fan_in = ("emb_vd", "o_weight_qd", "mlp_down_fd", "vis_proj_ee", "vis_mlp_down_fe", "merger_down_md")
        return cls(**dict.fromkeys(fan_out, P("fsdp", "tensor")), **dict.fromkeys(fan_in, P("tensor", "fsdp")),
                   qkv_bias_q=P("tensor"), patch_pe=P(None, "fsdp"), act_btd=P(("data", "fsdp"), None, None))
