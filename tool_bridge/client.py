"""Clients of the tool server implementing the ``SegmentationTool`` protocol (asyncio and sync).

The client remembers each open episode's image and the clicks of every step. When a server lost
an episode (restart, cache eviction, failover to another address) it re-opens the episode and
replays the missing steps, which reproduces the server-side logits chain, so the caller sees the
same masks as without the fault; replayed answers are checked against the ones already returned.
Transient failures are retried with exponential backoff with jitter (also re-opens after
``NOT_FOUND``, and ``RESOURCE_EXHAUSTED`` answers of a busy server or a full feature cache, which
get their own budget ``max_busy_attempts``); after ``max_attempts`` the call raises ``ToolError``
naming the episode, the step and the last gRPC status. Before the first call to an address the
client waits at most ``connect_timeout_s`` for a connection and otherwise raises a one-line
``ToolError`` naming the address (after that, with one address, a server restart is waited out
within the per-call deadline). It never returns an empty mask in place of an error.

``prev_logits`` is accepted for protocol compatibility and ignored: the server keeps the logits,
and results carry ``logits=None``.

Volume episodes (``open_volume`` / ``segment_volume``; :class:`BridgeVolumeTool` is the synchronous
``VolumeSegmentationTool``) work the same way: the volume (zlib-compressed) and its spacing go once
per episode and again only on a re-open; each step sends all clicks so far and gets the whole 3D
mask back. Their results carry ``logits=None`` unless ``volume_probability`` asks for the tool's
foreground probability (``"float32"`` exactly, ``"uint8"`` quantised to 1/255), which e.g. the
``uncertain`` slice rule reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import threading
import time
import uuid
import zlib
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import grpc
import numpy as np

from ibis_jax.data.rle import decode_rle
from ibis_jax.tools.protocol import SegmentResult, ToolError, validate_image, validate_prompt
from ibis_jax.tools.volume import VolumeSegmentResult, validate_volume, validate_volume_prompt
from tool_bridge.proto import tool_bridge_pb2 as pb
from tool_bridge.proto import tool_bridge_pb2_grpc as pb_grpc

log = logging.getLogger("tool_bridge.client")
T = TypeVar("T")

# Worth another attempt (possibly after re-opening the episode); anything else is the caller's bug.
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
}
_LOST = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE}
_DOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclasses.dataclass
class ClientTLS:
    """PEM files: ``ca`` verifies the server; ``cert``/``key`` identify this client (mutual TLS)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None  # override the name checked in the server certificate


@dataclasses.dataclass
class _Step:
    points: np.ndarray
    labels: np.ndarray
    reply: pb.StepReply


@dataclasses.dataclass
class _Episode:
    episode_id: str
    server_id: str
    image: np.ndarray | None  # None for a volume episode
    address: int
    steps: list[_Step] = dataclasses.field(default_factory=list)
    needs_open: bool = True
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    volume: pb.Volume | None = None  # the message, compressed once, re-sent on every re-open
    shape: tuple[int, int, int] | None = None  # (depth, height, width) of a volume episode

PROBABILITY = {"none": pb.PROBABILITY_NONE, "float32": pb.PROBABILITY_FLOAT32, "uint8": pb.PROBABILITY_UINT8}


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as handle:
        return handle.read()


def _clicks(points: np.ndarray, labels: np.ndarray) -> pb.Clicks:
    return pb.Clicks(points=points.reshape(-1).tolist(), labels=labels.tolist())


def _volume_clicks(points: np.ndarray, labels: np.ndarray) -> pb.VolumeClicks:
    return pb.VolumeClicks(points=points.reshape(-1).tolist(), labels=labels.tolist())


def _mask(rle: pb.Rle) -> np.ndarray:
    return decode_rle({"size": list(rle.size), "counts": rle.counts})


def _volume_mask(reply: pb.VolumeStepReply, shape: tuple[int, int, int], what: str) -> np.ndarray:
    d, h, w = shape
    if len(reply.slices) != d or any(list(rle.size) != [h, w] for rle in reply.slices):
        raise ToolError(f"tool bridge: {what}: the server answered {len(reply.slices)} slices for a {d}x{h}x{w} "
                        "volume (a server of another version?)")
    return np.stack([_mask(rle) for rle in reply.slices]).astype(bool)


