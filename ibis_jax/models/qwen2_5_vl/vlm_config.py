"""What every policy family's config is, and how it reads and writes a Hugging Face `config.json`.

`VisionLanguageConfig` holds the family-independent part of `Qwen25VLConfig` and `Qwen3VLConfig`:
the vision and text sections, the special token ids and the tied head, the checks that hold for
both, and `to_hf_dict` (the nested transformers >= 5 layout). A family's `from_hf_config` reads
its own quirks and takes the shared parsing from the helpers here (`read_hf_config`,
`text_kwargs`, `vision_kwargs`, `token_ids_of`). It lives in this package because Qwen3-VL is built
on Qwen2.5-VL's layers (like `vlm.VisionLanguageModel`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

# The special token ids at the top of config.json, in that order.
TOKEN_ID_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")

# What the CPU-sized `tiny()` models of both families share (each adds its own vision layout and depth).
TINY_VISION = dict(depth=4, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=128)
TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=4096, bos_token_id=None, eos_token_id=None)


class VisionSizes:
    """Sizes derived from a ViT config's fields (a mixin of both families' `VisionConfig`)."""

    hidden_size: int
    num_heads: int
    in_channels: int
    temporal_patch_size: int
    patch_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of `pixel_values`: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


def config_json_path(path: str | os.PathLike) -> str:
    """`path/config.json` for a model directory, else `path` itself."""
    path = os.fspath(path)
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def read_hf_config(config: dict[str, Any] | str | os.PathLike, model_type: str,
                   note: str = "") -> dict[str, Any]:
    """The content of an HF `config.json` (given as a dict, a file path or a model directory),
    checked to be of `model_type` (or to name none); `note` ends the error message."""
    if not isinstance(config, dict):
        from ibis_jax.fileio import read_json

        config = read_json(config_json_path(config), "model config (config.json)")
    if config.get("model_type") not in (None, model_type):
        raise ValueError(f"config model_type is {config.get('model_type')!r}; expected {model_type!r}{note}")
    return config


def fields_in(cls: type, section: dict[str, Any]) -> dict[str, Any]:
    """The entries of `section` that are fields of the dataclass `cls`."""
    return {f.name: section[f.name] for f in dataclasses.fields(cls) if f.name in section}


def rope_parameters(text: dict[str, Any]) -> dict[str, Any]:
    """The text section's RoPE settings (`rope_parameters`, or `rope_scaling` before transformers 5)."""
    return text.get("rope_parameters") or text.get("rope_scaling") or {}


def text_kwargs(cls: Any, text: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of `cls` (a family's TextConfig, or an instance holding the defaults)
    from the HF text section, with `rope_theta` and `mrope_section` read from its RoPE settings."""
    rope = rope_parameters(text)
    kw = fields_in(cls, text)
    kw["rope_theta"] = float(rope.get("rope_theta", text.get("rope_theta", cls.rope_theta)))
    kw["mrope_section"] = tuple(rope.get("mrope_section", cls.mrope_section))
    return kw


def vision_kwargs(cls: type, vision: dict[str, Any], *, indexes: str) -> dict[str, Any]:
    """Keyword arguments of `cls` (a family's VisionConfig) from HF `vision_config`: `rope_theta`
    from its `rope_parameters`, the block-index list field `indexes` as a tuple, and the patch
    sizes checked to be ints."""
    kw = fields_in(cls, vision)
    for name in ("patch_size", "temporal_patch_size"):
        if isinstance(kw.get(name), (list, tuple)):
            raise ValueError(f"config vision_config.{name} must be an int")
    rope = vision.get("rope_parameters") or {}
    kw["rope_theta"] = float(rope.get("rope_theta", vision.get("rope_theta", cls.rope_theta)))
    kw[indexes] = tuple(kw.get(indexes, getattr(cls, indexes)))
    return kw


def token_ids_of(config: dict[str, Any]) -> dict[str, int]:
    """The special token ids a `config.json` sets."""
    return {k: config[k] for k in TOKEN_ID_FIELDS if k in config}


@dataclasses.dataclass(frozen=True)
class VisionLanguageConfig:
    """Everything that defines the computation of a vision-language model (a family subclasses it
    with its own `vision` / `text` config classes, `model_type`, `architecture` and checks)."""

    vision: Any = None
    text: Any = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    model_type: ClassVar[str]  # config.json model_type
    architecture: ClassVar[str]  # the transformers class

    @property
    def multimodal_token_ids(self) -> tuple[int, ...]:
        """The placeholder ids the processor writes around and for visual tokens. A policy must
        never generate them: the forward pass treats every image-pad id as a slot for the next
        visual feature, so one sampled pad would shift the features of every later image."""
        return tuple(getattr(self, k) for k in TOKEN_ID_FIELDS)

    def __post_init__(self):
        v, t = self.vision, self.text
        if v.hidden_size % v.num_heads:
            raise ValueError(
                f"vision_config.hidden_size {v.hidden_size} not divisible by num_heads {v.num_heads}"
            )
        self.check()
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

    def check(self) -> None:
        """The family's own checks (raise ValueError), run after the vision head split."""

    def hf_text_settings(self) -> dict[str, Any]:
        """The family's entries of the HF text section beyond the TextConfig fields (its RoPE
        settings first), in config.json order."""
        raise NotImplementedError

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` content that the family's transformers config class reads (nested
        layout; `rope_theta` and `mrope_section` inside `rope_parameters`)."""
        text = dataclasses.asdict(self.text)
        text.pop("rope_theta")
        text.pop("mrope_section")
        text.update(model_type=f"{self.model_type}_text", **self.hf_text_settings())
        vision = dataclasses.asdict(self.vision)
        vision = {k: list(x) if isinstance(x, tuple) else x for k, x in vision.items()}
        vision.pop("rope_theta")
        vision.update(model_type=f"{self.model_type}_vision",
                      rope_parameters={"rope_type": "axial", "rope_theta": self.vision.rope_theta})
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "text_config": text,
            "vision_config": vision,
            **{k: getattr(self, k) for k in TOKEN_ID_FIELDS},
            "tie_word_embeddings": self.tie_word_embeddings,
        }
