"""Qwen3-VL (dense) in Flax NNX: trainable model, Hugging Face import/export."""

from .config import Qwen3VLConfig, TextConfig, VisionConfig
from .modeling import Qwen3VL, get_rope_index, trainable_filter
from .params import load_hf, save_hf
from .vision import VisionLayout, vision_layout

__all__ = ["Qwen3VL", "Qwen3VLConfig", "TextConfig", "VisionConfig", "VisionLayout", "get_rope_index",
           "load_hf", "save_hf", "trainable_filter", "vision_layout"]
