"""Hugging Face safetensors checkpoint -> Flax NNX model, for every family registered in `hf_rules`.

`load_hf_model` builds the model abstractly (`nnx.eval_shape`), checks the files' keys and shapes
against the family's table, and fills each parameter from the files: with a mesh, each device
reads only its shard through safetensors slicing (a stacked parameter's shard: that region of
every layer's tensor). Both key layouts load (`hf_rules.canonical_hf_key`).
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from .config import ShardingConfig
from .hf_rules import Entry, canonical_hf_key, expand_rules, hf_index, hf_to_nnx, leaf_shape, param_at
from .layers import DType

_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class _Checkpoint:
    """Lazy reader over `model.safetensors` or an index of shards."""

    def __init__(self, directory: str):
        self.dir = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            from ibis_jax.fileio import read_json

            weight_map = read_json(index, "safetensors index")["weight_map"]
        elif os.path.exists(single):
            with safe_open(single, framework="np") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"{directory}: neither model.safetensors nor model.safetensors.index.json found "
                "(PyTorch .bin checkpoints are not supported: re-save with safe_serialization=True)"
            )
        self.files = {canonical_hf_key(k): (v, k) for k, v in weight_map.items()}
        self._open: dict[str, Any] = {}

    def get(self, key: str) -> np.ndarray:
        f, raw_key = self._file(key)
        return f.get_tensor(raw_key)

    def _file(self, key: str):
        fname, raw_key = self.files[key]
        if fname not in self._open:
            path = os.path.join(self.dir, fname)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: listed in the index for {raw_key} but missing")
            self._open[fname] = safe_open(path, framework="np")
        return self._open[fname], raw_key

    def shape(self, key: str) -> tuple[int, ...]:
        f, raw_key = self._file(key)
        return tuple(f.get_slice(raw_key).get_shape())

    def read(self, key: str, transform: str, index: tuple | None = None) -> np.ndarray:
        """The tensor in NNX layout, or only its region `index` (slices in NNX layout; read
        through safetensors' slicing, so a device's shard never needs the whole tensor)."""
        if index is None or transform == "patch" or not index:
            x = hf_to_nnx(self.get(key), transform)
            return x if index is None else x[index]
        f, raw_key = self._file(key)
        return hf_to_nnx(f.get_slice(raw_key)[hf_index(transform, tuple(index))], transform)

    def where(self, key: str) -> str:
        return os.path.join(self.dir, self.files[key][0])


def load_family(directory: str | os.PathLike, config_class: type, model_class: type, *args: Any,
                **kwargs: Any) -> nnx.Module:
    """A family's `load_hf`: `config_class.from_hf_config(directory)`, then `load_hf_model`."""
    directory = os.fspath(directory)
    return load_hf_model(directory, config_class.from_hf_config(directory), model_class, *args, **kwargs)


def load_hf_model(
    directory: str | os.PathLike,
    config: Any,
    model_cls: type,
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
) -> nnx.Module:
    """`model_cls(config, ...)` (a `vlm.VisionLanguageModel`) filled from the files of
    `directory`, for any family registered here.

    dtype: parameter dtype (compute_dtype defaults to it). mesh: when given, every parameter is
    placed with `NamedSharding(mesh, spec)` from `sharding` (default `ShardingConfig.fsdp_tensor()`),
    each device reading only its shard from the files (a stacked parameter's shard: that region
    of every layer's tensor). The model is never materialised at random: its shapes come from
    `nnx.eval_shape`. remat / scan_layers / attention / mlp_chunk / freeze_vision: as the model's
    constructor (they change the program, not the weights).
    """
    directory = os.fspath(directory)
    if sharding is None:
        sharding = ShardingConfig.fsdp_tensor() if mesh is not None else ShardingConfig.no_sharding()
    compute_dtype = compute_dtype or dtype
    abstract = nnx.eval_shape(
        lambda: model_cls(
            config,
            dtype=compute_dtype,
            param_dtype=dtype,
            sharding=sharding,
            remat=remat,
            scan_layers=scan_layers,
            attention=attention,
            mlp_chunk=mlp_chunk,
            freeze_vision=freeze_vision,
            rngs=nnx.Rngs(0),
        )
    )
    graphdef, state = nnx.split(abstract)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state)) if mesh is not None else None
    pure = nnx.to_pure_dict(state)
    ckpt = _Checkpoint(directory)
    entries = expand_rules(config)
    _check_keys(directory, ckpt, entries, config)
    groups: dict[tuple, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.path, []).append(e)
    for path, group in groups.items():
        leaf = param_at(pure, path)
        want = leaf_shape(group[0], leaf)
        for e in group:
            have = _nnx_shape(ckpt.shape(e.hf), e.transform, config)
            if have != want:
                raise ValueError(
                    f"{ckpt.where(e.hf)}: {e.hf} has shape {have} after transform {e.transform!r}, "
                    f"model path {'.'.join(path)} expects {want}: config.json and weights disagree"
                )
        dtype_ = leaf.dtype

        def read(index, group=group, dtype_=dtype_):
            """The region `index` of the parameter (None: all of it) from the files."""
            if group[0].layer is None:
                return np.asarray(ckpt.read(group[0].hf, group[0].transform, index)).astype(dtype_)
            rows = range(len(group)) if index is None else range(len(group))[index[0]]
            rest = None if index is None else tuple(index[1:])
            return np.stack([np.asarray(ckpt.read(group[i].hf, group[i].transform, rest)).astype(dtype_)
                             for i in rows])

        if mesh is not None:
            # Each device (of every host) reads only its slice of the files.
            sharding_ = jax.sharding.NamedSharding(mesh, param_at(specs, path))
            value = jax.make_array_from_callback(tuple(leaf.shape), sharding_, read)
        else:
            value = jnp.asarray(read(None))
        _set(pure, path, value)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _nnx_shape(hf_shape: tuple[int, ...], transform: str, config) -> tuple[int, ...]:
    if transform == "T":
        return tuple(reversed(hf_shape))
    if transform == "patch":
        return (int(np.prod(hf_shape[1:])), hf_shape[0])
    return tuple(hf_shape)


def _check_keys(directory: str, ckpt: "_Checkpoint", entries: list[Entry], config) -> None:
    missing = [e.hf for e in entries if e.hf not in ckpt.files]
    used = {e.hf for e in entries}
    unexpected = [
        k
        for k in ckpt.files
        if k not in used and not _IGNORED.match(k) and not (k == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if missing or unexpected:
        raise ValueError(
            f"{directory}: checkpoint does not match config.json.\n"
            f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
            f"  unexpected keys ({len(unexpected)}): "
            + ", ".join(f"{k} (in {os.path.basename(ckpt.where(k))})" for k in unexpected[:20])
        )


def _set(tree: dict, path: tuple, value: Any) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value
