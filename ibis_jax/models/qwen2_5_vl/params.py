"""Hugging Face checkpoint <-> Flax NNX parameters for Qwen2.5-VL.

`RULES` is the single table HF key <-> NNX path (with `{i}` for layer numbers in the HF key) and
the tensor transform; `load_hf` and `save_hf` both walk it, so a name can only be wrong in one
place. The decoder layers and vision blocks are stacked in the model (one parameter
`[layers, ...]` per kind, `layers.stacked`); on disk every layer keeps its own HF tensor, so
import slices layer `i` into row `i` of the stacked parameter and export takes row `i` back out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from ibis_jax.fileio import atomic_dir

from .config import Qwen25VLConfig, ShardingConfig
from .layers import DType
from .modeling import Qwen25VL


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF key, `{i}` = layer / block number
    nnx: str  # NNX path, dot-separated; per-layer rules name the stacked parameter
    transform: str  # "id" | "T" (Linear [out,in] <-> kernel [in,out]) | "patch" (Conv3d <-> matmul)
    per: str = ""  # "" once, "vision" per vision block, "text" per decoder layer, "deepstack" per DeepStack merger


_V = "model.visual."
_T = "model.language_model."
RULES: tuple[Rule, ...] = (
    Rule(_V + "patch_embed.proj.weight", "visual.patch_embed", "patch"),
    *[
        Rule(_V + f"blocks.{{i}}.{hf}", f"visual.blocks.{nx}", tr, "vision")
        for hf, nx, tr in [
            ("norm1.weight", "norm1.weight", "id"),
            ("norm2.weight", "norm2.weight", "id"),
            ("attn.qkv.weight", "attn.qkv.kernel", "T"),
            ("attn.qkv.bias", "attn.qkv.bias", "id"),
            ("attn.proj.weight", "attn.proj.kernel", "T"),
            ("attn.proj.bias", "attn.proj.bias", "id"),
            *[
                (f"mlp.{p}.{w}", f"mlp.{p}.{'kernel' if w == 'weight' else 'bias'}", "T" if w == "weight" else "id")
                for p in ("gate_proj", "up_proj", "down_proj")
                for w in ("weight", "bias")
            ],
        ]
    ],
    Rule(_V + "merger.ln_q.weight", "visual.merger.ln_q.weight", "id"),
    Rule(_V + "merger.mlp.0.weight", "visual.merger.mlp_0.kernel", "T"),
    Rule(_V + "merger.mlp.0.bias", "visual.merger.mlp_0.bias", "id"),
    Rule(_V + "merger.mlp.2.weight", "visual.merger.mlp_2.kernel", "T"),
    Rule(_V + "merger.mlp.2.bias", "visual.merger.mlp_2.bias", "id"),
    Rule(_T + "embed_tokens.weight", "language_model.embed_tokens.embedding", "id"),
    *[
        Rule(_T + f"layers.{{i}}.{hf}", f"language_model.layers.{nx}", tr, "text")
        for hf, nx, tr in [
            ("input_layernorm.weight", "input_layernorm.weight", "id"),
            ("post_attention_layernorm.weight", "post_attention_layernorm.weight", "id"),
            *[(f"self_attn.{p}.weight", f"self_attn.{p}.kernel", "T") for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
            *[(f"self_attn.{p}.bias", f"self_attn.{p}.bias", "id") for p in ("q_proj", "k_proj", "v_proj")],
            *[(f"mlp.{p}.weight", f"mlp.{p}.kernel", "T") for p in ("gate_proj", "up_proj", "down_proj")],
        ]
    ],
    Rule(_T + "norm.weight", "language_model.norm.weight", "id"),
    Rule("lm_head.weight", "lm_head", "T"),
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor: its key, the NNX path of the parameter holding it, the transform, and the
    row of that (stacked) parameter it fills (None: the whole parameter)."""

    hf: str
    path: tuple[str, ...]
    transform: str
    layer: int | None = None


# The table of each model family, by its config class (Qwen3-VL's params module adds its own), so
# the import/export code below serves every family that shares these tensor kinds.
RULES_BY_CONFIG: dict[type, tuple[Rule, ...]] = {Qwen25VLConfig: RULES}


def rules_of(config) -> tuple[Rule, ...]:
    try:
        return RULES_BY_CONFIG[type(config)]
    except KeyError:
        raise TypeError(f"no HF parameter table for {type(config).__name__}: import its family's params module") from None


def expand_rules(config: Qwen25VLConfig) -> list[Entry]:
    """Every HF tensor of `config`, in table order (a stacked parameter's layers in a row)."""
    out = []
    for r in rules_of(config):
        if r.hf == "lm_head.weight" and config.tie_word_embeddings:
            continue
        path = tuple(r.nnx.split("."))
        if not r.per:
            out.append(Entry(r.hf, path, r.transform))
            continue
        n = {"vision": config.vision.depth, "text": config.text.num_hidden_layers,
             "deepstack": len(getattr(config.vision, "deepstack_visual_indexes", ()))}[r.per]
        out.extend(Entry(r.hf.format(i=i), path, r.transform, i) for i in range(n))
    return out


