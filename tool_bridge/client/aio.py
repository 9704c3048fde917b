"""``AsyncBridgeClient``: the asyncio ``SegmentationTool`` over one or more tool servers (2D
episodes here; volume episodes in ``volumes``, reached through the same object)."""

from __future__ import annotations

import itertools
import logging
import uuid
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import grpc
import numpy as np

from ibis_jax.data.rle import decode_rle
from ibis_jax.tools.protocol import SegmentResult, ToolError, validate_image, validate_prompt
from ibis_jax.tools.volume import VolumeSegmentResult
from tool_bridge.client.channels import Channels, ClientTLS
from tool_bridge.client.episodes import ClientEpisode, ClientStep, Replayer
from tool_bridge.client.retry import RetryPolicy, after_failure
from tool_bridge.client.volumes import PROBABILITY, VolumeEpisodes
from tool_bridge.proto import tool_bridge_pb2 as pb
from tool_bridge.proto import tool_bridge_pb2_grpc as pb_grpc

log = logging.getLogger("tool_bridge.client")
T = TypeVar("T")


def _clicks(points: np.ndarray, labels: np.ndarray) -> pb.Clicks:
    return pb.Clicks(points=points.reshape(-1).tolist(), labels=labels.tolist())


def mask_of(rle: pb.Rle) -> np.ndarray:
    return decode_rle({"size": list(rle.size), "counts": rle.counts})


