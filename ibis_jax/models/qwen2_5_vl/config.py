"""Configuration of the Qwen2.5-VL port: model hyper-parameters and parameter sharding.

`Qwen25VLConfig` mirrors the fields of transformers' `Qwen2_5_VLConfig` that change the
computation. It is built from a Hugging Face `config.json` (both the flat pre-v5 layout and the
nested `text_config` layout of transformers >= 5) and written back with `to_hf_dict()`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class VisionConfig:
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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of `pixel_values`: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # Switches of the shared decoder (`text.py`; Qwen3-VL's TextConfig flips them): properties,
    # so they never reach config.json.
    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def qk_norm(self) -> bool:
        return False

    @property
    def mrope_interleaved(self) -> bool:
        return False


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    """Everything that defines the computation of `Qwen2_5_VLForConditionalGeneration`."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    @property
    def multimodal_token_ids(self) -> tuple[int, ...]:
        """The placeholder ids the processor writes around and for visual tokens. A policy must
        never generate them: the forward pass treats every image-pad id as a slot for the next
        visual feature, so one sampled pad would shift the features of every later image."""
        return (self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id)

    def __post_init__(self):
        v, t = self.vision, self.text
        if v.hidden_size % v.num_heads:
            raise ValueError(f"vision_config.hidden_size {v.hidden_size} not divisible by num_heads {v.num_heads}")
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(
                f"text_config.hidden_size {t.hidden_size} not divisible by num_attention_heads {t.num_attention_heads}"
            )
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
            vision=VisionConfig(
                depth=4,
                hidden_size=64,
                intermediate_size=96,
                num_heads=4,
                window_size=56,
                out_hidden_size=128,
                fullatt_block_indexes=(1, 3),
            ),
            text=TextConfig(
                vocab_size=vocab_size,
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                mrope_section=(4, 6, 6),
                max_position_embeddings=4096,
                bos_token_id=None,
                eos_token_id=None,
            ),
            **token_ids,
        )

    # ------------------------------------------------------------------ HF io
    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | os.PathLike) -> "Qwen25VLConfig":
        """Build from an HF `config.json` dict, file path, or model directory.

        Accepts the flat layout of transformers < 5 (text fields at top level, `rope_scaling`)
        and the nested one of transformers >= 5 (`text_config`, `rope_parameters`).
        """
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            from ibis_jax.fileio import read_json

            config = read_json(path, "model config (config.json)")
        if config.get("model_type") not in (None, "qwen2_5_vl"):
            raise ValueError(f"config model_type is {config.get('model_type')!r}; expected 'qwen2_5_vl'")
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
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", text.get("rope_theta", TextConfig.rope_theta))
        mrope = tuple(rope.get("mrope_section", TextConfig.mrope_section))
        tkw = {f.name: text[f.name] for f in dataclasses.fields(TextConfig) if f.name in text}
        tkw.update(rope_theta=float(rope_theta), mrope_section=mrope)

        vis = dict(config.get("vision_config") or {})
        vkw = {f.name: vis[f.name] for f in dataclasses.fields(VisionConfig) if f.name in vis}
        if "embed_dim" in vis and "hidden_size" not in vis:  # Qwen2-VL style name
            vkw["hidden_size"] = vis["embed_dim"]
        vrope = vis.get("rope_parameters") or {}
        vkw["rope_theta"] = float(vrope.get("rope_theta", vis.get("rope_theta", VisionConfig.rope_theta)))
        vkw["fullatt_block_indexes"] = tuple(vkw.get("fullatt_block_indexes", VisionConfig.fullatt_block_indexes))
        if isinstance(vkw.get("patch_size"), (list, tuple)):
            raise ValueError("vision_config.patch_size must be an int")

        tie = config.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False)
        top = {
            k: config[k]
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            if k in config
        }
        return cls(vision=VisionConfig(**vkw), text=TextConfig(**tkw), tie_word_embeddings=bool(tie), **top)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` content that transformers' `Qwen2_5_VLConfig` reads (nested v5 layout,
        with the flat text fields repeated at the top so transformers < 5 reads it too)."""
        t, v = self.text, self.vision
        text = dataclasses.asdict(t)
        text.pop("rope_theta")
        text.pop("mrope_section")
        text.update(
            model_type="qwen2_5_vl_text",
            rope_parameters={
                "rope_type": "default",
                "type": "mrope",
                "mrope_section": list(t.mrope_section),
                "rope_theta": t.rope_theta,
            },
            use_sliding_window=False,
            sliding_window=None,
            attention_dropout=0.0,
            use_cache=True,
        )
        vision = dataclasses.asdict(v)
        vision.pop("rope_theta")
        vision.update(
            model_type="qwen2_5_vl_vision",
            fullatt_block_indexes=list(v.fullatt_block_indexes),
            rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
        )
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """PartitionSpecs for every parameter, named by tensor dims (mesh axes: data, fsdp, tensor).

    Letters: v vocab, d model dim, f mlp dim, q q-heads*head_dim, k kv-heads*head_dim, p patch dim,
    e vision dim, m merger dim. Kernels are stored [in, out] (flax), the transpose of HF's [out, in].
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
    head_norm_h: P = P()  # Qwen3 per-head q/k RMSNorm weights [head_dim]
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
        """FSDP over the input dim, tensor parallel over heads / mlp dim (Megatron-style)."""
        return cls(
            emb_vd=P("tensor", "fsdp"),
            lm_head_dv=P("fsdp", "tensor"),
            q_weight_dq=P("fsdp", "tensor"),
            kv_weight_dk=P("fsdp", "tensor"),
            qkv_bias_q=P("tensor"),
            o_weight_qd=P("tensor", "fsdp"),
            mlp_up_df=P("fsdp", "tensor"),
            mlp_down_fd=P("tensor", "fsdp"),
            norm_d=P(),
            head_norm_h=P(),
            patch_pe=P(None, "fsdp"),
            vis_qkv_e3e=P("fsdp", "tensor"),
            vis_proj_ee=P("tensor", "fsdp"),
            vis_bias_e=P(),
            vis_mlp_up_ef=P("fsdp", "tensor"),
            vis_mlp_down_fe=P("tensor", "fsdp"),
            merger_up_mm=P("fsdp", "tensor"),
            merger_down_md=P("tensor", "fsdp"),
            act_btd=P(("data", "fsdp"), None, None),
        )
