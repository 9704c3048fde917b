"""Qwen2.5-VL in Flax NNX: trainable model, Hugging Face import/export, processor."""

from .config import Qwen25VLConfig, ShardingConfig, TextConfig, VisionConfig
from .modeling import Qwen25VL, get_rope_index, trainable_filter
from .params import load_hf, save_hf
from .text import KVCache
from .vision import VisionLayout, vision_layout

__all__ = ["KVCache", "Qwen25VL", "Qwen25VLConfig", "ShardingConfig", "TextConfig", "VisionConfig",
           "VisionLayout", "get_rope_index", "load_hf", "save_hf", "trainable_filter", "vision_layout"]