class AsyncBridgeClient:
    """asyncio ``SegmentationTool`` over one or more servers (episodes spread round robin).

    Args:
      addresses: ``"host:port"`` or a list of them (one per GPU server, same checkpoint).
      token: the servers' shared token, if they require one.
      tls: certificates for TLS; ``None`` for a plaintext channel (loopback only).
      deadline_s: per-call deadline (an open includes the encoder and any queueing).
      max_attempts: tries per call before ``ToolError``.
      max_busy_attempts: tries per call answered ``RESOURCE_EXHAUSTED`` (queue or feature cache
        full: waiting for other episodes to close helps), counted apart from ``max_attempts``; the
        default waits about 5 minutes (200 tries at ``max_backoff_s`` 2 s with jitter).
      backoff_s, max_backoff_s: exponential backoff between tries, each wait drawn in [1/2, 1] of
        the current step (jitter, so refused clients do not come back together).
      connect_timeout_s: how long to wait for a first connection to an address; then a
        ``ToolError`` naming it (with several addresses the next one is tried).
      strict_replay: raise if a replayed step answers differently than before (e.g. a server with
        another checkpoint); with ``False`` a mismatch is logged and the new answer used.
      volume_probability: what volume steps bring back besides the mask: ``"none"`` (results
        carry ``logits=None``), ``"float32"`` or ``"uint8"`` (the tool's probability volume).
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        token: str | None = None,
        tls: ClientTLS | None = None,
        deadline_s: float = 60.0,
        max_attempts: int = 6,
        max_busy_attempts: int = 200,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        connect_timeout_s: float = 10.0,
        max_message_bytes: int = 64 << 20,
        strict_replay: bool = True,
        volume_probability: str = "none",
    ) -> None:
        self.channels = Channels(addresses, token=token, tls=tls, deadline_s=deadline_s,
                                 connect_timeout_s=connect_timeout_s, max_message_bytes=max_message_bytes)
        self.addresses = self.channels.addresses
        self.deadline_s, self.max_message_bytes = deadline_s, max_message_bytes
        self.retry = RetryPolicy(max_attempts, max_busy_attempts, backoff_s, max_backoff_s)
        self.replayer = Replayer(strict_replay)
        if volume_probability not in PROBABILITY:
            raise ToolError(f"volume_probability {volume_probability!r}: choose one of {sorted(PROBABILITY)}")
        self.volume_probability = volume_probability
        # Server-side ids are namespaced so that clients sharing a server never cross episodes.
        self.session = uuid.uuid4().hex[:16]
        self._episodes: dict[str, ClientEpisode] = {}
        self._round_robin = itertools.count()
        self.volumes = VolumeEpisodes(self)

    @property
    def replays(self) -> int:
        """Steps re-sent after a server lost an episode."""
        return self.replayer.replays

    @property
    def busy_retries(self) -> int:
        """``RESOURCE_EXHAUSTED`` answers waited out."""
        return self.retry.busy_retries

    async def info(self, address: str | None = None) -> pb.InfoReply:
        """The server's ``Info`` (backend, checkpoint sha256, image size, device, version...)."""
        address = address or self.addresses[0]
        await self.channels.connect(address)
        return await self._retry(f"info from {address}", lambda: self.channels.stub(address).Info(
            pb.InfoRequest(), **self.channels.call_kwargs()))

    # ---- episodes (both kinds) -------------------------------------------------------------

    async def _retry(self, what: str, attempt: Callable[[], Awaitable[T]],
                     episode: ClientEpisode | None = None) -> T:
        return await self.retry.run(
            what, attempt, lambda code: after_failure(code, episode, len(self.addresses)),
            lambda: self.addresses if episode is None else self.addresses[episode.address])

    def _new_episode(self, episode_id: str, **fields: Any) -> ClientEpisode:
        return ClientEpisode(episode_id=episode_id, server_id=f"{self.session}/{episode_id}",
                             address=next(self._round_robin) % len(self.addresses), **fields)

    async def _begin(self, episode: ClientEpisode, what: str) -> None:
        """Registers ``episode`` and opens it on its server; forgotten again if that fails."""
        self._episodes[episode.episode_id] = episode
        try:
            async with episode.lock:
                await self._retry(what, lambda: self._ensure_open(episode), episode)
        except BaseException:
            self._episodes.pop(episode.episode_id, None)
            raise

    def _episode(self, episode_id: str, *, volume: bool) -> ClientEpisode:
        episode = self._episodes.get(episode_id)
        if episode is None:
            raise ToolError(f"segment: unknown episode {episode_id!r}; call open() first")
        if volume and episode.volume is None:
            raise ToolError(f"segment_volume: episode {episode_id!r} is a 2D image episode; use segment()")
        if not volume and episode.volume is not None:
            raise ToolError(f"segment: episode {episode_id!r} is a volume episode; use segment_volume()")
        return episode

    async def _send_step(self, episode: ClientEpisode, what: str,
                         send: Callable[[pb_grpc.ToolBridgeStub], Awaitable[T]]) -> T:
        """One step's call, re-opening the episode (and replaying its steps) first where needed."""
        async def attempt() -> T:
            await self._ensure_open(episode)
            return await send(self.channels.stub(self.addresses[episode.address]))

        return await self._retry(what, attempt, episode)

    async def _ensure_open(self, episode: ClientEpisode) -> None:
        """Opens the episode where it lives and replays the steps that server does not hold."""
        if not episode.needs_open:
            return
        address = await self.channels.reachable(episode)
        stub = self.channels.stub(address)
        await self.channels.check_address(address)
        if episode.volume is not None:
            await self.volumes.reopen(episode, address, stub)
            return
        height, width = episode.image.shape[:2]
        kwargs = self.channels.call_kwargs()
        reply = await stub.OpenEpisode(
            pb.OpenEpisodeRequest(
                episode_id=episode.server_id,
                image=pb.Image(data=episode.image.tobytes(), height=height, width=width),
            ),
            **kwargs,
        )
        await self.replayer.replay(episode, address, reply.next_step, lambda index, step: stub.Step(
            pb.StepRequest(episode_id=episode.server_id, step_index=index, clicks=_clicks(step.points, step.labels)),
            **kwargs), lambda a, b: a.mask.counts == b.mask.counts and a.score == b.score)

    # ---- the tool protocol ------------------------------------------------------------------

    async def open(self, episode_id: str, image: np.ndarray) -> None:
        image = validate_image(image, where=f"open({episode_id!r})")
        if episode_id in self._episodes:
            raise ToolError(f"open: episode {episode_id!r} is already open; close it or pick a new id")
        await self._begin(self._new_episode(episode_id, image=image), f"open episode {episode_id!r}")

    async def segment(
        self,
        episode_id: str,
        points: np.ndarray,
        labels: np.ndarray,
        prev_logits: np.ndarray | None = None,
    ) -> SegmentResult:
        episode = self._episode(episode_id, volume=False)
        height, width = episode.image.shape[:2]
        points, labels = validate_prompt(points, labels, height, width)
        async with episode.lock:
            index = len(episode.steps)
            request = pb.StepRequest(episode_id=episode.server_id, step_index=index, clicks=_clicks(points, labels))
            reply = await self._send_step(episode, f"step {index} of episode {episode_id!r}",
                                          lambda stub: stub.Step(request, **self.channels.call_kwargs()))
            episode.steps.append(ClientStep(points, labels, reply))
        return SegmentResult(mask=mask_of(reply.mask), logits=None, score=float(reply.score))

    async def close(self, episode_id: str) -> None:
        episode = self._episodes.pop(episode_id, None)
        if episode is None:
            return
        try:  # best effort: the server's LRU cache frees it anyway
            stub = self.channels.stub(self.addresses[episode.address])
            kwargs = self.channels.call_kwargs() | {"wait_for_ready": False, "timeout": min(5.0, self.deadline_s)}
            await stub.CloseEpisode(pb.CloseEpisodeRequest(episode_id=episode.server_id), **kwargs)
        except grpc.aio.AioRpcError as error:
            log.info("tool bridge: close %r: %s", episode_id, error.code().name)

    async def segment_image(
        self,
        image: np.ndarray,
        points: np.ndarray,
        labels: np.ndarray,
        prev_logits: np.ndarray | None = None,
    ) -> SegmentResult:
        """The stateless call: encodes ``image`` and decodes once; logits come back to the caller."""
        image = validate_image(image)
        points, labels = validate_prompt(points, labels, image.shape[0], image.shape[1])
        request = pb.SegmentRequest(
            image=pb.Image(data=image.tobytes(), height=image.shape[0], width=image.shape[1]),
            clicks=_clicks(points, labels),
        )
        if prev_logits is not None:
            array = np.ascontiguousarray(prev_logits, dtype=np.float32)
            request.prev_logits.CopyFrom(pb.Logits(data=array.tobytes(), shape=list(array.shape)))
        address = self.addresses[next(self._round_robin) % len(self.addresses)]
        await self.channels.connect(address)
        reply = await self._retry(
            "segment", lambda: self.channels.stub(address).Segment(request, **self.channels.call_kwargs()))
        logits = None
        if reply.HasField("logits"):
            logits = np.frombuffer(reply.logits.data, dtype=np.float32).reshape(tuple(reply.logits.shape)).copy()
        return SegmentResult(mask=mask_of(reply.mask), logits=logits, score=float(reply.score))

    # ---- volume episodes (``volumes.VolumeEpisodes``) -----------------------------------------

    async def open_volume(self, episode_id: str, volume: np.ndarray, spacing) -> None:
        """Sends the volume (uint8 ``[D, H, W]``) and its spacing (mm, ``(sd, sh, sw)``) once."""
        await self.volumes.open(episode_id, volume, spacing)

    async def segment_volume(self, episode_id: str, points: np.ndarray, labels: np.ndarray,
                             prev_logits: np.ndarray | None = None) -> VolumeSegmentResult:
        """All clicks so far (voxel ``x, y, z``) -> the whole 3D mask; ``prev_logits`` is ignored."""
        return await self.volumes.segment(episode_id, points, labels)

    async def aclose(self) -> None:
        """Closes the channels (open episodes are left to the servers' caches)."""
        await self.channels.aclose()
