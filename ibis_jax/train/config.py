"""Typed training configuration: a Python file builds a `TrainConfig`, the command line overrides
fields with `key=value` (levanter style).

A config file defines `get_config() -> TrainConfig` (or a module-level `config`). Overrides parse
the value with the field's type: `batch_size=16`, `lr=3e-5`, `freeze_vision=false`,
`mesh_shape=2,2,2`, `lora_targets=q_proj,v_proj`, `hf_dir=none`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing
from typing import Any, Sequence

from ibis_jax.agent.prompts import system_prompt


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # -- model
    model: str = "tiny"  # preset when hf_dir is None: tiny | qwen2_5_vl_3b | qwen2_5_vl_7b
    hf_dir: str | None = None  # HF model dir (weights + tokenizer); None: random init of `model`
    tokenizer_dir: str | None = None  # default hf_dir; tiny without either: built under the workdir
    param_dtype: str = "float32"
    compute_dtype: str = "float32"  # bfloat16 for the GPU / TPU configs
    remat: bool = False
    freeze_vision: bool = True  # SPEC section 5: vision tower frozen, merger trains
    lora_rank: int = 0  # 0 = full fine-tuning of the trainable params
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # -- mesh (data, fsdp, tensor); -1 in one slot = the remaining devices
    mesh_shape: tuple[int, int, int] = (-1, 1, 1)
    # -- data
    history: str = "none"  # none | full (SPEC section 1)
    system_prompt: str = "full"  # a name in agent.prompts.SYSTEM_PROMPTS (full | short); recorded with the export
    image_size: int = 112  # square, multiple of 28
    max_images_per_sample: int = 1  # history full: longest trajectory + 1
    seq_buckets: tuple[int, ...] = (1024,)
    overlay_alpha: float = 0.5
    overlay_color: tuple[int, int, int] = (0, 255, 0)
    shuffle_seed: int = 0
    num_workers: int = 0  # grain worker processes (0 = in-process)
    drop_too_long: bool = True  # samples longer than the largest bucket: drop (True) or error
    # -- optimisation
    batch_size: int = 8  # global, per optimizer step
    grad_accum: int = 1  # micro-batches per step (batch_size % grad_accum == 0)
    num_epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides num_epochs
    lr: float = 1e-5
    warmup_frac: float = 0.1
    end_lr_frac: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    # -- checkpoints and logs
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    export_hf: bool = True
    peak_flops: float = 0.0  # per device; 0 = guess from the device kind

    def __post_init__(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(f"config batch_size {self.batch_size} not divisible by grad_accum {self.grad_accum}")
        if self.image_size % 28:
            raise ValueError(f"config image_size {self.image_size} must be a multiple of 28")
        if self.history not in ("none", "full"):
            raise ValueError(f"config history must be 'none' or 'full', got {self.history!r}")
        system_prompt(self.system_prompt)  # a name agent.prompts knows, else a ValueError naming the field

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


def _parse(value: str, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null", ""):
            return None
        return _parse(value, next(a for a in args if a is not type(None)))
    if origin is tuple:
        items = [v for v in value.split(",") if v.strip()]
        inner = args[0] if args else str
        return tuple(_parse(v.strip(), inner) for v in items)
    if typ is bool:
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    return typ(value)


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """`["lr=3e-5", "mesh_shape=2,2,2"]` -> a new config; unknown keys name the valid ones."""
    hints = typing.get_type_hints(TrainConfig)
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: write key=value")
        key, value = item.split("=", 1)
        if key not in hints:
            raise ValueError(f"override {key!r}: no such TrainConfig field; fields: {', '.join(sorted(hints))}")
        try:
            changes[key] = _parse(value, hints[key])
        except ValueError as e:
            kind = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
            raise ValueError(f"override {key}={value}: {e} (the field is a {kind})") from None
    return dataclasses.replace(config, **changes)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Run a config file (`get_config()` or `config`) and apply `key=value` overrides."""
    path = os.fspath(path)
    spec = importlib.util.spec_from_file_location("ibis_train_config", path)
    if spec is None or not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} not found (see configs/ for examples)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if hasattr(module, "get_config"):
            config = module.get_config()
        elif hasattr(module, "config"):
            config = module.config
        else:
            raise ValueError(f"{path}: define get_config() -> TrainConfig")
    except ValueError as e:  # a field check of TrainConfig: its message names the field
        if str(e).startswith(path):
            raise
        raise ValueError(f"config file {path}: {e}") from None
    except Exception as e:  # a syntax error, a bad import...: the file is the user's to fix
        line = getattr(e, "lineno", None)
        raise ValueError(f"config file {path}{f' line {line}' if line else ''}: cannot run it "
                         f"({type(e).__name__}: {e}); fix the file (see configs/ for examples)") from None
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config file {path}: get_config() returned {type(config).__name__}, not a TrainConfig")
    return apply_overrides(config, overrides)


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    kw = {}
    for k, v in data.items():
        if k in hints:
            kw[k] = tuple(v) if isinstance(v, list) else v
    return TrainConfig(**kw)
