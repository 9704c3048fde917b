"""Hugging Face checkpoint <-> Flax NNX parameters for Qwen2.5-VL.

`RULES` is the table HF key <-> NNX path (`{i}` = layer / block number) and the tensor transform;
the import/export machinery every family shares (`hf_rules`, `hf_import`, `hf_export`: each
device reads its shard through safetensors slicing, stacked parameters map row by row to
per-layer tensors, streamed multi-host export) finds it by the config class. `save_hf` writes
the legacy `model.layers.*` / `visual.*` names, as transformers' `save_pretrained` does for
Qwen2.5-VL (5.x included); both layouts load.
"""

from __future__ import annotations

import os

from .config import Qwen25VLConfig, TextConfig
from .hf_export import hf_tensors, host_tensor, save_hf, save_hf_params, to_host
from .hf_import import load_family, load_hf_model
from .hf_rules import VISION_PREFIX as _V
from .hf_rules import Entry, Rule, canonical_hf_key, decoder_rules, expand_rules, linear_rules, register
from .modeling import Qwen25VL

__all__ = ["RULES", "Entry", "Rule", "canonical_hf_key", "expand_rules", "hf_tensors", "host_tensor",
           "load_hf", "load_hf_model", "save_hf", "save_hf_params", "to_host"]

RULES: tuple[Rule, ...] = (
    Rule(_V + "patch_embed.proj.weight", "visual.patch_embed", "patch"),
    *[
        Rule(_V + f"blocks.{{i}}.{hf}", f"visual.blocks.{nx}", tr, "vision")
        for hf, nx, tr in [
            ("norm1.weight", "norm1.weight", "id"),
            ("norm2.weight", "norm2.weight", "id"),
            *linear_rules("attn.qkv", "attn.qkv"),
            *linear_rules("attn.proj", "attn.proj"),
            *[r for p in ("gate_proj", "up_proj", "down_proj") for r in linear_rules(f"mlp.{p}", f"mlp.{p}")],
        ]
    ],
    Rule(_V + "merger.ln_q.weight", "visual.merger.ln_q.weight", "id"),
    *[Rule(_V + f"merger.{hf}", f"visual.merger.{nx}", tr)
      for hf, nx, tr in [*linear_rules("mlp.0", "mlp_0"), *linear_rules("mlp.2", "mlp_2")]],
    *decoder_rules(TextConfig),
)
register(Qwen25VLConfig, RULES, legacy_keys=True)


def load_hf(directory: str | os.PathLike, *args, **kwargs) -> Qwen25VL:
    """Load a Hugging Face Qwen2.5-VL directory (config.json + safetensors) into `Qwen25VL`.

    The arguments after `directory` are `hf_import.load_hf_model`'s: dtype (of the parameters),
    mesh (each device reads only its shard), and the keywords compute_dtype, sharding, remat,
    scan_layers, attention, mlp_chunk, freeze_vision.
    """
    return load_family(directory, Qwen25VLConfig, Qwen25VL, *args, **kwargs)
