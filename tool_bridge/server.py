"""The ``grpc.aio`` tool server: episodes, dynamic batching, a byte-capped feature cache.

Flow of one episode: ``OpenEpisode`` encodes the image once (batched with other opens) and keeps
the features under the episode id; each ``Step`` decodes all clicks so far against them with the
previous step's logits, kept here, and answers a COCO RLE mask and a score. Steps are idempotent
on (episode, step index): a retried step is answered from the per-episode record. All model work
runs on one worker thread (backends are not thread safe); the event loop only batches and routes.

Open episodes are never evicted to make room: when the feature cache cannot take a new episode,
``OpenEpisode`` waits up to ``admit_wait_s`` for a close (waiters are served first come, first
served), then answers ``RESOURCE_EXHAUSTED`` (the client backs off and retries), so that a full
cache slows new episodes down instead of thrashing live ones. Episodes nobody touched for
``idle_timeout_s`` (a crashed or careless client) are freed.

Volume episodes (``OpenVolume`` / ``VolumeStep``, with a ``VolumeBackend``) share the cache, the
idempotent step records, the idle sweep and ``CloseEpisode``; the volume's header is checked before
it is inflated, and the tool's calls run on the same model thread (one at a time, not batched).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
import threading
import time
import warnings
import zlib
from typing import Any, Callable

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import tool_bridge
from ibis_jax.data.rle import encode_rle
from ibis_jax.tools.protocol import SegmentResult, ToolError, validate_image, validate_prompt
from ibis_jax.tools.volume import validate_volume, validate_volume_prompt
from tool_bridge.backends.base import Backend, DecodeRequest, Encoded
from tool_bridge.backends.volume import VolumeBackend
from tool_bridge.proto import tool_bridge_pb2 as pb
from tool_bridge.proto import tool_bridge_pb2_grpc as pb_grpc

log = logging.getLogger("tool_bridge.server")

SERVICE_NAME = "ibis_jax.tool_bridge.v1.ToolBridge"
TOKEN_HEADER = "authorization"
MAX_EPISODE_ID_CHARS = 256


@dataclasses.dataclass
class TLSConfig:
    """PEM files. With ``client_ca`` set, clients must present a certificate signed by it."""

    cert: str
    key: str
    client_ca: str | None = None


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50151  # 0 picks a free port (see BridgeServer.port)
    max_batch: int = 8  # requests per worker call
    max_wait_ms: float = 2.0  # how long a lone request waits for company
    max_queue: int = 256  # pending model requests; beyond: RESOURCE_EXHAUSTED
    cache_bytes: int = 2 << 30  # feature cache cap (MedSAM2: ~4 MiB per image)
    max_clicks: int = 64
    max_image_side: int = 2048
    max_volume_voxels: int = 64 << 20  # OpenVolume: depth * height * width at most (each side <= max_image_side)
    idle_timeout_s: float = 300.0  # free episodes with no request for this long (abandoned)
    admit_wait_s: float = 2.0  # an open that does not fit waits this long for a close, then RESOURCE_EXHAUSTED
    max_message_bytes: int = 64 << 20
    image_root: str | None = None  # OpenEpisode/Segment by path read only under here
    max_path_chars: int = 4096
    token: str | None = None  # shared secret, sent as "authorization: Bearer <token>"
    tls: TLSConfig | None = None


class Overloaded(Exception):
    """The batcher's queue is full."""


