"""The episodes a server holds, and their life: opening one (once, even when the same id is opened
concurrently; waiting up to ``admit_wait_s`` for room in the feature cache), finding it for a
step, closing it, and the idle sweep that frees abandoned ones. 2D and volume episodes share all
of it; their RPCs (``rpc_image``, ``rpc_volume``) only say how to build and release one."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import grpc

from ibis_jax.tools.protocol import ToolError
from tool_bridge.backends.base import Backend
from tool_bridge.backends.volume import VolumeBackend
from tool_bridge.server.batcher import Batcher, Overloaded
from tool_bridge.server.config import ServerConfig
from tool_bridge.server.episodes import CacheFull, Episode, EpisodeCache, VolumeEpisode
from tool_bridge.server.status import Abort

log = logging.getLogger("tool_bridge.server")


class EpisodeHost:
    """The batcher (the one model thread), the episode cache and the opens in flight."""

    def __init__(self, backend: Backend, config: ServerConfig, volume_backend: VolumeBackend | None = None) -> None:
        self.backend = backend
        self.volume_backend = volume_backend
        self.config = config
        self.batcher = Batcher(backend, config)
        self.cache = EpisodeCache(config.cache_bytes)
        self._opening: dict[str, asyncio.Future] = {}
        self._sweeper: asyncio.Task | None = None
        self._room = asyncio.Condition()  # notified whenever cache room is freed

    def start(self) -> None:
        self.batcher.start()
        if self.config.idle_timeout_s and self.config.idle_timeout_s > 0:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.batcher.stop()

    async def model(self, coro_fn: Callable, item: Any) -> Any:
        """``await coro_fn(item)`` (a batched model call), its failures as the statuses clients act on."""
        try:
            return await coro_fn(item)
        except Overloaded as error:
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {error}; retry with backoff")
        except ToolError as error:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except Exception as error:  # noqa: BLE001
            raise Abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")

    # ---- opening -------------------------------------------------------------------------------

    async def open(self, episode_id: str, kind: str, check: Callable[[Episode], None],
                   create: Callable[[], Awaitable[Episode]]) -> tuple[Episode, int]:
        """The episode ``episode_id`` and the step the client goes on from: the open one when
        ``check(existing)`` accepts it (it raises the status that says why not), else a new one
        from ``create()``, admitted to the cache (refused with ``RESOURCE_EXHAUSTED`` when full)."""
        while True:
            existing = self.cache.get(episode_id)
            if existing is not None:
                check(existing)
                return existing, len(existing.steps)
            pending = self._opening.get(episode_id)
            if pending is None:
                break
            await asyncio.shield(pending)  # a concurrent open of the same id: reuse its work (or retry)
        try:
            reserved = await self._reserve(kind)  # wait or refuse before encoding when the cache is full
        except CacheFull as error:
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        pending = asyncio.get_running_loop().create_future()
        self._opening[episode_id] = pending
        try:
            entry = await create()
            self.cache.unreserve(reserved)
            reserved = 0
            try:
                self.cache.admit(episode_id, entry)
            except CacheFull as error:
                await self.release(entry)
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        finally:
            self.cache.unreserve(reserved)
            del self._opening[episode_id]
            pending.set_result(None)
            await self._room_freed()  # a reservation ended: its estimate may have been too high
        return entry, 0

    async def _reserve(self, kind: str = "image") -> int:
        """Room for one new episode, waiting up to ``admit_wait_s`` for a close; ``CacheFull`` after."""
        deadline = time.monotonic() + max(0.0, self.config.admit_wait_s)
        while True:
            try:
                return self.cache.reserve(kind)
            except CacheFull:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                async with self._room:
                    try:
                        await asyncio.wait_for(self._room.wait(), remaining)
                    except asyncio.TimeoutError:
                        pass

    async def _room_freed(self) -> None:
        async with self._room:
            self._room.notify_all()

    # ---- finding, closing, freeing ---------------------------------------------------------

    def find(self, episode_id: str, *, volume: bool) -> Episode:
        """The open episode ``episode_id`` of the kind the call needs, or the status that says why not."""
        episode = self.cache.get(episode_id)
        if episode is None:
            raise Abort(
                grpc.StatusCode.NOT_FOUND,
                f"episode {episode_id!r} is not open here (never opened, closed, freed after "
                "--idle-timeout-s or the server restarted); re-open it and replay its steps",
            )
        if isinstance(episode, VolumeEpisode) != volume:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"episode {episode_id!r} is a volume episode: send its clicks with VolumeStep" if not volume
                        else f"episode {episode_id!r} is a 2D image episode: send its clicks with Step")
        return episode

    async def close(self, episode_id: str) -> bool:
        """Frees the episode; whether it was open."""
        entry = self.cache.pop(episode_id)
        if entry is not None:
            await self._room_freed()
            await self.release(entry)
        return entry is not None

    async def release(self, entry: Episode) -> None:
        """Hands the episode's features (or volume) back to its backend, on the model thread."""
        async with entry.lock:  # a step already decoding against these features finishes first
            if isinstance(entry, VolumeEpisode):
                await self.batcher.call(self.volume_backend.close, entry.encoded.payload)
            else:
                await self.batcher.call(self.backend.release, entry.encoded)

    async def _sweep(self) -> None:
        """Frees abandoned episodes: checks a few times per idle timeout (at most every 10 s)."""
        idle = self.config.idle_timeout_s
        period = min(max(idle / 4, 0.05), 10.0)
        while True:
            await asyncio.sleep(period)
            expired = self.cache.expire(idle)
            for key, entry in expired:
                log.info("freed episode %s: no request for %.0f s (--idle-timeout-s)", key, idle)
                await self.release(entry)
            if expired:
                await self._room_freed()
