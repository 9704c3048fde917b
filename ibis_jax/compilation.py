"""Compile once: JAX's persistent compilation cache for every command that jits, and a count of
the programs a run compiled against those it read from the cache.

The cache lives in ``$IBIS_COMPILATION_CACHE`` (default ``~/.cache/ibis-jax/xla``; ``off``
disables it, ``--compilation-cache DIR|off`` on the commands that train or sample overrides it).
Every program is written, however fast it compiled (JAX's default skips those under a second, so
a rerun of the CPU quickstart would compile them all again), so a resumed or repeated run with the
same shapes compiles nothing. Entries are keyed by the program, the devices and the JAX/XLA
versions; stale ones are never read.
"""

from __future__ import annotations

import logging
import os
import threading

import jax

log = logging.getLogger(__name__)

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "ibis-jax", "xla")
_COMPILES = "/jax/core/compile/backend_compile_duration"  # every XLA compile, read from the cache or not
_HITS = "/jax/compilation_cache/cache_hits"


def cache_dir(setting: str | None = None) -> str | None:
    """The cache folder a setting names (None: ``$IBIS_COMPILATION_CACHE`` or the default); None
    when it is ``off``."""
    value = setting if setting is not None else os.environ.get("IBIS_COMPILATION_CACHE", DEFAULT_DIR)
    return None if value.strip().lower() in ("off", "none", "0", "") else os.path.expanduser(value)


def enable_compilation_cache(setting: str | None = None) -> str | None:
    """Turn JAX's persistent compilation cache on in ``cache_dir(setting)`` (before the first
    compile); returns the folder, or None when off. Idempotent."""
    directory = cache_dir(setting)
    if directory is None:
        return None
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory


class CompileCounter:
    """Counts, from JAX's monitoring events, the programs compiled and those read from the
    persistent cache since it was created (process-wide: one listener, counters per instance)."""

    _lock = threading.Lock()
    _totals = {"requests": 0, "hits": 0}
    _installed = False

    def __init__(self):
        self._install()
        self._start = dict(self._totals)

    @classmethod
    def _install(cls) -> None:
        with cls._lock:
            if cls._installed:
                return

            def listener(event: str, **kwargs) -> None:
                if event == _HITS:
                    cls._totals["hits"] += 1

            def duration(event: str, seconds: float, **kwargs) -> None:
                if event == _COMPILES:
                    cls._totals["requests"] += 1

            jax.monitoring.register_event_listener(listener)
            jax.monitoring.register_event_duration_secs_listener(duration)
            cls._installed = True

    def counts(self) -> dict[str, int]:
        """{"compiled": programs XLA compiled, "from_cache": programs read from the cache}."""
        requests = self._totals["requests"] - self._start["requests"]
        hits = self._totals["hits"] - self._start["hits"]
        return {"compiled": requests - hits, "from_cache": hits}

    def log(self, what: str) -> dict[str, int]:
        c = self.counts()
        log.info("%s: %d programs compiled, %d from the compilation cache", what, c["compiled"], c["from_cache"])
        return c


__all__ = ["DEFAULT_DIR", "cache_dir", "enable_compilation_cache", "CompileCounter"]
