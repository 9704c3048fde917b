"""Typed training configuration: a Python file builds a `TrainConfig`, the command line overrides
fields with `key=value` (levanter style).

A config file defines `get_config() -> TrainConfig` (or a module-level `config`). Overrides parse
the value with the field's type: `batch_size=16`, `lr=3e-5`, `freeze_vision=false`,
`mesh_shape=2,2,2`, `lora_targets=q_proj,v_proj`, `hf_dir=none`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import importlib.util
import os
import types
import typing
from typing import Any, Sequence

from ibis_jax.agent.prompts import system_prompt


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # -- model
    model: str = "tiny"  # preset when hf_dir is None (`ibis_jax.models.PRESETS`): tiny (Qwen2.5-VL),
    # tiny_qwen3_vl, qwen2_5_vl_3b, qwen2_5_vl_7b, qwen3_vl_2b, qwen3_vl_4b, qwen3_vl_8b
    hf_dir: str | None = None  # HF model dir (weights + tokenizer); None: random init of `model`
    tokenizer_dir: str | None = None  # default hf_dir; tiny without either: built under the workdir
    param_dtype: str = "float32"
    compute_dtype: str = "float32"  # bfloat16 for the GPU / TPU configs
    remat: bool = False  # rematerialise each layer in the backward pass, under `remat_policy`
    remat_policy: str = "full"  # with remat: full | dots_saveable | dots_with_no_batch_dims_saveable
    scan_layers: bool = True  # decoder layers and vision blocks as lax.scans (False: unrolled, debugging)
    attention: str = "auto"  # auto (splash on TPU, dot_product on GPU, xla on CPU) | xla | dot_product | splash
    mlp_chunk: int = 0  # > 0: the MLP runs over this many sequence positions at a time (rematerialised)
    freeze_vision: bool = True  # docs/design.md section 5: vision tower frozen, merger trains
    lora_rank: int = 0  # 0 = full fine-tuning of the trainable params
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # -- mesh (data, fsdp, tensor); -1 in one slot = the remaining devices
    mesh_shape: tuple[int, int, int] = (-1, 1, 1)
    # -- data
    history: str = "none"  # none | full (docs/design.md section 1)
    system_prompt: str = "full"  # a name in agent.prompts.SYSTEM_PROMPTS (full | short); recorded with the export
    image_size: int = 112  # square, a multiple of 28 (Qwen2.5-VL) or 32 (Qwen3-VL)
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
        if self.image_size <= 0 or (self.image_size % 28 and self.image_size % 32):
            raise ValueError(f"config image_size {self.image_size} must be a multiple of 28 (Qwen2.5-VL's 14 px "
                             "patches, 2 x 2 merge) or of 32 (Qwen3-VL's 16 px patches)")
        if self.history not in ("none", "full"):
            raise ValueError(f"config history must be 'none' or 'full', got {self.history!r}")
        system_prompt(self.system_prompt)  # a name agent.prompts knows, else a ValueError naming the field
        if self.remat_policy not in ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"):
            raise ValueError(f"config remat_policy {self.remat_policy!r}: use full, dots_saveable, "
                             "dots_with_no_batch_dims_saveable or none")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"config {name} {getattr(self, name)!r}: use float32, bfloat16 or float16")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def remat_name(self) -> str:
        """The remat policy the model runs with ("none" unless `remat`)."""
        return self.remat_policy if self.remat else "none"


def _parse(value: str, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null", ""):
            return None
        return _parse(value, next(a for a in args if a is not type(None)))
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        items = [v for v in value.split(",") if v.strip()]
        inner = args[0] if args else str
        if typing.get_origin(inner) is tuple:  # ((0.8, 3.0), ...) written 0.8:3,0.7:2
            return tuple(tuple(_parse(p.strip(), a) for p, a in zip(v.split(":"), typing.get_args(inner)))
                         for v in items)
        return tuple(_parse(v.strip(), inner) for v in items)
    if origin in (dict, collections.abc.Mapping) or typ in (dict,):  # name:value,name:value
        key_t, value_t = args or (str, str)
        pairs = [v.split(":", 1) for v in value.split(",") if v.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"expected name:value,name:value, got {value!r}")
        return {_parse(k.strip(), key_t): _parse(v.strip(), value_t) for k, v in pairs}
    if typ is bool:
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if dataclasses.is_dataclass(typ):
        raise ValueError(f"{typ.__name__} is a group of fields: set its fields (name.field=value)")
    return typ(value)


def _type_name(typ: Any) -> str:
    return getattr(typ, "__name__", None) if typing.get_origin(typ) is None else str(typ).replace("typing.", "")


def field_names(obj: Any, prefix: str = "") -> list[str]:
    """Every settable field of a (nested) dataclass as a dotted name: ``grpo.epsilon_high``..."""
    names = []
    for key, typ in typing.get_type_hints(type(obj)).items():
        value = getattr(obj, key)
        if dataclasses.is_dataclass(value):
            names += field_names(value, f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


def _nearest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if not close:  # match the last component alone (rl.epsilon_hi -> rl.grpo.epsilon_high)
        tails = {n.rsplit(".", 1)[-1]: n for n in names}
        close = [tails[t] for t in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(tails), n=3, cutoff=0.5)]
    return ", ".join(close) if close else "none close"


def _resolve(obj: Any, key: str, prefix: str = "") -> str:
    """``key`` as a full dotted field name; a bare leaf name that exists in exactly one nested
    group resolves to it (``group_size`` -> ``grpo.group_size``); else the error names the
    field, the group and the nearest valid names."""
    names = field_names(obj)
    if key in names:
        return key
    leaf_matches = [n for n in names if n.rsplit(".", 1)[-1] == key]
    if "." not in key and len(leaf_matches) == 1:
        return leaf_matches[0]
    if len(leaf_matches) > 1:
        raise KeyError(f"{prefix}{key!r} is ambiguous: write one of {', '.join(prefix + n for n in leaf_matches)}")
    raise KeyError(f"no field {prefix + key!r} in {type(obj).__name__}; nearest: "
                   f"{_nearest(prefix + key, [prefix + n for n in names])}")


def _set(obj: Any, path: Sequence[str], value: str, full: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    head = path[0]
    if len(path) > 1:
        return dataclasses.replace(obj, **{head: _set(getattr(obj, head), path[1:], value, full)})
    try:
        parsed = _parse(value, hints[head])
    except (ValueError, TypeError) as e:
        raise ValueError(f"override {full}={value}: field {full} has type {_type_name(hints[head])}: {e}") from None
    try:
        return dataclasses.replace(obj, **{head: parsed})
    except ValueError as e:  # the dataclass's own validation (__post_init__)
        raise ValueError(f"override {full}={value}: {e}") from None


def apply_dotted_overrides(obj: Any, overrides: Sequence[str], prefix: str = "",
                           aliases: dict[str, str] | None = None) -> Any:
    """``["grpo.epsilon_high=0.28", "steps=20"]`` -> a new (nested, frozen) dataclass.

    Values parse with the field's type (ints, floats, bools, ``None``, tuples ``a,b``, mappings
    ``name:value,name:value``, literals). ``prefix`` is how the names are written on the command
    line (``rl.``), for the messages. An unknown or ill-typed override names the field, its type
    and the nearest valid names. ``aliases``: extra spellings (old flat names) -> dotted names.
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: write key=value")
        key, value = item.split("=", 1)
        key = key.removeprefix(prefix) if prefix else key
        key = (aliases or {}).get(key, key)
        try:
            full = _resolve(obj, key, prefix)
        except KeyError as e:
            raise ValueError(f"override {prefix}{key}={value}: {e.args[0]}") from None
        obj = _set(obj, full.split("."), value, prefix + full)
    return obj


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """`["lr=3e-5", "mesh_shape=2,2,2"]` -> a new config; unknown keys name the nearest valid ones."""
    return apply_dotted_overrides(config, overrides)


def run_config_file(path: str | os.PathLike, function: str, attribute: str | None = None) -> Any:
    """Run a config file and return its `function()` (else its `attribute`, else None). A missing
    file, one that cannot run, or a field check failing inside it is an error naming the file."""
    path = os.fspath(path)
    spec = importlib.util.spec_from_file_location("ibis_config_file", path)
    if spec is None or not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} not found (see configs/ for examples)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if hasattr(module, function):
            return getattr(module, function)()
        return getattr(module, attribute, None) if attribute else None
    except ValueError as e:  # a field check of the config: its message names the field
        if str(e).startswith(path):
            raise
        raise ValueError(f"config file {path}: {e}") from None
    except Exception as e:  # a syntax error, a bad import...: the file is the user's to fix
        line = getattr(e, "lineno", None)
        raise ValueError(f"config file {path}{f' line {line}' if line else ''}: cannot run it "
                         f"({type(e).__name__}: {e}); fix the file (see configs/ for examples)") from None


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Run a config file (`get_config()` or `config`) and apply `key=value` overrides."""
    path = os.fspath(path)
    config = run_config_file(path, "get_config", "config")
    if config is None:
        raise ValueError(f"{path}: define get_config() -> TrainConfig")
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