def hf_to_nnx(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "id":
        return x
    if transform == "T":
        return x.T
    if transform == "patch":  # Conv3d weight [E, C, T, P, P] with stride = kernel == matmul
        return x.reshape(x.shape[0], -1).T
    raise ValueError(f"unknown transform {transform!r}")


def nnx_to_hf(x: np.ndarray, transform: str, config: Qwen25VLConfig) -> np.ndarray:
    if transform == "id":
        return x
    if transform == "T":
        return x.T
    if transform == "patch":
        v = config.vision
        return x.T.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    raise ValueError(f"unknown transform {transform!r}")


def hf_index(transform: str, index: tuple) -> tuple:
    """The HF-layout index of the region `index` of a tensor in NNX layout ("id" / "T" only)."""
    if transform == "id":
        return index
    if transform == "T":
        return tuple(reversed(index))
    raise ValueError(f"transform {transform!r} reads whole tensors")


def canonical_hf_key(key: str) -> str:
    """Map the pre-transformers-4.52 layout (`model.layers...`, `visual...`) to the current one
    (`model.language_model.layers...`, `model.visual...`)."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith((_V, _T)):
        return _T + key[len("model."):]
    return key


def legacy_hf_key(key: str) -> str:
    """The inverse of `canonical_hf_key`: the layout `save_pretrained` writes (transformers 5.x
    converts back to the original Qwen release names on save) and every version reads."""
    if key.startswith(_V):
        return key[len("model."):]
    if key.startswith(_T):
        return "model." + key[len(_T):]
    return key


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
) -> Qwen25VL:
    """Load a Hugging Face Qwen2.5-VL directory (config.json + safetensors) into `Qwen25VL`.

    dtype: parameter dtype (compute_dtype defaults to it). mesh: when given, every parameter is
    placed with `NamedSharding(mesh, spec)` from `sharding` (default `ShardingConfig.fsdp_tensor()`),
    each device reading only its shard from the files (a stacked parameter's shard: that region
    of every layer's tensor). The model is never materialised at random: its shapes come from
    `nnx.eval_shape`. remat / scan_layers: as `Qwen25VL` (they change the program, not the weights).
    """
    directory = os.fspath(directory)
    return load_hf_model(directory, Qwen25VLConfig.from_hf_config(directory), Qwen25VL, dtype, mesh,
                         compute_dtype=compute_dtype, sharding=sharding, remat=remat, scan_layers=scan_layers,
                         attention=attention, mlp_chunk=mlp_chunk, freeze_vision=freeze_vision)


def load_hf_model(
    directory: str,
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
    """`load_hf` for any family with a table in `RULES_BY_CONFIG`: `model_cls(config, ...)`
    (the `Qwen25VL` constructor keywords) filled from the files of `directory`."""
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
        leaf = _get(pure, path)
        want = tuple(leaf.shape[1:]) if group[0].layer is not None else tuple(leaf.shape)
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
            sharding_ = jax.sharding.NamedSharding(mesh, _get(specs, path))
            value = jax.make_array_from_callback(tuple(leaf.shape), sharding_, read)
        else:
            value = jnp.asarray(read(None))
        _set(pure, path, value)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _nnx_shape(hf_shape: tuple[int, ...], transform: str, config: Qwen25VLConfig) -> tuple[int, ...]:
    if transform == "T":
        return tuple(reversed(hf_shape))
    if transform == "patch":
        return (int(np.prod(hf_shape[1:])), hf_shape[0])
    return tuple(hf_shape)


def _check_keys(directory: str, ckpt: "_Checkpoint", entries: list[Entry], config: Qwen25VLConfig) -> None:
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


def _get(tree: dict, path: tuple) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


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


def _hf_leaves(params: dict, config: Qwen25VLConfig, legacy_keys: bool) -> list[tuple[str, Entry, Any]]:
    return [(legacy_hf_key(e.hf) if legacy_keys else e.hf, e, _get(params, e.path)) for e in expand_rules(config)]


def leaf_shape(entry: Entry, leaf: Any) -> tuple[int, ...]:
    """The NNX-layout shape of one HF tensor (a row of a stacked parameter)."""
    return tuple(leaf.shape[1:]) if entry.layer is not None else tuple(leaf.shape)


def host_tensor(entry: Entry, leaf: Any) -> np.ndarray:
    """One HF tensor's value in NNX layout in host memory (a collective for arrays spanning
    hosts): a stacked parameter's row is cut on the devices first, so a host never holds more
    than one layer's tensor."""
    if entry.layer is None:
        return to_host(leaf)
    if isinstance(leaf, jax.Array):
        return to_host(_row(leaf, entry.layer))
    return np.asarray(leaf[entry.layer])


def hf_tensors(model: Qwen25VL, legacy_keys: bool = True) -> Iterator[tuple[str, np.ndarray]]:
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
    model: Qwen25VL,
    directory: str | os.PathLike,
    source_dir: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    dtype: DType | None = None,
    legacy_keys: bool = True,
) -> None:
    """Write `model` as a Hugging Face directory: safetensors shards (+ index when more than
    one), `config.json`, and the tokenizer/processor files of `source_dir` if given.

    dtype: storage dtype of the written tensors (default: the parameters' own dtype).
    legacy_keys: write `model.layers.*` / `visual.*` names, as transformers' own
    `save_pretrained` does (5.x included); both layouts load in `load_hf` and transformers.
    The parameters may be sharded over many devices and hosts: see `save_hf_params`.
    """
    save_hf_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.config, directory, source_dir=source_dir,
                   max_shard_size=max_shard_size, dtype=dtype, legacy_keys=legacy_keys)


def save_hf_params(
    params: dict,
    config: Qwen25VLConfig,
    directory: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    dtype: DType | None = None,
    legacy_keys: bool = True,
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