class Batcher:
    """Collects encode/decode requests for up to ``max_wait_ms`` or ``max_batch`` and runs them
    on the single model thread, encoders as one batched call."""

    def __init__(self, backend: Backend, config: ServerConfig) -> None:
        self.backend = backend
        self.max_batch = max(1, config.max_batch)
        self.max_wait_s = max(0.0, config.max_wait_ms) / 1000.0
        self.max_queue = max(1, config.max_queue)
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tool-model")
        self._queue: asyncio.Queue | None = None
        self._pending = 0
        self._task: asyncio.Task | None = None
        self.batches_run = 0
        self.largest_batch = 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def encode(self, image: np.ndarray) -> "asyncio.Future[Encoded]":
        """Queues an image; raises ``Overloaded`` at once when the queue is full."""
        return self._submit("encode", image)

    def decode(self, request: DecodeRequest) -> "asyncio.Future[SegmentResult]":
        return self._submit("decode", request)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs ``fn`` on the model thread (e.g. releasing cached features)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _submit(self, kind: str, item: Any) -> asyncio.Future:
        if self._pending >= self.max_queue:
            raise Overloaded(f"{self._pending} requests already queued (max_queue={self.max_queue})")
        future = asyncio.get_running_loop().create_future()
        self._pending += 1
        self._queue.put_nowait((kind, item, future))
        return future

    async def _collect(self) -> list[tuple[str, Any, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self._pending -= len(batch)
            live = [job for job in batch if not job[2].done()]  # cancelled callers
            encodes = [job for job in live if job[0] == "encode"]
            decodes = [job for job in live if job[0] == "decode"]
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(live))
            try:
                outcome = await loop.run_in_executor(self.executor, self._work, encodes, decodes)
            except RuntimeError as error:  # executor shut down: fail these, keep the loop alive
                outcome = [(live, [error] * len(live))]
            for jobs, results in outcome:
                for (_, _, future), result in zip(jobs, results):
                    if future.done():  # the caller went away (deadline, cancel) meanwhile
                        if isinstance(result, Encoded):
                            self.executor.submit(self.backend.release, result)
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

    def _work(self, encodes: list, decodes: list) -> list:
        out = []
        for jobs, run in ((decodes, self.backend.decode), (encodes, self.backend.encode)):
            if not jobs:
                continue
            try:
                results = run([job[1] for job in jobs])
            except Exception as error:  # noqa: BLE001 - handed to every caller of the batch
                log.exception("backend %s failed on a batch of %d", run.__name__, len(jobs))
                results = [error] * len(jobs)
            out.append((jobs, results))
        return out


@dataclasses.dataclass
class _StepRecord:
    prompt_digest: str
    reply: pb.StepReply


@dataclasses.dataclass
class _Episode:
    encoded: Encoded
    image_digest: str
    steps: list[_StepRecord] = dataclasses.field(default_factory=list)
    last_logits: np.ndarray | None = None
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    last_used: float = dataclasses.field(default_factory=time.monotonic)

    kind = "image"

    @property
    def nbytes(self) -> int:
        logits = 0 if self.last_logits is None else self.last_logits.nbytes
        return self.encoded.nbytes + logits


@dataclasses.dataclass
class _VolumeEpisode(_Episode):
    """A volume episode: ``encoded.payload`` is the volume backend's handle, ``encoded.nbytes``
    what the tool holds for it (measured after the open and after each step)."""

    depth: int = 0

    kind = "volume"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.depth, self.encoded.height, self.encoded.width


class CacheFull(Exception):
    """The feature cache cannot take another episode without evicting an open one."""


class EpisodeCache:
    """Open episodes by id, capped in bytes of features. Nothing is ever evicted to make room:
    ``admit`` refuses a new episode instead (only an empty cache takes one over the cap, or no
    image could ever be served); ``expire`` frees the episodes idle for too long.

    ``reserve``/``unreserve`` hold room for opens whose features are still being computed, so that
    concurrent opens cannot all pass the check and overshoot together."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self._entries: collections.OrderedDict[str, _Episode] = collections.OrderedDict()
        self.bytes = 0
        self.reserved = 0
        # The largest episode seen per kind (features + logits): the estimate for a new one. Kinds
        # apart, so that one volume does not make every image open look a volume's size.
        self.largest: dict[str, int] = collections.defaultdict(int)
        self.refusals = 0
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> _Episode | None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.last_used = time.monotonic()
            self._entries.move_to_end(key)
        return entry

    def _full_message(self, needed: int) -> str:
        mib = 1 << 20
        return (f"feature cache full: {len(self._entries)} open episodes hold {self.bytes / mib:.1f} MiB"
                f"{f' (+{self.reserved / mib:.1f} MiB opening)' if self.reserved else ''} of --cache-mb "
                f"{self.cap_bytes / mib:g}, a new one needs ~{needed / mib:.1f} MiB; open episodes are "
                "never evicted: retry after some close, or raise --cache-mb")

    def reserve(self, kind: str = "image") -> int:
        """Holds room for one more episode of the largest size seen; raises ``CacheFull``."""
        needed = self.largest[kind]
        busy = len(self._entries) > 0 or self.reserved > 0
        if busy and self.bytes + self.reserved + needed > self.cap_bytes:
            self.refusals += 1
            raise CacheFull(self._full_message(needed))
        self.reserved += needed
        return needed

    def unreserve(self, amount: int) -> None:
        self.reserved -= amount

    def admit(self, key: str, entry: _Episode) -> None:
        """Adds an open episode; raises ``CacheFull`` if it does not fit next to the others.

        It must fit at the largest size an episode reached so far (features plus the logits its
        steps add): steps grow episodes without eviction, so the cap can only be overshot by the
        logits of the first episodes, before any step showed their size."""
        needed = max(entry.nbytes, self.largest[entry.kind])
        if self._entries and self.bytes + self.reserved + needed > self.cap_bytes:
            self.refusals += 1
            raise CacheFull(self._full_message(needed))
        self.pop(key)
        self._entries[key] = entry
        self.bytes += entry.nbytes
        self.largest[entry.kind] = max(self.largest[entry.kind], entry.nbytes)

    def resize(self, key: str, old_nbytes: int) -> None:
        """A step changed an episode's size (its logits); may overshoot the cap, never evicts."""
        entry = self._entries.get(key)
        if entry is not None:
            self.bytes += entry.nbytes - old_nbytes
            self.largest[entry.kind] = max(self.largest[entry.kind], entry.nbytes)

    def pop(self, key: str) -> _Episode | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.nbytes
        return entry

    def expire(self, idle_s: float, now: float | None = None) -> list[tuple[str, _Episode]]:
        """Removes and returns the episodes unused for ``idle_s`` seconds and not mid-step."""
        now = time.monotonic() if now is None else now
        stale = [key for key, entry in self._entries.items()
                 if now - entry.last_used >= idle_s and not entry.lock.locked()]
        self.expirations += len(stale)
        return [(key, self.pop(key)) for key in stale]


def _image_digest(image: np.ndarray) -> str:
    digest = hashlib.sha256(np.asarray(image.shape, dtype=np.int64).tobytes())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _answered_step(episode_id: str, episode, index: int, prompt: str):
    """Step ``index`` of an episode (image or volume) under the idempotent-step rules: the stored
    record when it was already answered for these clicks, None when it is the next one; a step
    answered for other clicks, or one past the next, is the status that says why."""
    if index < len(episode.steps):
        record = episode.steps[index]
        if record.prompt_digest != prompt:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"step {index} of episode {episode_id!r} was already answered for other clicks")
        return record
    if index > len(episode.steps):
        raise _Abort(grpc.StatusCode.OUT_OF_RANGE,
                     f"episode {episode_id!r} holds {len(episode.steps)} steps, got step_index {index}; "
                     "re-open it and replay the missing steps")
    return None


