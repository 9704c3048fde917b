"""Flax NNX ports of the policy models (`qwen2_5_vl`, `qwen3_vl`) and the family dispatch:
`load_hf(directory)` / `model_config_from_hf(directory)` read `config.json`'s `model_type` and
call the matching family."""

from __future__ import annotations

import importlib
import os
from typing import Any

# config.json model_type -> the family's module (each has `load_hf`, `save_hf` and a config class
# with `from_hf_config`).
FAMILIES = {"qwen2_5_vl": "ibis_jax.models.qwen2_5_vl", "qwen3_vl": "ibis_jax.models.qwen3_vl"}
_CONFIG_CLASSES = {"qwen2_5_vl": "Qwen25VLConfig", "qwen3_vl": "Qwen3VLConfig"}


def model_type(directory: str | os.PathLike) -> str:
    """The `model_type` of `directory/config.json` (or of that file), checked against `FAMILIES`."""
    from ibis_jax.fileio import read_json

    path = os.fspath(directory)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    kind = read_json(path, "model config (config.json)").get("model_type")
    if kind not in FAMILIES:
        raise ValueError(f"{path}: model_type {kind!r} is not supported; use one of {', '.join(FAMILIES)}")
    return kind


def family(directory: str | os.PathLike):
    """The family module (`ibis_jax.models.qwen2_5_vl` or `...qwen3_vl`) of a model directory."""
    return importlib.import_module(FAMILIES[model_type(directory)])


def model_config_from_hf(directory: str | os.PathLike) -> Any:
    """`Qwen25VLConfig` or `Qwen3VLConfig` of a Hugging Face model directory, by its model_type."""
    kind = model_type(directory)
    return getattr(importlib.import_module(FAMILIES[kind]), _CONFIG_CLASSES[kind]).from_hf_config(directory)


def load_hf(directory: str | os.PathLike, *args: Any, **kwargs: Any):
    """`load_hf` of the family named by `directory/config.json` (same arguments: dtype, mesh,
    compute_dtype, sharding, remat, scan_layers, freeze_vision) -> `Qwen25VL` or `Qwen3VL`."""
    return family(directory).load_hf(directory, *args, **kwargs)


def save_hf(model: Any, directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """`save_hf` of `model`'s family (by its class)."""
    for module in FAMILIES.values():
        if module == type(model).__module__.rsplit(".", 1)[0]:
            return importlib.import_module(module).save_hf(model, directory, *args, **kwargs)
    raise TypeError(f"save_hf: {type(model).__name__} is not a model of {', '.join(FAMILIES)}")
