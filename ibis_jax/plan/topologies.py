"""Targets as users name them (``v5p-8``, ``v5e-16``, ``2xv5p-8``, ``h100x8``) -> compile-only
devices and the chip facts the plan needs (HBM, bf16 peak, HBM bandwidth).

TPU devices come from ``jax.experimental.topologies.get_topology_desc`` with ``libtpu`` installed
(the ``plan`` extra; docs/design.md section 9): they can be compiled for, never hold data. Cloud TPU names
count chips for v5e/v6e and TensorCores (2 per chip) for v4/v5p, so ``v5p-8`` is 4 chips
(``v5:2x2x1``, megacore). GPU nodes use the CUDA PJRT plugin's compile-only devices, described by
a GpuTargetConfig we write ourselves (see ``gpu_target_config``); memory analysis works there,
XLA's cost analysis does not.

The chip facts are written here (vendor data sheets), not read from the devices.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str  # what the compile-only device reports as device_kind (or ours for GPUs)
    hbm_bytes: int
    bf16_flops: float  # dense peak per chip
    hbm_bandwidth: float  # bytes / s per chip


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12),
    "v5e": Chip("TPU v5 lite", 16 * GiB, 197e12, 0.82e12),
    "v5p": Chip("TPU v5", 95 * GiB, 459e12, 2.76e12),
    "v6e": Chip("TPU v6 lite", 32 * GiB, 918e12, 1.64e12),
    "h100": Chip("H100 SXM 80GB", 80 * 10**9, 989e12, 3.35e12),
    "a100": Chip("A100 SXM 80GB", 80 * 10**9, 312e12, 2.04e12),
    "h200": Chip("H200 SXM 141GB", 141 * 10**9, 989e12, 4.8e12),
}

# chips -> chip grid of a slice (Cloud TPU's standard shapes)
_GRID_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
            256: (4, 8, 8), 512: (8, 8, 8)}
_GRID_2D = {4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_TPU_PREFIX = {"v4": "v4", "v5p": "v5", "v5e": "v5e", "v6e": "v6e"}
_GPU = {"h100": "sm_90", "a100": "sm_80", "h200": "sm_90"}
_GPU_COUNTS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as the user wrote it
    platform: str  # tpu | cuda
    chip: Chip
    num_slices: int
    chips_per_slice: int
    topology_name: str  # what get_topology_desc gets

    @property
    def num_devices(self) -> int:
        return self.num_slices * self.chips_per_slice

    @property
    def description(self) -> str:
        slices = f"{self.num_slices} x " if self.num_slices > 1 else ""
        return f"{self.name}: {slices}{self.chips_per_slice} x {self.chip.kind} ({self.topology_name})"


class UnknownTopology(ValueError):
    pass


def known_names() -> list[str]:
    names = [f"v4-{2 * c}" for c in _GRID_3D] + [f"v5p-{2 * c}" for c in _GRID_3D]
    names += [f"v5e-{c}" for c in _GRID_2D] + [f"v6e-{c}" for c in _GRID_2D]
    names += [f"{g}x{n}" for g in _GPU for n in _GPU_COUNTS]
    return names


def parse(name: str) -> Target:
    """A user's topology name -> Target; unknown names raise UnknownTopology listing the known."""
    raw = name.strip().lower()
    m = re.fullmatch(r"(?:(\d+)x)?(v4|v5p|v5e|v5litepod|v6e)-(\d+)", raw)
    if m:
        slices = int(m.group(1) or 1)
        gen = "v5e" if m.group(2) == "v5litepod" else m.group(2)
        n = int(m.group(3))
        chips = n // 2 if gen in ("v4", "v5p") else n
        grid = (_GRID_3D if gen in ("v4", "v5p") else _GRID_2D).get(chips)
        if grid is not None and (gen not in ("v4", "v5p") or n % 2 == 0) and slices >= 1:
            topo = f"{_TPU_PREFIX[gen]}:{'x'.join(map(str, grid))}"
            return Target(name, "tpu", CHIPS[gen], slices, chips, topo)
    m = re.fullmatch(r"(h100|a100|h200)x(\d+)", raw)
    if m and int(m.group(2)) in _GPU_COUNTS:
        n = int(m.group(2))
        return Target(name, "cuda", CHIPS[m.group(1)], 1, n, f"1x1x{n}")
    raise UnknownTopology(f"unknown topology {name!r}; known: {', '.join(known_names())} "
                          "(and N x a TPU slice for several slices, e.g. 2xv5p-8)")


def tpu_available() -> str | None:
    """None when libtpu is importable, else why not (for messages and test skips)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return 'libtpu is not installed: pip install -e ".[plan]" (libtpu==0.0.42.*, a 213 MB wheel)'
    return None


def gpu_available() -> str | None:
    import importlib.util

    try:
        found = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        found = False
    if not found:
        return ('the CUDA PJRT plugin is not installed: pip install "jax-cuda12-plugin==0.10.2" '
                '"jax-cuda12-pjrt==0.10.2" (and run plan with JAX_PLATFORMS=cpu)')
    return None


def quiet_libtpu() -> None:
    """libtpu looks for a TPU VM's metadata and logs errors without one: give it a local answer;
    and it takes /tmp/libtpu_lockfile unless told that several processes may load it (another
    process that tried the TPU backend would make the plan fail)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def devices(target: Target) -> list[Any]:
    """Compile-only devices of the target (raises RuntimeError with the install line if the
    backend is missing)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        why = tpu_available()
        if why:
            raise RuntimeError(why)
        quiet_libtpu()
        chip_config = "megacore" if target.topology_name.startswith(("v4:", "v5:")) else "default"
        desc = topologies.get_topology_desc(platform="tpu", topology_name=target.topology_name,
                                            chip_config_name=chip_config, chips_per_host_bounds=(2, 2, 1),
                                            num_slices=target.num_slices)
        return list(desc.devices)
    why = gpu_available()
    if why:
        raise RuntimeError(why)
    desc = topologies.get_topology_desc(platform="cuda", topology_name="", target_config=gpu_target_config(target),
                                        topology=target.topology_name)
    return list(desc.devices)


def gpu_target_config(target: Target) -> str:
    """A GpuTargetConfig (text proto) for the node's GPU, written from the data sheet."""
    gen = next(g for g in _GPU if target.chip is CHIPS[g])
    major, minor = {"sm_90": (9, 0), "sm_80": (8, 0)}[_GPU[gen]]
    sms = {"h100": 132, "a100": 108, "h200": 132}[gen]
    clock = {"h100": 1980000, "a100": 1410000, "h200": 1980000}[gen]
    mem_clock = {"h100": 2619000, "a100": 1593000, "h200": 3201000}[gen]
    bus = {"h100": 5120, "a100": 5120, "h200": 6144}[gen]
    l2 = {"h100": 52428800, "a100": 41943040, "h200": 52428800}[gen]
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {233472 if major == 9 else 167936}
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: {128 if major == 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(target.chip.hbm_bandwidth)}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock / 1e6}
  device_memory_size: {target.chip.hbm_bytes}
  shared_memory_per_block_optin: {232448 if major == 9 else 166912}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 3
}}
device_description_str: "NVIDIA {target.chip.kind}"
"""