def _prompt_digest(points: np.ndarray, labels: np.ndarray) -> str:
    return hashlib.sha256(points.tobytes() + b"|" + labels.tobytes()).hexdigest()


def _rle_message(mask: np.ndarray) -> pb.Rle:
    rle = encode_rle(mask)
    return pb.Rle(size=rle["size"], counts=rle["counts"])


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class ToolBridgeServicer(pb_grpc.ToolBridgeServicer):
    def __init__(self, backend: Backend, config: ServerConfig, volume_backend: VolumeBackend | None = None) -> None:
        self.backend = backend
        self.volume_backend = volume_backend
        self._volume_pending = 0  # volume calls queued on the model thread (their own max_queue)
        self.config = config
        self.batcher = Batcher(backend, config)
        self.cache = EpisodeCache(config.cache_bytes)
        self._opening: dict[str, asyncio.Future] = {}
        self.root = os.path.realpath(config.image_root) if config.image_root else None
        self._sweeper: asyncio.Task | None = None
        self._room = asyncio.Condition()  # notified whenever cache room is freed

    async def _room_freed(self) -> None:
        async with self._room:
            self._room.notify_all()

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

    def start(self) -> None:
        self.batcher.start()
        if self.config.idle_timeout_s and self.config.idle_timeout_s > 0:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.batcher.stop()

    async def _sweep(self) -> None:
        """Frees abandoned episodes: checks a few times per idle timeout (at most every 10 s)."""
        idle = self.config.idle_timeout_s
        period = min(max(idle / 4, 0.05), 10.0)
        while True:
            await asyncio.sleep(period)
            expired = self.cache.expire(idle)
            for key, entry in expired:
                log.info("freed episode %s: no request for %.0f s (--idle-timeout-s)", key, idle)
                await self._release(entry)
            if expired:
                await self._room_freed()

    async def _release(self, entry: _Episode) -> None:
        async with entry.lock:  # a step already decoding against these features finishes first
            if isinstance(entry, _VolumeEpisode):
                await self.batcher.call(self.volume_backend.close, entry.encoded.payload)
            else:
                await self.batcher.call(self.backend.release, entry.encoded)

    # ---- request parsing -------------------------------------------------------------------

    def _episode_id(self, episode_id: str) -> str:
        if not episode_id or len(episode_id) > MAX_EPISODE_ID_CHARS:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"episode_id must be 1..{MAX_EPISODE_ID_CHARS} characters, got {len(episode_id)}",
            )
        return episode_id

    async def _image(self, request: Any) -> np.ndarray:
        source = request.WhichOneof("source")
        if source == "image":
            msg = request.image
            height, width = int(msg.height), int(msg.width)
            side = self.config.max_image_side
            if not (2 <= height <= side and 2 <= width <= side):
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"image.height/width {height}x{width} outside 2..{side} (server --max-image-side)",
                )
            if len(msg.data) != height * width * 3:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"image.data has {len(msg.data)} bytes, expected height*width*3 = "
                    f"{height * width * 3} (RGB uint8, row-major)",
                )
            # A private writable copy: torch warns on (and must not alias) the read-only request buffer.
            image = np.frombuffer(msg.data, dtype=np.uint8).reshape(height, width, 3).copy()
        elif source == "path":
            image = await asyncio.to_thread(self._read_path, request.path)
        else:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "set image or path (the source oneof)")
        try:
            return validate_image(image)
        except ToolError as error:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from error

    def _read_path(self, path: str) -> np.ndarray:
        if self.root is None:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server reads no files; start it with --image-root DIR or send image bytes",
            )
        if not path or "\0" in path or len(path) > self.config.max_path_chars:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"path must be 1..{self.config.max_path_chars} characters without NUL bytes, got "
                f"{len(path)} characters{' with a NUL byte' if chr(0) in path else ''}",
            )
        try:
            full = os.path.realpath(os.path.join(self.root, path))
            inside = os.path.commonpath([self.root, full]) == self.root
            is_file = inside and os.path.isfile(full)
        except (ValueError, OSError) as error:  # undecodable, too long for the OS, ...
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"path {path[:200]!r} is not a usable path: {error}")
        if not inside:
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, f"path {path!r} lies outside the image root")
        if not is_file:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"path {path!r} is not a file under the image root")
        from PIL import Image

        side = self.config.max_image_side
        try:
            if full.endswith(".npy"):
                header = np.load(full, mmap_mode="r", allow_pickle=False)  # reads the header only
                self._check_side(path, tuple(header.shape))
                image = np.array(header)
            else:
                with warnings.catch_warnings():  # our own size check below comes first
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    with Image.open(full) as handle:  # lazy: the header gives the size, nothing decoded
                        self._check_side(path, (handle.height, handle.width))
                        image = np.asarray(handle.convert("RGB"))
        except _Abort:
            raise
        except Image.DecompressionBombError as error:  # over 2x PIL's pixel limit: refused in open()
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"path {path!r}: image too large (max side {side}, --max-image-side): {error}")
        except Exception as error:  # noqa: BLE001 - any decoder error is the file's fault
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"path {path!r}: cannot read image: {error}")
        self._check_side(path, image.shape)
        return image

    def _check_side(self, path: str, shape: tuple[int, ...]) -> None:
        side = self.config.max_image_side
        if len(shape) < 2 or max(shape[:2]) > side:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"path {path!r}: image {shape} too large (max side {side}, --max-image-side)")

    def _clicks(self, clicks: pb.Clicks, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        if len(clicks.points) != 2 * len(clicks.labels):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"clicks.points has {len(clicks.points)} floats for {len(clicks.labels)} labels; "
                "send x,y per label",
            )
        if len(clicks.labels) > self.config.max_clicks:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(clicks.labels)} clicks exceed the server's --max-clicks {self.config.max_clicks}",
            )
        points = np.asarray(clicks.points, dtype=np.float32).reshape(-1, 2)
        labels = np.asarray(clicks.labels, dtype=np.int32)
        try:
            return validate_prompt(points, labels, height, width)
        except ToolError as error:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from error

    async def _model(self, coro_fn: Callable, item: Any) -> Any:
        try:
            return await coro_fn(item)
        except Overloaded as error:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {error}; retry with backoff")
        except ToolError as error:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except Exception as error:  # noqa: BLE001
            raise _Abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")

    # ---- RPCs ------------------------------------------------------------------------------

    async def OpenEpisode(self, request, context):
        return await _guard(context, self._open(request))

    async def _open(self, request: pb.OpenEpisodeRequest) -> pb.OpenEpisodeReply:
        episode_id = self._episode_id(request.episode_id)
        image = await self._image(request)
        digest = _image_digest(image)
        while True:
            existing = self.cache.get(episode_id)
            if existing is not None:
                if isinstance(existing, _VolumeEpisode):
                    raise _Abort(grpc.StatusCode.ALREADY_EXISTS,
                                 f"episode {episode_id!r} is open as a volume episode; close it or use a new id")
                if existing.image_digest != digest:
                    raise _Abort(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"episode {episode_id!r} is open with a different image; close it or use a new id",
                    )
                return pb.OpenEpisodeReply(
                    height=existing.encoded.height, width=existing.encoded.width, next_step=len(existing.steps)
                )
            pending = self._opening.get(episode_id)
            if pending is None:
                break
            await asyncio.shield(pending)  # a concurrent open of the same id: reuse its work (or retry)
        try:
            reserved = await self._reserve()  # wait or refuse before encoding when the cache is full
        except CacheFull as error:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        pending = asyncio.get_running_loop().create_future()
        self._opening[episode_id] = pending
        try:
            encoded = await self._model(self.batcher.encode, image)
            self.cache.unreserve(reserved)
            reserved = 0
            try:
                self.cache.admit(episode_id, _Episode(encoded, digest))
            except CacheFull as error:
                await self.batcher.call(self.backend.release, encoded)
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        finally:
            self.cache.unreserve(reserved)
            del self._opening[episode_id]
            pending.set_result(None)
            await self._room_freed()  # a reservation ended: its estimate may have been too high
        return pb.OpenEpisodeReply(height=encoded.height, width=encoded.width, next_step=0)

    def _open_episode(self, episode_id: str, *, volume: bool):
        """The open episode ``episode_id`` of the kind the call needs, or the status that says why not."""
        episode = self.cache.get(episode_id)
        if episode is None:
            raise _Abort(
                grpc.StatusCode.NOT_FOUND,
                f"episode {episode_id!r} is not open here (never opened, closed, freed after "
                "--idle-timeout-s or the server restarted); re-open it and replay its steps",
            )
        if isinstance(episode, _VolumeEpisode) != volume:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"episode {episode_id!r} is a volume episode: send its clicks with VolumeStep" if not volume
                         else f"episode {episode_id!r} is a 2D image episode: send its clicks with Step")
        return episode

    async def Step(self, request, context):
        return await _guard(context, self._step(request))

    async def _step(self, request: pb.StepRequest) -> pb.StepReply:
        episode_id = self._episode_id(request.episode_id)
        episode = self._open_episode(episode_id, volume=False)
        points, labels = self._clicks(request.clicks, episode.encoded.height, episode.encoded.width)
        prompt = _prompt_digest(points, labels)
        index = request.step_index
        async with episode.lock:  # steps of one episode are sequential by nature
            record = _answered_step(episode_id, episode, index, prompt)
            if record is not None:
                return record.reply
            prev = episode.last_logits if index > 0 else None
            result = await self._model(self.batcher.decode, DecodeRequest(episode.encoded, points, labels, prev))
            reply = pb.StepReply(mask=_rle_message(result.mask), score=result.score, step_index=index)
            old = episode.nbytes
            episode.steps.append(_StepRecord(prompt, reply))
            episode.last_logits = result.logits
            self.cache.resize(episode_id, old)
            return reply

    async def CloseEpisode(self, request, context):
        return await _guard(context, self._close(request))

    async def _close(self, request: pb.CloseEpisodeRequest) -> pb.CloseEpisodeReply:
        entry = self.cache.pop(self._episode_id(request.episode_id))
        if entry is not None:
            await self._room_freed()
            await self._release(entry)
        return pb.CloseEpisodeReply(existed=entry is not None)

    async def Segment(self, request, context):
        return await _guard(context, self._segment(request))

    async def _segment(self, request: pb.SegmentRequest) -> pb.SegmentReply:
        image = await self._image(request)
        points, labels = self._clicks(request.clicks, image.shape[0], image.shape[1])
        prev = None
        if request.HasField("prev_logits"):
            shape = tuple(request.prev_logits.shape)
            data = request.prev_logits.data
            if len(data) != 4 * int(np.prod(shape, dtype=np.int64)):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"prev_logits.data does not hold float32 {shape}")
            try:
                prev = self.backend.check_logits(np.frombuffer(data, dtype=np.float32).reshape(shape).copy())
            except ToolError as error:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        encoded = await self._model(self.batcher.encode, image)
        try:
            result = await self._model(self.batcher.decode, DecodeRequest(encoded, points, labels, prev))
        finally:
            await self.batcher.call(self.backend.release, encoded)
        logits = None
        if result.logits is not None:
            array = np.ascontiguousarray(result.logits, dtype=np.float32)
            logits = pb.Logits(data=array.tobytes(), shape=list(array.shape))
        return pb.SegmentReply(mask=_rle_message(result.mask), score=result.score, logits=logits)

    async def Info(self, request, context):
        backend = self.backend
        return pb.InfoReply(
            backend=getattr(backend, "model_name", backend.name),
            checkpoint_sha256=backend.checkpoint_sha256,
            image_size=backend.image_size,
            device=backend.device,
            version=tool_bridge.__version__,
            max_clicks=self.config.max_clicks,
            max_image_side=self.config.max_image_side,
            max_batch=self.batcher.max_batch,
            open_episodes=len(self.cache),
            cache_bytes=self.cache.bytes,
            volume_backend=self.volume_backend.name if self.volume_backend is not None else "",
            max_volume_voxels=self.config.max_volume_voxels if self.volume_backend is not None else 0,
        )

    # ---- volume episodes -------------------------------------------------------------------

    async def OpenVolume(self, request, context):
        return await _guard(context, self._open_volume(request))

    async def VolumeStep(self, request, context):
        return await _guard(context, self._volume_step(request))

    def _need_volumes(self) -> VolumeBackend:
        if self.volume_backend is None:
            raise _Abort(grpc.StatusCode.UNIMPLEMENTED,
                         "this server takes no volumes: start it with --volume-backend classical|medsam2")
        return self.volume_backend

    async def _volume_call(self, fn: Callable, *args: Any) -> Any:
        """Runs a volume tool call on the model thread (after the batches queued before it)."""
        if self._volume_pending >= self.batcher.max_queue:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"server busy: {self._volume_pending} volume requests queued (max_queue="
                         f"{self.batcher.max_queue}); retry with backoff")
        self._volume_pending += 1
        try:
            return await self.batcher.call(fn, *args)
        except ToolError as error:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except Exception as error:  # noqa: BLE001
            log.exception("volume backend %s failed", getattr(fn, "__name__", fn))
            raise _Abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
        finally:
            self._volume_pending -= 1

    def _volume(self, msg: pb.Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
        """Checks the header (sizes, spacing, compression) before decoding anything, then decodes."""
        d, h, w = int(msg.depth), int(msg.height), int(msg.width)
        side, cap = self.config.max_image_side, self.config.max_volume_voxels
        if not all(2 <= n <= side for n in (d, h, w)):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"volume.depth/height/width {d}x{h}x{w}: each must be 2..{side} (server --max-image-side)")
        voxels = d * h * w
        if voxels > cap:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"volume {d}x{h}x{w} has {voxels} voxels, over the server's --max-volume-mvoxels "
                         f"({cap / 2**20:g} Mi voxels)")
        spacing = tuple(msg.spacing)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"volume.spacing must be three positive mm values (depth, height, width), got {list(spacing)}")
        if msg.compression == pb.COMPRESSION_NONE:
            data = msg.data
        elif msg.compression == pb.COMPRESSION_ZLIB:
            decoder = zlib.decompressobj()
            try:
                data = decoder.decompress(msg.data, voxels + 1)  # never inflates past the header's size
            except zlib.error as error:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"volume.data is not valid zlib data: {error}")
            if len(data) != voxels or not decoder.eof or decoder.unconsumed_tail:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"volume.data (zlib) does not decode to exactly depth*height*width = {voxels} bytes")
        else:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"volume.compression {msg.compression} is unknown")
        if len(data) != voxels:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"volume.data has {len(data)} bytes, expected depth*height*width = {voxels} "
                         "(uint8, row-major [depth, height, width])")
        volume = np.frombuffer(data, dtype=np.uint8).reshape(d, h, w).copy()
        try:
            return validate_volume(volume, spacing)
        except ToolError as error:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from error

    def _volume_clicks(self, clicks: pb.VolumeClicks, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        if len(clicks.points) != 3 * len(clicks.labels):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"clicks.points has {len(clicks.points)} floats for {len(clicks.labels)} labels; "
                         "send x,y,z per label")
        if len(clicks.labels) > self.config.max_clicks:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"{len(clicks.labels)} clicks exceed the server's --max-clicks {self.config.max_clicks}")
        points = np.asarray(clicks.points, dtype=np.float32).reshape(-1, 3)
        labels = np.asarray(clicks.labels, dtype=np.int32)
        try:
            return validate_volume_prompt(points, labels, shape)
        except ToolError as error:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from error

    async def _open_volume(self, request: pb.OpenVolumeRequest) -> pb.OpenVolumeReply:
        backend = self._need_volumes()
        episode_id = self._episode_id(request.episode_id)
        if not request.HasField("volume"):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "OpenVolumeRequest.volume is not set")
        volume, spacing = await asyncio.to_thread(self._volume, request.volume)
        digest = _image_digest(volume) + ":" + np.asarray(spacing, np.float64).tobytes().hex()
        while True:
            existing = self.cache.get(episode_id)
            if existing is not None:
                if not isinstance(existing, _VolumeEpisode) or existing.image_digest != digest:
                    raise _Abort(grpc.StatusCode.ALREADY_EXISTS,
                                 f"episode {episode_id!r} is open with another image or volume; close it or use a new id")
                return pb.OpenVolumeReply(depth=existing.depth, height=existing.encoded.height,
                                          width=existing.encoded.width, next_step=len(existing.steps))
            pending = self._opening.get(episode_id)
            if pending is None:
                break
            await asyncio.shield(pending)
        try:
            reserved = await self._reserve("volume")
        except CacheFull as error:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        pending = asyncio.get_running_loop().create_future()
        self._opening[episode_id] = pending
        d, h, w = volume.shape
        try:
            handle = await self._volume_call(backend.open, volume, spacing)
            held = await self.batcher.call(backend.nbytes, handle)
            self.cache.unreserve(reserved)
            reserved = 0
            try:
                self.cache.admit(episode_id, _VolumeEpisode(Encoded(handle, h, w, held), digest, depth=d))
            except CacheFull as error:
                await self.batcher.call(backend.close, handle)
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        finally:
            self.cache.unreserve(reserved)
            del self._opening[episode_id]
            pending.set_result(None)
            await self._room_freed()
        return pb.OpenVolumeReply(depth=d, height=h, width=w, next_step=0)

    def _probability(self, kind: int, episode: _VolumeEpisode) -> pb.Array | None:
        """The latest step's probability in the asked form (``None``: not asked, or the tool has none)."""
        prob = episode.last_logits
        if kind == pb.PROBABILITY_NONE or prob is None:
            return None
        if kind == pb.PROBABILITY_FLOAT32:
            array, dtype = np.ascontiguousarray(prob, dtype=np.float32), "float32"
        else:
            array, dtype = np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8), "uint8"
        return pb.Array(data=zlib.compress(array.tobytes(), 1), shape=list(array.shape), dtype=dtype,
                        compression=pb.COMPRESSION_ZLIB)

    async def _volume_step(self, request: pb.VolumeStepRequest) -> pb.VolumeStepReply:
        backend = self._need_volumes()
        episode_id = self._episode_id(request.episode_id)
        episode = self._open_episode(episode_id, volume=True)
        kind = request.probability
        if kind not in (pb.PROBABILITY_NONE, pb.PROBABILITY_FLOAT32, pb.PROBABILITY_UINT8):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"probability {kind} is unknown")
        voxels = int(np.prod(episode.shape))
        raw = voxels * (4 if kind == pb.PROBABILITY_FLOAT32 else 1)
        if kind != pb.PROBABILITY_NONE and raw > self.config.max_message_bytes // 2:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"a {'x'.join(map(str, episode.shape))} probability volume ({raw / 2**20:.0f} MiB) does not fit "
                         f"half the server's --max-message-mb {self.config.max_message_bytes >> 20}: ask "
                         f"{'PROBABILITY_UINT8 or ' if kind == pb.PROBABILITY_FLOAT32 else ''}PROBABILITY_NONE")
        points, labels = self._volume_clicks(request.clicks, episode.shape)
        prompt = _prompt_digest(points, labels)
        index = request.step_index
        async with episode.lock:
            record = _answered_step(episode_id, episode, index, prompt)
            if record is not None:
                if kind != pb.PROBABILITY_NONE and index != len(episode.steps) - 1:
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"only the latest step's probability is kept (step {len(episode.steps) - 1}), "
                                 f"asked for step {index}")
                reply = pb.VolumeStepReply()
                reply.CopyFrom(record.reply)
                probability = await asyncio.to_thread(self._probability, kind, episode)
                if probability is not None:
                    reply.probability.CopyFrom(probability)
                return reply
            prev = episode.last_logits if index > 0 else None
            handle = episode.encoded.payload
            result = await self._volume_call(backend.segment, handle, points, labels, prev)
            mask = np.asarray(result.mask)
            if mask.shape != episode.shape or mask.dtype != bool:
                raise _Abort(grpc.StatusCode.INTERNAL,
                             f"volume backend returned a {mask.dtype} {mask.shape} mask for a {episode.shape} volume")
            slices = await asyncio.to_thread(lambda: [_rle_message(plane) for plane in mask])
            record_reply = pb.VolumeStepReply(slices=slices, score=result.score, step_index=index)
            old = episode.nbytes
            episode.steps.append(_StepRecord(prompt, record_reply))
            episode.last_logits = None if result.logits is None else np.asarray(result.logits, dtype=np.float32)
            episode.encoded.nbytes = await self.batcher.call(backend.nbytes, handle)
            self.cache.resize(episode_id, old)
            reply = pb.VolumeStepReply()
            reply.CopyFrom(record_reply)
            probability = await asyncio.to_thread(self._probability, kind, episode)
            if probability is not None:
                reply.probability.CopyFrom(probability)
            return reply