def _array(msg: pb.Array, shape: tuple[int, int, int], what: str) -> np.ndarray:
    """A probability volume from the wire, as float32 in [0, 1]."""
    dtype = {"float32": np.float32, "uint8": np.uint8}.get(msg.dtype)
    expected = int(np.prod(shape)) * (np.dtype(dtype).itemsize if dtype is not None else 0)
    data = zlib.decompress(msg.data) if msg.compression == pb.COMPRESSION_ZLIB else msg.data
    if dtype is None or tuple(msg.shape) != tuple(shape) or len(data) != expected:
        raise ToolError(f"tool bridge: {what}: the probability has dtype {msg.dtype!r}, shape {list(msg.shape)} "
                        f"and {len(data)} bytes; expected float32 or uint8 {list(shape)}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return array.astype(np.float32) if dtype == np.float32 else array.astype(np.float32) / 255.0


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
        self.addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not self.addresses:
            raise ToolError("tool bridge client: give at least one server address host:port")
        self.token, self.tls = token, tls
        self.deadline_s, self.max_attempts = deadline_s, max(1, max_attempts)
        self.max_busy_attempts = max(1, max_busy_attempts)
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.connect_timeout_s = connect_timeout_s
        self._connected: set[str] = set()
        self._unreachable: dict[str, float] = {}  # address -> monotonic time to try it again
        self._jitter = random.Random()
        self.max_message_bytes = max_message_bytes
        self.strict_replay = strict_replay
        if volume_probability not in PROBABILITY:
            raise ToolError(f"volume_probability {volume_probability!r}: choose one of {sorted(PROBABILITY)}")
        self.volume_probability = volume_probability
        # Server-side ids are namespaced so that clients sharing a server never cross episodes.
        self.session = uuid.uuid4().hex[:16]
        self._episodes: dict[str, _Episode] = {}
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.ToolBridgeStub]] = {}
        self._checkpoints: dict[str, str] = {}
        self._round_robin = itertools.count()
        self.replays = 0  # steps re-sent after a server lost an episode
        self.busy_retries = 0  # RESOURCE_EXHAUSTED answers waited out

    # ---- channels ---------------------------------------------------------------------------

    async def _connect(self, address: str) -> None:
        """Waits up to ``connect_timeout_s`` for the first connection to ``address``."""
        if address in self._connected:
            return
        if self._unreachable.get(address, 0.0) > time.monotonic():
            raise ToolError(f"tool bridge: no server answered at {address} a moment ago; not retried yet")
        self._stub(address)
        channel = self._stubs[address][0]
        try:
            await asyncio.wait_for(channel.channel_ready(), self.connect_timeout_s)
        except asyncio.TimeoutError:
            if len(self.addresses) > 1:  # let other episodes go elsewhere for a while
                self._unreachable[address] = time.monotonic() + max(30.0, self.connect_timeout_s)
            raise ToolError(
                f"tool bridge: no server answers at {address} within {self.connect_timeout_s:g} s "
                f"(connect_timeout_s; channel {channel.get_state().name}): start one with 'ibis-jax "
                "tool serve', check the host:port, or match the server's TLS setting"
            ) from None
        self._connected.add(address)
        self._unreachable.pop(address, None)

    def _stub(self, address: str) -> pb_grpc.ToolBridgeStub:
        if address not in self._stubs:
            options = [
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                # Reconnect quickly after a server restart instead of the default 1 s..120 s.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ]
            if self.tls is not None:
                if self.tls.server_name:
                    options.append(("grpc.ssl_target_name_override", self.tls.server_name))
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=_read(self.tls.ca),
                    private_key=_read(self.tls.key),
                    certificate_chain=_read(self.tls.cert),
                )
                channel = grpc.aio.secure_channel(address, credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(address, options=options)
            self._stubs[address] = (channel, pb_grpc.ToolBridgeStub(channel))
        return self._stubs[address][1]

    def _call_kwargs(self) -> dict[str, Any]:
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else None
        # One server: wait out a restart within the deadline. Several: fail fast and fail over.
        return {"timeout": self.deadline_s, "metadata": metadata, "wait_for_ready": len(self.addresses) == 1}

    async def _check_address(self, address: str) -> None:
        """All servers must run the same checkpoint, or failover would change masks."""
        if address in self._checkpoints:
            return
        info = await self._stub(address).Info(pb.InfoRequest(), **self._call_kwargs())
        identity = f"{info.backend}:{info.checkpoint_sha256}"
        if info.volume_backend:
            identity += f" volumes {info.volume_backend}"
        others = set(self._checkpoints.values())
        if others and identity not in others:
            raise ToolError(
                f"tool bridge: server {address} runs {identity}, others run {sorted(others)}; every "
                "address must serve the same backend and checkpoint"
            )
        self._checkpoints[address] = identity

    async def info(self, address: str | None = None) -> pb.InfoReply:
        """The server's ``Info`` (backend, checkpoint sha256, image size, device, version...)."""
        address = address or self.addresses[0]
        await self._connect(address)
        return await self._retry(f"info from {address}", lambda: self._stub(address).Info(
            pb.InfoRequest(), **self._call_kwargs()))

    # ---- retries ----------------------------------------------------------------------------

    async def _retry(
        self, what: str, attempt: Callable[[], Awaitable[T]], episode: _Episode | None = None
    ) -> T:
        delay = self.backoff_s
        last: grpc.aio.AioRpcError | None = None
        failures = busy = 0
        while True:
            try:
                return await attempt()
            except grpc.aio.AioRpcError as error:
                code = error.code()
                # gRPC reports an over-limit message as RESOURCE_EXHAUSTED too; resending cannot help.
                too_big = code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (error.details() or "")
                if code not in _RETRYABLE or too_big:
                    raise ToolError(f"tool bridge: {what}: {code.name}: {error.details()}") from error
                last = error
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # busy: waiting is the cure
                    busy += 1
                    self.busy_retries += 1
                    if busy >= self.max_busy_attempts:
                        break
                else:
                    failures += 1
                    if failures >= self.max_attempts:
                        break
                log.log(logging.INFO if code == grpc.StatusCode.RESOURCE_EXHAUSTED else logging.WARNING,
                        "tool bridge: %s: attempt %d: %s %s", what, failures + busy, code.name, error.details())
                if episode is not None:
                    if code in _LOST:
                        episode.needs_open = True  # re-open (after the backoff: a fresh server may be busy)
                    if code in _DOWN and len(self.addresses) > 1:
                        episode.address = (episode.address + 1) % len(self.addresses)
                        episode.needs_open = True
                await asyncio.sleep(delay * self._jitter.uniform(0.5, 1.0))
                delay = min(self.max_backoff_s, delay * 2)
        where = self.addresses if episode is None else self.addresses[episode.address]
        raise ToolError(
            f"tool bridge: {what} failed after {failures + busy} attempts on {where}: "
            f"{last.code().name}: {last.details()}"
        )

    async def _reachable(self, episode: _Episode) -> str:
        """The episode's address, or with several the next one that connects."""
        for _ in range(len(self.addresses)):
            address = self.addresses[episode.address]
            try:
                await self._connect(address)
                return address
            except ToolError as error:
                if len(self.addresses) == 1:
                    raise
                log.warning("%s; trying the next address", error)
                episode.address = (episode.address + 1) % len(self.addresses)
        raise ToolError(
            f"tool bridge: no server answers at any of {', '.join(self.addresses)} within "
            f"{self.connect_timeout_s:g} s (connect_timeout_s)"
        )

    async def _ensure_open(self, episode: _Episode) -> None:
        """Opens the episode where it lives and replays the steps that server does not hold."""
        if not episode.needs_open:
            return
        address = await self._reachable(episode)
        stub = self._stub(address)
        await self._check_address(address)
        if episode.volume is not None:
            await self._ensure_volume_open(episode, address, stub)
            return
        height, width = episode.image.shape[:2]
        reply = await stub.OpenEpisode(
            pb.OpenEpisodeRequest(
                episode_id=episode.server_id,
                image=pb.Image(data=episode.image.tobytes(), height=height, width=width),
            ),
            **self._call_kwargs(),
        )
        await self._replay(episode, address, reply.next_step, lambda index, step: stub.Step(
            pb.StepRequest(episode_id=episode.server_id, step_index=index, clicks=_clicks(step.points, step.labels)),
            **self._call_kwargs()), lambda a, b: a.mask.counts == b.mask.counts and a.score == b.score)

    async def _ensure_volume_open(self, episode: _Episode, address: str, stub: pb_grpc.ToolBridgeStub) -> None:
        reply = await stub.OpenVolume(
            pb.OpenVolumeRequest(episode_id=episode.server_id, volume=episode.volume), **self._call_kwargs())
        if (reply.depth, reply.height, reply.width) != episode.shape:
            raise ToolError(f"tool bridge: {address} opened episode {episode.episode_id!r} as "
                            f"{reply.depth}x{reply.height}x{reply.width}, sent {'x'.join(map(str, episode.shape))}")
        await self._replay(episode, address, reply.next_step, lambda index, step: stub.VolumeStep(
            pb.VolumeStepRequest(episode_id=episode.server_id, step_index=index,
                                 clicks=_volume_clicks(step.points, step.labels)), **self._call_kwargs()),
            lambda a, b: a.score == b.score and len(a.slices) == len(b.slices)
            and all(x.counts == y.counts for x, y in zip(a.slices, b.slices)))

    async def _replay(self, episode: _Episode, address: str, start: int, call, same) -> None:
        """Re-sends the steps from ``start`` on to a server that re-opened ``episode``, checking
        that each answers as before (``same(new, old)``), then marks the episode open."""
        for index in range(start, len(episode.steps)):
            step = episode.steps[index]
            again = await call(index, step)
            self.replays += 1
            if not same(again, step.reply):
                message = (f"tool bridge: replaying step {index} of episode {episode.episode_id!r} on "
                           f"{address} gave another mask/score than before (different checkpoint or a "
                           "non-deterministic device)")
                if self.strict_replay:
                    raise ToolError(message)
                log.warning(message)
                step.reply = again
        episode.needs_open = False

    # ---- volume episodes --------------------------------------------------------------------

    async def open_volume(self, episode_id: str, volume: np.ndarray, spacing) -> None:
        """Sends the volume (uint8 ``[D, H, W]``) and its spacing (mm, ``(sd, sh, sw)``) once."""
        volume, spacing = validate_volume(volume, spacing, where=f"open_volume({episode_id!r})")
        if episode_id in self._episodes:
            raise ToolError(f"open_volume: episode {episode_id!r} is already open; close it or pick a new id")
        data = await asyncio.to_thread(zlib.compress, volume.tobytes(), 1)
        if len(data) + 4096 > self.max_message_bytes:
            raise ToolError(f"open_volume({episode_id!r}): the {'x'.join(map(str, volume.shape))} volume compresses "
                            f"to {len(data) / 2**20:.1f} MiB, over the {self.max_message_bytes / 2**20:g} MiB message "
                            "limit: raise max_message_bytes here and the server's --max-message-mb, or crop it")
        d, h, w = volume.shape
        message = pb.Volume(data=data, depth=d, height=h, width=w, spacing=list(spacing),
                            compression=pb.COMPRESSION_ZLIB)
        episode = _Episode(episode_id=episode_id, server_id=f"{self.session}/{episode_id}", image=None,
                           address=next(self._round_robin) % len(self.addresses), volume=message, shape=(d, h, w))
        self._episodes[episode_id] = episode
        try:
            async with episode.lock:
                await self._retry(f"open volume episode {episode_id!r}", lambda: self._ensure_open(episode), episode)
        except BaseException:
            self._episodes.pop(episode_id, None)
            raise

    async def segment_volume(self, episode_id: str, points: np.ndarray, labels: np.ndarray,
                             prev_logits: np.ndarray | None = None) -> VolumeSegmentResult:
        """All clicks so far (voxel ``x, y, z``) -> the whole 3D mask; ``prev_logits`` is ignored."""
        episode = self._episodes.get(episode_id)
        if episode is None:
            raise ToolError(f"segment: unknown episode {episode_id!r}; call open() first")
        if episode.volume is None:
            raise ToolError(f"segment_volume: episode {episode_id!r} is a 2D image episode; use segment()")
        points, labels = validate_volume_prompt(points, labels, episode.shape)
        what = f"volume step {len(episode.steps)} of episode {episode_id!r}"
        async with episode.lock:
            index = len(episode.steps)
            request = pb.VolumeStepRequest(episode_id=episode.server_id, step_index=index,
                                           clicks=_volume_clicks(points, labels),
                                           probability=PROBABILITY[self.volume_probability])

            async def attempt() -> pb.VolumeStepReply:
                await self._ensure_open(episode)
                return await self._stub(self.addresses[episode.address]).VolumeStep(request, **self._call_kwargs())

            reply = await self._retry(what, attempt, episode)
            mask = await asyncio.to_thread(_volume_mask, reply, episode.shape, what)
            probability = None
            if reply.HasField("probability"):
                probability = await asyncio.to_thread(_array, reply.probability, episode.shape, what)
                reply.ClearField("probability")  # kept for replay checks: masks and score only
            episode.steps.append(_Step(points, labels, reply))
        return VolumeSegmentResult(mask=mask, logits=probability, score=float(reply.score))

    # ---- the tool protocol ------------------------------------------------------------------

    async def open(self, episode_id: str, image: np.ndarray) -> None:
        image = validate_image(image, where=f"open({episode_id!r})")
        if episode_id in self._episodes:
            raise ToolError(f"open: episode {episode_id!r} is already open; close it or pick a new id")
        episode = _Episode(
            episode_id=episode_id,
            server_id=f"{self.session}/{episode_id}",
            image=image,
            address=next(self._round_robin) % len(self.addresses),
        )
        self._episodes[episode_id] = episode
        try:
            async with episode.lock:
                await self._retry(f"open episode {episode_id!r}", lambda: self._ensure_open(episode), episode)
        except BaseException:
            self._episodes.pop(episode_id, None)
            raise

    async def segment(
        self,
        episode_id: str,
        points: np.ndarray,
        labels: np.ndarray,
        prev_logits: np.ndarray | None = None,
    ) -> SegmentResult:
        episode = self._episodes.get(episode_id)
        if episode is None:
            raise ToolError(f"segment: unknown episode {episode_id!r}; call open() first")
        if episode.volume is not None:
            raise ToolError(f"segment: episode {episode_id!r} is a volume episode; use segment_volume()")
        height, width = episode.image.shape[:2]
        points, labels = validate_prompt(points, labels, height, width)
        async with episode.lock:
            index = len(episode.steps)
            request = pb.StepRequest(
                episode_id=episode.server_id, step_index=index, clicks=_clicks(points, labels)
            )

            async def attempt() -> pb.StepReply:
                await self._ensure_open(episode)
                stub = self._stub(self.addresses[episode.address])
                return await stub.Step(request, **self._call_kwargs())

            reply = await self._retry(f"step {index} of episode {episode_id!r}", attempt, episode)
            episode.steps.append(_Step(points, labels, reply))
        return SegmentResult(mask=_mask(reply.mask), logits=None, score=float(reply.score))

    async def close(self, episode_id: str) -> None:
        episode = self._episodes.pop(episode_id, None)
        if episode is None:
            return
        try:  # best effort: the server's LRU cache frees it anyway
            stub = self._stub(self.addresses[episode.address])
            kwargs = self._call_kwargs() | {"wait_for_ready": False, "timeout": min(5.0, self.deadline_s)}
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
        episode_address = next(self._round_robin) % len(self.addresses)
        await self._connect(self.addresses[episode_address])
        reply = await self._retry(
            "segment", lambda: self._stub(self.addresses[episode_address]).Segment(request, **self._call_kwargs())
        )
        logits = None
        if reply.HasField("logits"):
            logits = np.frombuffer(reply.logits.data, dtype=np.float32).reshape(tuple(reply.logits.shape)).copy()
        return SegmentResult(mask=_mask(reply.mask), logits=logits, score=float(reply.score))

    async def aclose(self) -> None:
        """Closes the channels (open episodes are left to the servers' caches)."""
        for channel, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()
        self._connected.clear()


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
