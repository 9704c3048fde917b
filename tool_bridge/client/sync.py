"""The synchronous tools over the bridge: ``BridgeClient`` (the ``SegmentationTool``, with the
volume calls too) runs an ``AsyncBridgeClient`` on a private event-loop thread;
``BridgeVolumeTool`` is the ``VolumeSegmentationTool`` on one."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Sequence, TypeVar

import numpy as np

from ibis_jax.tools.protocol import SegmentResult
from ibis_jax.tools.volume import VolumeSegmentResult
from tool_bridge.client.aio import AsyncBridgeClient
from tool_bridge.proto import tool_bridge_pb2 as pb

T = TypeVar("T")


class BridgeClient:
    """The synchronous ``SegmentationTool``: an ``AsyncBridgeClient`` on a private event-loop thread.

    Thread safe: many threads may drive different episodes at once; calls overlap on the wire.
    Same arguments as ``AsyncBridgeClient``.
    """

    def __init__(self, addresses: str | Sequence[str], **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="tool-bridge-client")
        self._thread.start()
        self.aio = AsyncBridgeClient(addresses, **kwargs)

    def _run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def open(self, episode_id: str, image: np.ndarray) -> None:
        self._run(self.aio.open(episode_id, image))

    def segment(
        self, episode_id: str, points: np.ndarray, labels: np.ndarray, prev_logits: np.ndarray | None = None
    ) -> SegmentResult:
        return self._run(self.aio.segment(episode_id, points, labels, prev_logits))

    def close(self, episode_id: str) -> None:
        self._run(self.aio.close(episode_id))

    def segment_image(self, image: np.ndarray, points: np.ndarray, labels: np.ndarray,
                      prev_logits: np.ndarray | None = None) -> SegmentResult:
        return self._run(self.aio.segment_image(image, points, labels, prev_logits))

    def info(self, address: str | None = None) -> pb.InfoReply:
        return self._run(self.aio.info(address))

    def open_volume(self, episode_id: str, volume: np.ndarray, spacing) -> None:
        self._run(self.aio.open_volume(episode_id, volume, spacing))

    def segment_volume(self, episode_id: str, points: np.ndarray, labels: np.ndarray,
                       prev_logits: np.ndarray | None = None) -> VolumeSegmentResult:
        return self._run(self.aio.segment_volume(episode_id, points, labels, prev_logits))

    def shutdown(self) -> None:
        if self._loop.is_running():
            self._run(self.aio.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> "BridgeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class BridgeVolumeTool:
    """The ``VolumeSegmentationTool`` over a tool server (``open(episode_id, volume, spacing)``,
    ``segment``, ``close``), on a :class:`BridgeClient`; ``VolumeEpisode`` and ``run_agent``
    use it as they use the in-process volume tools.

    Args:
      addresses: ``"host:port"``, a list of them, or a ready ``BridgeClient`` (shared, not shut
        down by :meth:`shutdown`).
      **kwargs: ``BridgeClient`` arguments (``volume_probability``, ``deadline_s``, ``token``...).
    """

    name = "bridge-3d"

    def __init__(self, addresses: "str | Sequence[str] | BridgeClient", **kwargs: Any) -> None:
        self._owned = not isinstance(addresses, BridgeClient)
        self.client = BridgeClient(addresses, **kwargs) if self._owned else addresses

    def open(self, episode_id: str, volume: np.ndarray, spacing) -> None:
        self.client.open_volume(episode_id, volume, spacing)

    def segment(self, episode_id: str, points: np.ndarray, labels: np.ndarray,
                prev_logits: np.ndarray | None = None) -> VolumeSegmentResult:
        return self.client.segment_volume(episode_id, points, labels, prev_logits)

    def close(self, episode_id: str) -> None:
        self.client.close(episode_id)

    def shutdown(self) -> None:
        if self._owned:
            self.client.shutdown()

    def __enter__(self) -> "BridgeVolumeTool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
