"""LoRA as the released IBISAgent SFT config used it (rank 8 on the decoder projections).

The adapters live outside the model's parameters: for a target kernel W [..., d_in, d_out] (the
decoder's kernels are stacked over layers, [L, d_in, d_out]) we train A [..., d_in, r] (normal
init) and B [..., r, d_out] (zeros, so step 0 equals the base model). The training forward applies
them to the activations, y = x W + (alpha / r) (x A) B (`attach`: the model's `Linear`s carry
them, a scan over the stacked layers slices them with their layer), so the frozen W gets no
weight gradient and the backward contracts straight into dA and dB; the merged weights
W + (alpha / r) A B (`merge_lora`) are for the rollouts' sampler and the export.

The adapters (and so their optimizer moments) are float32 whatever the base's dtype: in bf16 an
update of lr 1e-5 rounds away for most entries of A. The HF export merges on the host in numpy
(`merge_host`), one layer's kernel at a time, so the exported bytes do not depend on the mesh the
adapters were trained on.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

Path = tuple  # nnx path: ("language_model", "layers", 0, "self_attn", "q_proj", "kernel")


def key_of(path: Path) -> str:
    return "/".join(str(p) for p in path)


def _flat(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def lora_targets(params: dict, targets: Sequence[str]) -> list[Path]:
    """Paths of decoder kernels whose module name is in `targets` (vision tower excluded)."""
    paths = [
        p for p in _flat(params)
        if p[0] == "language_model" and p[-1] == "kernel" and len(p) >= 2 and p[-2] in targets
    ]
    if not paths:
        raise ValueError(f"config lora_targets {list(targets)} match no decoder kernel (e.g. q_proj, up_proj)")
    return sorted(paths, key=key_of)


def init_lora(params: dict, targets: Sequence[str], rank: int, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """{path key: {"a": [..., d_in, r], "b": [..., r, d_out]}} (float32) for every target kernel
    [..., d_in, d_out] (b = 0)."""
    flat = _flat(params)
    out = {}
    for i, path in enumerate(lora_targets(params, targets)):
        w = flat[path]
        *lead, d_in, d_out = w.shape
        a = jax.random.normal(jax.random.fold_in(key, i), (*lead, d_in, rank), jnp.float32) / jnp.sqrt(d_in)
        out[key_of(path)] = {"a": a, "b": jnp.zeros((*lead, rank, d_out), jnp.float32)}
    return out


def lora_specs(param_specs: dict, lora: dict) -> dict:
    """A inherits the kernel's input-dim sharding, B its output-dim sharding (and both its
    leading layer axis's)."""
    flat = {key_of(p): s for p, s in _flat(param_specs).items()}
    out = {}
    for k, ab in lora.items():
        ndim = len(ab["a"].shape)
        spec = (tuple(flat[k]) + (None,) * ndim)[:ndim]
        out[k] = {"a": P(*spec[:-1], None), "b": P(*spec[:-2], None, spec[-1])}
    return out


def attach(model, lora: dict, alpha: float, rank: int) -> None:
    """Attach every adapter to its (stacked) `Linear` of `model`: the activation form."""
    from ibis_jax.models.qwen2_5_vl.layers import attach_adapter

    for key, ab in lora.items():
        module = model
        for name in key.split("/")[:-1]:  # ".../q_proj/kernel" -> the q_proj module
            module = getattr(module, name)
        attach_adapter(module, ab["a"], ab["b"], alpha / rank)


def merge_one(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale * A @ B in W's dtype (fp32 accumulation): one adapted (stacked) kernel."""
    delta = jnp.einsum("...ir,...ro->...io", a, b, preferred_element_type=jnp.float32)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def merge_host(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """`merge_one` in host memory (numpy, float32): the export's merge, the same bytes whatever
    mesh the arrays came from."""
    delta = np.asarray(a, np.float32) @ np.asarray(b, np.float32)
    return (np.asarray(w, np.float32) + np.float32(scale) * delta).astype(w.dtype)


def merge_lora(params: dict, lora: dict, alpha: float, rank: int) -> dict:
    """params with W += (alpha / rank) A @ B at every adapted kernel (a new nested dict)."""
    scale = alpha / rank

    def walk(tree: dict, prefix: tuple) -> dict:
        out = {}
        for k, v in tree.items():
            path = prefix + (k,)
            if isinstance(v, dict):
                out[k] = walk(v, path)
            elif key_of(path) in lora:
                ab = lora[key_of(path)]
                out[k] = merge_one(v, ab["a"], ab["b"], scale)
            else:
                out[k] = v
        return out

    return walk(params, ())
