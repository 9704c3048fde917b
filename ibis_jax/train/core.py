"""What SFT and GRPO share around their update: multi-process start-up, logging per process,
host <-> global batch helpers and the preemption flag.

Launch (every host runs the same command):
  - explicit: `--coordinator HOST:PORT --num-processes N --process-id I` (GPU clusters without a
    scheduler JAX knows, or N processes on one machine with CPU collectives);
  - otherwise JAX's own cluster detection (Cloud TPU VMs and GKE TPU, SLURM, Open MPI):
    `jax.distributed.initialize()` with no arguments, only when such an environment is present;
  - neither: one process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


def add_distributed_arguments(parser) -> None:
    """--coordinator / --num-processes / --process-id on an argparse (sub-)parser."""
    g = parser.add_argument_group("multi-process (default: JAX's cluster detection, else one process)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordinator service (the same on every process)")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes (hosts) in the job")
    g.add_argument("--process-id", type=int, default=None, help="this process's id, 0 .. N-1")


def _cluster_detected() -> bool:
    """Whether one of JAX's auto-detected environments (TPU VM/GKE, SLURM, Open MPI, K8s) is present.
    Uses JAX's own detectors; any failure counts as "no cluster"."""
    try:
        from jax._src.clusters import ClusterEnv

        return any(not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types)
    except Exception as e:  # a private API: never let it break a single-process run
        log.debug("cluster detection failed: %s", e)
        return False


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """Start JAX's distributed runtime (before any computation). Idempotent."""
    if jax.distributed.is_initialized():
        return
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator, --num-processes and --process-id go together (or give none of them "
                             "and let JAX detect the cluster)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} outside 0..{num_processes - 1}")
        if num_processes == 1:
            return
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif _cluster_detected() or int(os.environ.get("IBIS_NUM_PROCESSES", "1")) > 1:
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def quiet_other_processes() -> None:
    """Processes other than 0 log only errors (process 0 writes metrics, reports and exports)."""
    if jax.process_index() != 0:
        logging.getLogger().setLevel(logging.ERROR)
        for name in ("ibis_jax", "absl", "orbax", "jax"):
            logging.getLogger(name).setLevel(logging.ERROR)


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def global_max(value: int) -> int:
    """The largest `value` over all processes (a tiny collective; the value itself when alone)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def process_slice(n: int, index: int | None = None, count: int | None = None) -> slice:
    """The contiguous share of ``n`` items that process ``index`` of ``count`` takes (default: this
    process of all): ``np.array_split`` sizes, so shares differ by at most one item and the first
    processes take the larger ones. Every process computes every share the same way."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process {index} outside 0..{count - 1}")
    per, extra = divmod(n, count)
    start = index * per + min(index, extra)
    return slice(start, start + per + (index < extra))


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """The full ``[n, ...]`` array on every process, from each process's rows
    ``local = full[process_slice(n)]`` (a collective; ``local`` itself when alone). Shares may
    differ by one row: each is padded to the largest for the all-gather and cut back after it.
    The rows travel as JAX arrays: 64-bit values as 32-bit ones unless ``jax_enable_x64``."""
    local = np.asarray(local)
    count = jax.process_count()
    if count == 1:
        return local
    mine = process_slice(n)
    if local.shape[0] != mine.stop - mine.start:
        raise ValueError(f"gather_rows: process {jax.process_index()} holds {local.shape[0]} rows, its share of {n} "
                         f"is {mine.stop - mine.start}")
    from jax.experimental import multihost_utils

    size = process_slice(n, 0, count).stop  # the first share is the largest
    padded = np.zeros((size, *local.shape[1:]), local.dtype)
    padded[: local.shape[0]] = local
    every = np.asarray(multihost_utils.process_allgather(padded))  # [count, size, ...]
    parts = []
    for p in range(count):
        share = process_slice(n, p, count)
        parts.append(every[p, : share.stop - share.start])
    return np.concatenate(parts).astype(local.dtype)


def local_replica(tree: Any, shardings: Any, local_mesh) -> Any:
    """A copy of the global arrays ``tree`` on this process's devices alone, laid out on
    ``local_mesh`` with the PartitionSpecs of ``shardings`` (a collective: every process calls it).
    Tensor by tensor (host memory holds about one at a time): each is all-gathered where it spans
    hosts and placed sharded over the local devices. Computations on the copy need no other
    process, so each host can run its own rollouts. Alone: ``tree`` itself."""
    if jax.process_count() == 1:
        return tree
    from jax.sharding import NamedSharding

    return jax.tree.map(lambda x, s: jax.device_put(host_global(x), NamedSharding(local_mesh, s.spec)), tree,
                        shardings)


def host_global(x: jax.Array) -> np.ndarray:
    """A global array in host memory on every process (all-gathered when it spans hosts)."""
    from ibis_jax.models.qwen2_5_vl.params import to_host

    return to_host(x)


class Preemption:
    """SIGTERM sets a flag: the loop finishes its step, checkpoints (collectively) and exits. On
    several processes the flag is agreed on every step (`global_max`), so all of them stop at the
    same step even when only one host got the signal."""

    def __init__(self):
        self.flag = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self) -> bool:
        return bool(global_max(int(self.flag)))

    def requested_with(self, values: np.ndarray) -> tuple[bool, np.ndarray]:
        """`requested()` and, in the same collective, every process's `values` (uint32 [n], the
        same n everywhere) concatenated in process order: a step's one host collective."""
        local = np.concatenate([[np.uint32(self.flag)], np.asarray(values, np.uint32)])
        if jax.process_count() == 1:
            return bool(self.flag), local[1:]
        from jax.experimental import multihost_utils

        every = np.asarray(multihost_utils.process_allgather(local))  # [processes, 1 + n]
        return bool(every[:, 0].max()), every[:, 1:].reshape(-1)

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


__all__ = ["add_distributed_arguments", "init_distributed", "quiet_other_processes", "barrier", "global_max",
           "process_slice", "gather_rows", "local_replica", "host_global", "Preemption"]
