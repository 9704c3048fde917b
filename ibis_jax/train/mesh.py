"""The device mesh (axes data, fsdp, tensor) and the shardings of parameters and batches.

Parameters carry PartitionSpecs from the model's `ShardingConfig` (`nnx.get_partition_spec`);
a batch is split along its batch dimension over (data, fsdp): FSDP is data parallelism whose
parameters are sharded too.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with at most one -1 filled in so the product is `num_devices`."""
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"config mesh_shape must have 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"config mesh_shape {shape}: at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"config mesh_shape {shape} does not divide {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f"config mesh_shape {shape} uses {int(np.prod(shape))} devices, {num_devices} are present")
    return tuple(shape)  # type: ignore[return-value]


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default all), ICI-aware via jax.make_mesh."""
    devices = list(devices if devices is not None else jax.devices())
    dims = resolve_mesh_shape(shape, len(devices))
    slices = sorted({getattr(d, "slice_index", 0) or 0 for d in devices})
    if len(slices) > 1:
        # Several TPU slices talk over the data-centre network: only the data axis crosses them
        # (gradients once per step), fsdp and tensor stay inside a slice (JAX's hybrid mesh).
        n = len(slices)
        if dims[0] % n:
            raise ValueError(f"mesh_shape {tuple(dims)} over {n} slices: the data axis must be a multiple of the "
                             f"slice count (e.g. mesh_shape={n},-1,1), so fsdp and tensor stay inside a slice")
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh((dims[0] // n, dims[1], dims[2]), (n, 1, 1), devices)
        return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    if devices == list(jax.devices()):
        return jax.make_mesh(dims, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(dims), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def local_mesh(mesh: Mesh) -> Mesh:
    """A (data, fsdp, tensor) mesh over this process's devices alone, for work each host does by
    itself (GRPO rollouts): tensor and fsdp are the largest divisors of the global mesh's that fit
    the local devices (so every parameter spec that splits over `mesh` splits over it), data the
    rest. `mesh` itself on one process."""
    if jax.process_count() == 1:
        return mesh
    devices = jax.local_devices()
    n = len(devices)
    tensor = math.gcd(mesh.shape["tensor"], n)
    fsdp = math.gcd(mesh.shape["fsdp"], n // tensor)
    return make_mesh((n // (tensor * fsdp), fsdp, tensor), devices)


def check_batch_spans_processes(mesh: Mesh) -> None:
    """On several processes each one supplies its own rows, so the batch split over (data, fsdp)
    must give each process its own slots (no slot shared by two processes)."""
    processes = jax.process_count()
    if processes == 1:
        return
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    owners: dict[int, set[int]] = {}
    for device, index in NamedSharding(mesh, P(BATCH_AXES)).devices_indices_map((ways,)).items():
        owners.setdefault(index[0].start or 0, set()).add(device.process_index)
    if any(len(o) > 1 for o in owners.values()):
        raise ValueError(f"mesh {dict(mesh.shape)} on {processes} processes: the data x fsdp batch split must span "
                         f"the processes (each process its own rows); make data x fsdp a multiple of {processes} "
                         "with tensor inside one host")


def named(mesh: Mesh, specs: Any) -> Any:
    """A tree of PartitionSpecs -> NamedShardings on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


REPLICATED_KEYS = ("num_images", "image_grid_thw")


def batch_specs(batch: dict[str, Any], mesh: Mesh, processes: int = 1) -> dict[str, P]:
    """Specs of the pipeline's batch: [accum, batch, ...] arrays split on the batch dim over
    (data, fsdp); the packed patches [accum, patches, ...] likewise when they divide evenly
    (else replicated); image grids and counts replicated.

    `batch` is process-local: with `processes` > 1 each process holds 1/processes of every
    split dimension, so those must split (a process cannot replicate rows only it holds)."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    specs = {}
    for k, v in batch.items():
        if not hasattr(v, "shape"):  # e.g. the VisionLayout: small host-computed index arrays
            specs[k] = jax.tree.map(lambda _: P(), v)
            continue
        shape = np.shape(v)
        if k in REPLICATED_KEYS or len(shape) < 2 or (shape[1] * processes) % ways:
            if processes > 1 and k not in REPLICATED_KEYS and len(shape) >= 2:
                raise ValueError(f"batch {k} {shape} per process x {processes} processes does not split over "
                                 f"the {ways} data x fsdp devices: make the global micro-batch a multiple of {ways}")
            specs[k] = P()
        else:
            specs[k] = P(None, BATCH_AXES, *([None] * (len(shape) - 2)))
    return specs


def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (abstract state or batches for
    jit, restore and compile-only targets)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
