"""Hugging Face checkpoint <-> Flax NNX parameters for Qwen3-VL.

`RULES` is the table HF key <-> NNX path (`{i}` = layer / block / DeepStack merger number) and the
tensor transform; the import/export machinery is Qwen2.5-VL's (`qwen2_5_vl.params`: each device
reads its shard through safetensors slicing, stacked parameters map row by row to per-layer
tensors, streaming sharded export), which finds this table by the config class. Qwen3-VL was
released with the `model.language_model.*` / `model.visual.*` names and transformers 5.x writes
them back unchanged, so `save_hf` writes those (no legacy renaming).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ibis_jax.models.qwen2_5_vl import params as _base
from ibis_jax.models.qwen2_5_vl.config import ShardingConfig
from ibis_jax.models.qwen2_5_vl.layers import DType
from ibis_jax.models.qwen2_5_vl.params import Entry, Rule, expand_rules, hf_tensors  # noqa: F401

from .config import Qwen3VLConfig
from .modeling import Qwen3VL

_V = "model.visual."
_T = "model.language_model."


def _linear(hf: str, nx: str) -> list[tuple[str, str, str]]:
    return [(f"{hf}.weight", f"{nx}.kernel", "T"), (f"{hf}.bias", f"{nx}.bias", "id")]


def _layer_norm(hf: str, nx: str) -> list[tuple[str, str, str]]:
    return [(f"{hf}.weight", f"{nx}.scale", "id"), (f"{hf}.bias", f"{nx}.bias", "id")]


# The merger and each DeepStack merger (relative names).
_MERGER = [*_layer_norm("norm", "norm"), *_linear("linear_fc1", "linear_fc1"), *_linear("linear_fc2", "linear_fc2")]


RULES: tuple[Rule, ...] = (
    Rule(_V + "patch_embed.proj.weight", "visual.patch_embed.kernel", "patch"),
    Rule(_V + "patch_embed.proj.bias", "visual.patch_embed.bias", "id"),
    Rule(_V + "pos_embed.weight", "visual.pos_embed.embedding", "id"),
    *[
        Rule(_V + f"blocks.{{i}}.{hf}", f"visual.blocks.{nx}", tr, "vision")
        for hf, nx, tr in [
            *_layer_norm("norm1", "norm1"),
            *_layer_norm("norm2", "norm2"),
            *_linear("attn.qkv", "attn.qkv"),
            *_linear("attn.proj", "attn.proj"),
            *_linear("mlp.linear_fc1", "mlp.linear_fc1"),
            *_linear("mlp.linear_fc2", "mlp.linear_fc2"),
        ]
    ],
    *[Rule(_V + "merger." + hf, "visual.merger." + nx, tr) for hf, nx, tr in _MERGER],
    *[
        Rule(_V + "deepstack_merger_list.{i}." + hf, "visual.deepstack_merger_list." + nx, tr, "deepstack")
        for hf, nx, tr in _MERGER
    ],
    Rule(_T + "embed_tokens.weight", "language_model.embed_tokens.embedding", "id"),
    *[
        Rule(_T + f"layers.{{i}}.{hf}", f"language_model.layers.{nx}", tr, "text")
        for hf, nx, tr in [
            ("input_layernorm.weight", "input_layernorm.weight", "id"),
            ("post_attention_layernorm.weight", "post_attention_layernorm.weight", "id"),
            *[(f"self_attn.{p}.weight", f"self_attn.{p}.kernel", "T") for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
            ("self_attn.q_norm.weight", "self_attn.q_norm.weight", "id"),
            ("self_attn.k_norm.weight", "self_attn.k_norm.weight", "id"),
            *[(f"mlp.{p}.weight", f"mlp.{p}.kernel", "T") for p in ("gate_proj", "up_proj", "down_proj")],
        ]
    ],
    Rule(_T + "norm.weight", "language_model.norm.weight", "id"),
    Rule("lm_head.weight", "lm_head", "T"),
)
_base.RULES_BY_CONFIG[Qwen3VLConfig] = RULES


def load_hf(
    directory: str | os.PathLike,
    dtype: DType = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    *,
    compute_dtype: DType | None = None,
    sharding: ShardingConfig | None = None,
    remat: bool | str = False,
    scan_layers: bool = True,
    attention: str = "xla",
    mlp_chunk: int = 0,
    freeze_vision: bool = False,
) -> Qwen3VL:
    """Load a Hugging Face Qwen3-VL directory (config.json + safetensors) into `Qwen3VL`.

    Same arguments as `qwen2_5_vl.load_hf`: dtype is the parameter dtype (compute_dtype defaults
    to it); with a mesh every device reads only its shard (default `ShardingConfig.fsdp_tensor()`).
    """
    directory = os.fspath(directory)
    return _base.load_hf_model(directory, Qwen3VLConfig.from_hf_config(directory), Qwen3VL, dtype, mesh,
                               compute_dtype=compute_dtype, sharding=sharding, remat=remat,
                               scan_layers=scan_layers, attention=attention, mlp_chunk=mlp_chunk, freeze_vision=freeze_vision)


def save_hf(
    model: Qwen3VL,
    directory: str | os.PathLike,
    source_dir: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    dtype: DType | None = None,
) -> None:
    """Write `model` as a Hugging Face directory (safetensors shards + index when more than one,
    `config.json`, the tokenizer/processor files of `source_dir` if given), with the key names
    transformers' `save_pretrained` writes for Qwen3-VL. Sharded parameters: `save_hf_params`."""
    save_hf_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.config, directory, source_dir=source_dir,
                   max_shard_size=max_shard_size, dtype=dtype)


def save_hf_params(
    params: dict,
    config: Qwen3VLConfig,
    directory: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    dtype: DType | None = None,
    transform: Callable[[Entry, Any], Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """`qwen2_5_vl.params.save_hf_params` for Qwen3-VL (streamed, multi-host: every process calls
    it, process 0 writes); keys in the released `model.language_model.*` / `model.visual.*` layout."""
    _base.save_hf_params(params, config, directory, source_dir=source_dir, max_shard_size=max_shard_size,
                         dtype=dtype, legacy_keys=False, transform=transform, extra_files=extra_files)
