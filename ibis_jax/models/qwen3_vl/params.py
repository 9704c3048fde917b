"""Hugging Face checkpoint <-> Flax NNX parameters for Qwen3-VL.

`RULES` is the table HF key <-> NNX path (`{i}` = layer / block / DeepStack merger number) and the
tensor transform; the import/export machinery is the one every family shares
(`qwen2_5_vl.hf_rules`, `hf_import`, `hf_export`), which finds this table by the config class.
Qwen3-VL was released with the `model.language_model.*` / `model.visual.*` names and
transformers 5.x writes them back unchanged, so `save_hf` writes those (no legacy renaming).
"""

from __future__ import annotations

import os

from ibis_jax.models.qwen2_5_vl.hf_export import hf_tensors, save_hf, save_hf_params
from ibis_jax.models.qwen2_5_vl.hf_import import load_family
from ibis_jax.models.qwen2_5_vl.hf_rules import VISION_PREFIX as _V
from ibis_jax.models.qwen2_5_vl.hf_rules import (Entry, Rule, decoder_rules, expand_rules, layer_norm_rules,
                                                  linear_rules, register)

from .config import Qwen3VLConfig, TextConfig
from .modeling import Qwen3VL

__all__ = ["RULES", "Entry", "Rule", "expand_rules", "hf_tensors", "load_hf", "save_hf", "save_hf_params"]

# The merger and each DeepStack merger (relative names).
_MERGER = [*layer_norm_rules("norm", "norm"), *linear_rules("linear_fc1", "linear_fc1"),
           *linear_rules("linear_fc2", "linear_fc2")]


RULES: tuple[Rule, ...] = (
    Rule(_V + "patch_embed.proj.weight", "visual.patch_embed.kernel", "patch"),
    Rule(_V + "patch_embed.proj.bias", "visual.patch_embed.bias", "id"),
    Rule(_V + "pos_embed.weight", "visual.pos_embed.embedding", "id"),
    *[
        Rule(_V + f"blocks.{{i}}.{hf}", f"visual.blocks.{nx}", tr, "vision")
        for hf, nx, tr in [
            *layer_norm_rules("norm1", "norm1"),
            *layer_norm_rules("norm2", "norm2"),
            *linear_rules("attn.qkv", "attn.qkv"),
            *linear_rules("attn.proj", "attn.proj"),
            *linear_rules("mlp.linear_fc1", "mlp.linear_fc1"),
            *linear_rules("mlp.linear_fc2", "mlp.linear_fc2"),
        ]
    ],
    *[Rule(_V + "merger." + hf, "visual.merger." + nx, tr) for hf, nx, tr in _MERGER],
    *[
        Rule(_V + "deepstack_merger_list.{i}." + hf, "visual.deepstack_merger_list." + nx, tr, "deepstack")
        for hf, nx, tr in _MERGER
    ],
    *decoder_rules(TextConfig),
)
register(Qwen3VLConfig, RULES, legacy_keys=False)


def load_hf(directory: str | os.PathLike, *args, **kwargs) -> Qwen3VL:
    """Load a Hugging Face Qwen3-VL directory (config.json + safetensors) into `Qwen3VL`
    (the arguments: `qwen2_5_vl.load_hf`)."""
    return load_family(directory, Qwen3VLConfig, Qwen3VL, *args, **kwargs)