async def _guard(context: grpc.aio.ServicerContext, coro) -> Any:
    """Maps ``_Abort`` to a gRPC status; anything else is a bug reported as INTERNAL."""
    try:
        return await coro
    except _Abort as error:
        await context.abort(error.code, error.details)
    except Exception as error:  # noqa: BLE001 - keep serving, report the cause
        log.exception("internal error")
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


class _TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (health checks stay open)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token (--token-file)")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get(TOKEN_HEADER, "")
        sent = sent.encode() if isinstance(sent, str) else sent
        if hmac.compare_digest(sent, self._expected):
            return await continuation(details)
        return self._deny


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BridgeServer:
    """A started server; ``await stop()`` ends it."""

    def __init__(self, backend: Backend, config: ServerConfig, volume_backend: VolumeBackend | None = None) -> None:
        if not _is_loopback(config.host) and not config.token:
            raise ToolError(
                f"refusing to listen on {config.host} without a token: pass --token-file (and --tls-*) "
                "or bind 127.0.0.1"
            )
        self.config = config
        self.servicer = ToolBridgeServicer(backend, config, volume_backend)
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # never share a port with a stale server silently
        ]
        interceptors = [_TokenInterceptor(config.token)] if config.token else []
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_ToolBridgeServicer_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"{config.host}:{config.port}"
        if config.tls:
            self.port = self.server.add_secure_port(address, _server_credentials(config.tls))
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise ToolError(f"could not bind {address} (in use?)")

    async def start(self) -> None:
        self.servicer.start()
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.servicer.stop()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


def _server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    def read(path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    client_ca = read(tls.client_ca) if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(read(tls.key), read(tls.cert))], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class ServerThread:
    """Runs a ``BridgeServer`` on its own event loop in a daemon thread (tests, benchmarks)."""

    def __init__(self, backend: Backend, config: ServerConfig, volume_backend: VolumeBackend | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: BridgeServer | None = None
        self._backend, self._config, self._volume_backend = backend, config, volume_backend
        self._thread = threading.Thread(target=self._main, daemon=True, name="tool-bridge-server")
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.server = BridgeServer(self._backend, self._config, self._volume_backend)
            self._loop.run_until_complete(self.server.start())
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    @property
    def address(self) -> str:
        return f"{self._config.host}:{self.server.port}"

    def stop(self) -> None:
        if self.server is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self.server.stop(0), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
