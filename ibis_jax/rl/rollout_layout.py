"""The rollouts' decode layout: the policy resharded once per GRPO step for decoding.

Training keeps the parameters FSDP-sharded; decoding on that layout all-gathers every weight for
every token (7B bf16: ~11 GB received per chip per token on a v5p-8). Before a step's rollouts
the merged policy (LoRA folded in, compute dtype) is put on a *decode mesh* over the same
devices, (data, fsdp, tensor) =

- ``replicated``: (n, 1, 1): every chip holds the whole policy, episodes data-parallel over the
  chips; a decode step moves nothing but the loop's stop test;
- ``tensor``: (n / t, 1, t): the model's own specs with fsdp of size 1 (an ``fsdp`` name shards
  nothing) shard heads and the MLP over t chips, t dividing the KV heads; episodes
  data-parallel over the n / t groups. A decode step all-reduces activations, not weights;
- ``auto``: replicated when the policy fits the per-chip budget (or the budget is unknown, as on
  a CPU), else tensor with the fewest ways that fit.

The device-to-device copy is `jax.device_put` between shardings of the same devices (no host
round trip). The sampler then gets the decode mesh: its KV cache is sharded by
`sampler.cache_spec` (rows over data, KV heads over tensor) and each chip encodes its own rows'
images (the activations' batch axis is the data axis).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ibis_jax.train.mesh import AXES

LAYOUTS = ("auto", "replicated", "tensor")


def tree_bytes(tree: Any, dtype: Any = None) -> int:
    """Bytes of a tree of arrays / ShapeDtypeStructs, whole (unsharded); floating leaves counted at
    `dtype` when given (what the decode copy holds)."""
    total = 0
    for x in jax.tree.leaves(tree):
        dt = jnp.dtype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else jnp.dtype(x.dtype)
        total += int(np.prod(x.shape, dtype=np.int64)) * dt.itemsize
    return total


def tensor_ways(devices: int, kv_heads: int, param_bytes: int, budget_bytes: int | None) -> int:
    """The fewest tensor ways t (dividing both the device count and the KV heads) with
    param_bytes / t within the budget; the most such ways when none fits."""
    ways = [t for t in range(1, devices + 1) if devices % t == 0 and kv_heads % t == 0]
    fitting = [t for t in ways if budget_bytes is None or param_bytes / t <= budget_bytes]
    return min(fitting) if fitting else max(ways)


def resolve_layout(layout: str, devices: int, kv_heads: int, param_bytes: int,
                   budget_bytes: int | None) -> tuple[str, int]:
    """(layout, tensor ways) that `layout` names for this policy and budget."""
    if layout not in LAYOUTS:
        raise ValueError(f"rl.rollout_layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = "replicated" if budget_bytes is None or param_bytes <= budget_bytes else "tensor"
    if layout == "replicated":
        return layout, 1
    # Named outright: at least two ways (the fewest that fit the budget; with none known, as
    # many as divide: the smallest weights per chip).
    if budget_bytes is None:
        t = tensor_ways(devices, kv_heads, param_bytes, 0)
    else:
        t = tensor_ways(devices, kv_heads, param_bytes, budget_bytes)
        if t == 1:
            t = min([w for w in range(2, devices + 1) if devices % w == 0 and kv_heads % w == 0], default=1)
    return layout, t


def decode_mesh(train_mesh: Mesh, layout: str, kv_heads: int, param_bytes: int,
                budget_bytes: int | None = None) -> Mesh:
    """The decode mesh over `train_mesh`'s devices (their order kept, so a tensor group is
    neighbouring chips): (n, 1, 1) replicated, (n / t, 1, t) tensor-parallel (see the module
    docstring). param_bytes: the decode copy's whole size; budget_bytes: what a chip may give
    it (None: unknown, `auto` picks replicated)."""
    devices = np.asarray(train_mesh.devices).reshape(-1)
    _, t = resolve_layout(layout, len(devices), kv_heads, param_bytes, budget_bytes)
    return Mesh(devices.reshape(len(devices) // t, 1, t), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def decode_specs(specs: Any) -> Any:
    """The parameter specs on a decode mesh: unchanged (an `fsdp` name over an axis of size 1
    shards nothing); a tree of PartitionSpecs or NamedShardings -> PartitionSpecs."""
    return jax.tree.map(lambda s: s.spec if isinstance(s, NamedSharding) else s, specs,
                        is_leaf=lambda x: isinstance(x, (P, NamedSharding)))


def reshard_for_decode(tree: Any, specs: Any, mesh: Mesh, dtype: Any | None = None) -> Any:
    """`tree` (arrays on the training mesh) on `mesh` with `specs` (PartitionSpecs or
    NamedShardings, as `tree`), floating leaves cast to `dtype` first (on their training shards,
    so the copy moves compute-dtype bytes). Device to device: no host round trip."""
    specs = decode_specs(specs)

    def put(x, spec):
        if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.dtype(dtype):
            x = x.astype(dtype)
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, tree, specs)


def decode_policy_params(model_def, params: Any, frozen: Any, param_shardings: Any, frozen_shardings: Any,
                         mesh: Mesh, dtype: Any | None = None) -> Any:
    """The merged policy's parameters (LoRA folded in) on the decode mesh: `ModelDef.all_params`
    on the training layout, then `reshard_for_decode` with the model's specs."""
    merged = model_def.all_params(params, frozen)
    specs = model_def.abstract_params(param_shardings, frozen_shardings)
    return reshard_for_decode(merged, specs, mesh, dtype)


def chip_budget(resident_bytes: int, hbm_bytes: int | None = None, fraction: float = 0.6) -> int | None:
    """Bytes a chip may give the decode copy: `fraction` of its HBM (`hbm_bytes`, default what the
    local device reports) beyond the resident training state (the rest is the KV cache and
    temporaries); None where the backend reports no limit (a CPU)."""
    if hbm_bytes is None:
        hbm_bytes = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    if not hbm_bytes:
        return None
    return max(0, int((int(hbm_bytes) - resident_bytes) * fraction))


__all__ = ["LAYOUTS", "chip_budget", "decode_mesh", "decode_policy_params", "decode_specs", "reshard_for_decode",
           "resolve_layout", "tensor_ways", "tree_bytes"]
