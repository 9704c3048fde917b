"""Flax NNX parameters -> a Hugging Face safetensors directory, for every family registered in `hf_rules`.

`save_hf_params` streams: the shard plan comes from shapes and dtypes alone, then each safetensors
shard is gathered tensor by tensor (`to_host`, a collective for arrays spanning hosts), written
by process 0 and dropped, so a host holds about one shard; the directory appears by one atomic
rename when complete.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
from typing import Any, Callable, Iterator

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from ibis_jax.fileio import atomic_dir

from .hf_rules import Entry, expand_rules, layout_of, leaf_shape, legacy_hf_key, nnx_to_hf, param_at
from .layers import DType


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", size, re.I)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use bytes or e.g. '5GB', '500MB'")
    unit = m.group(2).upper()
    mult = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def to_host(x: Any) -> np.ndarray:
    """One tensor to host memory on every process: arrays spanning hosts are all-gathered
    (a collective: every process must call it, in the same order), others fetched."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    if isinstance(x, jax.Array):
        # From the shards, not np.asarray(x): that caches a host copy on the array itself, so an
        # export would keep every tensor of the (live) train state in host memory.
        out = np.empty(x.shape, x.dtype)
        done = set()
        for shard in x.addressable_shards:
            key = tuple((s.start, s.stop) for s in shard.index) if x.ndim else ()
            if key not in done:
                done.add(key)
                out[shard.index] = np.asarray(shard.data)
        return out
    return np.asarray(x)


@functools.partial(jax.jit, static_argnames=("index",))
def _row(x: jax.Array, index: int) -> jax.Array:
    return x[index]


def _hf_leaves(params: dict, config, legacy_keys: bool) -> list[tuple[str, Entry, Any]]:
    return [(legacy_hf_key(e.hf) if legacy_keys else e.hf, e, param_at(params, e.path)) for e in expand_rules(config)]


def host_tensor(entry: Entry, leaf: Any) -> np.ndarray:
    """One HF tensor's value in NNX layout in host memory (a collective for arrays spanning
    hosts): a stacked parameter's row is cut on the devices first, so a host never holds more
    than one layer's tensor."""
    if entry.layer is None:
        return to_host(leaf)
    if isinstance(leaf, jax.Array):
        return to_host(_row(leaf, entry.layer))
    return np.asarray(leaf[entry.layer])


def hf_tensors(model: nnx.Module, legacy_keys: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, numpy tensor in HF layout) for every parameter, in table order, one at a time.

    legacy_keys: name them as `save_pretrained` writes them (`model.layers.*`, `visual.*`);
    False gives the in-memory names of transformers >= 4.52 (`model.language_model.*`, ...).
    """
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for key, entry, leaf in _hf_leaves(pure, model.config, legacy_keys):
        yield key, np.ascontiguousarray(nnx_to_hf(host_tensor(entry, leaf), entry.transform, model.config))


PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)



def save_hf(
    model: nnx.Module,
    directory: str | os.PathLike,
    source_dir: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    dtype: DType | None = None,
    legacy_keys: bool | None = None,
) -> None:
    """Write `model` as a Hugging Face directory: safetensors shards (+ index when more than
    one), `config.json`, and the tokenizer/processor files of `source_dir` if given.

    dtype: storage dtype of the written tensors (default: the parameters' own dtype).
    legacy_keys: write `model.layers.*` / `visual.*` names; default: the names transformers'
    `save_pretrained` writes for the family (its `Layout`). Both layouts load in `load_hf_model`
    and transformers. The parameters may be sharded over many devices and hosts: see `save_hf_params`.
    """
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    save_hf_params(params, model.config, directory, source_dir=source_dir, max_shard_size=max_shard_size,
                   dtype=dtype, legacy_keys=legacy_keys)


def save_hf_params(
    params: dict,
    config: Any,
    directory: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    dtype: DType | None = None,
    legacy_keys: bool | None = None,
    transform: Callable[[Entry, np.ndarray], np.ndarray] | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """`save_hf` from the nested parameter dict of a (possibly multi-host sharded) model.

    Streams: the shard plan comes from shapes and dtypes alone, then each safetensors shard is
    gathered tensor by tensor (`to_host`), written and dropped, so a host holds about one shard.
    Every process must call this (the gathers are collectives); only process 0 writes.
    transform(entry, host array) -> array of the same shape and dtype, applied in host memory to
    each tensor on the way out (e.g. a LoRA merge, one kernel at a time, computed in numpy, so the
    export is the same bytes whatever the mesh the parameters were sharded over). extra_files: name -> text written into
    the export with the weights (e.g. the agent settings), inside the same atomic rename.
    """
    directory = os.fspath(directory)
    if legacy_keys is None:
        legacy_keys = layout_of(config).legacy_keys
    writer = jax.process_index() == 0
    limit = _parse_size(max_shard_size)
    leaves = _hf_leaves(params, config, legacy_keys)
    stored = [np.dtype(dtype) if dtype is not None else np.dtype(leaf.dtype) for *_, leaf in leaves]
    shards: list[list[int]] = [[]]  # indices into leaves
    size = total = 0
    for i, (_, entry, leaf) in enumerate(leaves):
        nbytes = int(np.prod(leaf_shape(entry, leaf))) * stored[i].itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
        total += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)])
    # Process 0 builds the export in a hidden sibling folder renamed into place when complete: a
    # kill during the export leaves the previous directory (or none), never a torn one.
    with contextlib.ExitStack() as stack:
        out = os.fspath(stack.enter_context(atomic_dir(directory))) if writer else directory
        weight_map = {}
        for name, shard in zip(names, shards):
            tensors = {}
            for i in shard:
                key, entry, leaf = leaves[i]
                x = host_tensor(entry, leaf)
                if transform is not None:
                    x = transform(entry, x)
                if dtype is not None:
                    x = x.astype(dtype)
                tensors[key] = np.ascontiguousarray(nnx_to_hf(x, entry.transform, config))
                weight_map[key] = name
            if writer:
                save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
            del tensors
        if writer:
            if len(shards) > 1:
                with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
                    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            hf_config = config.to_hf_dict()
            hf_config["dtype"] = {"bfloat16": "bfloat16", "float16": "float16"}.get(str(stored[0]), "float32")
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump(hf_config, f, indent=2)
            if source_dir is not None:
                for fname in PROCESSOR_FILES:
                    src = os.path.join(os.fspath(source_dir), fname)
                    if os.path.exists(src):
                        shutil.copy2(src, os.path.join(out, fname))
            for fname, text in (extra_files or {}).items():
                with open(os.path.join(out, fname), "w") as f:
                    f.write(text)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"save_hf {directory}")  # nobody reads a half-written export

