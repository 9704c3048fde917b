"""The volume RPCs (``OpenVolume`` / ``VolumeStep``, with a ``VolumeBackend``): they share the
cache, the idempotent step records, the idle sweep and ``CloseEpisode`` with 2D episodes; the
volume's header is checked before it is inflated, and the tool's calls run on the same model
thread (one at a time, not batched)."""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import Any, Callable

import grpc
import numpy as np

from ibis_jax.tools.protocol import ToolError
from tool_bridge.backends.base import Encoded
from tool_bridge.backends.volume import VolumeBackend
from tool_bridge.proto import tool_bridge_pb2 as pb
from tool_bridge.server.episodes import (Episode, StepRecord, VolumeEpisode, answered_step, image_digest,
                                         prompt_digest)
from tool_bridge.server.host import EpisodeHost
from tool_bridge.server.requests import RequestParser, rle_message
from tool_bridge.server.status import Abort, invalid

log = logging.getLogger("tool_bridge.server")

_PROBABILITIES = (pb.PROBABILITY_NONE, pb.PROBABILITY_FLOAT32, pb.PROBABILITY_UINT8)


class VolumeRPCs:
    def __init__(self, host: EpisodeHost, parse: RequestParser) -> None:
        self.host, self.parse = host, parse
        self._pending = 0  # volume calls queued on the model thread (their own max_queue)

    def _backend(self) -> VolumeBackend:
        if self.host.volume_backend is None:
            raise Abort(grpc.StatusCode.UNIMPLEMENTED,
                        "this server takes no volumes: start it with --volume-backend classical|medsam2")
        return self.host.volume_backend

    async def _call(self, fn: Callable, *args: Any) -> Any:
        """Runs a volume tool call on the model thread (after the batches queued before it)."""
        batcher = self.host.batcher
        if self._pending >= batcher.max_queue:
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"server busy: {self._pending} volume requests queued (max_queue="
                        f"{batcher.max_queue}); retry with backoff")
        self._pending += 1
        try:
            return await batcher.call(fn, *args)
        except ToolError as error:
            raise invalid(str(error))
        except Exception as error:  # noqa: BLE001
            log.exception("volume backend %s failed", getattr(fn, "__name__", fn))
            raise Abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
        finally:
            self._pending -= 1

    async def open(self, request: pb.OpenVolumeRequest) -> pb.OpenVolumeReply:
        backend = self._backend()
        episode_id = self.parse.episode_id(request.episode_id)
        if not request.HasField("volume"):
            raise invalid("OpenVolumeRequest.volume is not set")
        volume, spacing = await asyncio.to_thread(self.parse.volume, request.volume)
        digest = image_digest(volume) + ":" + np.asarray(spacing, np.float64).tobytes().hex()

        def check(existing: Episode) -> None:
            if not isinstance(existing, VolumeEpisode) or existing.image_digest != digest:
                raise Abort(grpc.StatusCode.ALREADY_EXISTS,
                            f"episode {episode_id!r} is open with another image or volume; close it or use a new id")

        async def create() -> Episode:
            d, h, w = volume.shape
            handle = await self._call(backend.open, volume, spacing)
            held = await self.host.batcher.call(backend.nbytes, handle)
            return VolumeEpisode(Encoded(handle, h, w, held), digest, depth=d)

        episode, next_step = await self.host.open(episode_id, "volume", check, create)
        depth, height, width = episode.shape
        return pb.OpenVolumeReply(depth=depth, height=height, width=width, next_step=next_step)

    def _check_probability(self, kind: int, episode: VolumeEpisode) -> None:
        """The asked probability must be known and fit half a message."""
        if kind not in _PROBABILITIES:
            raise invalid(f"probability {kind} is unknown")
        raw = int(np.prod(episode.shape)) * (4 if kind == pb.PROBABILITY_FLOAT32 else 1)
        limit = self.host.config.max_message_bytes
        if kind != pb.PROBABILITY_NONE and raw > limit // 2:
            raise invalid(f"a {'x'.join(map(str, episode.shape))} probability volume ({raw / 2**20:.0f} MiB) does not fit "
                          f"half the server's --max-message-mb {limit >> 20}: ask "
                          f"{'PROBABILITY_UINT8 or ' if kind == pb.PROBABILITY_FLOAT32 else ''}PROBABILITY_NONE")

    async def step(self, request: pb.VolumeStepRequest) -> pb.VolumeStepReply:
        backend = self._backend()
        episode_id = self.parse.episode_id(request.episode_id)
        episode = self.host.find(episode_id, volume=True)
        kind = request.probability
        self._check_probability(kind, episode)
        points, labels = self.parse.volume_clicks(request.clicks, episode.shape)
        prompt = prompt_digest(points, labels)
        index = request.step_index
        async with episode.lock:
            record = answered_step(episode_id, episode, index, prompt)
            if record is not None:
                if kind != pb.PROBABILITY_NONE and index != len(episode.steps) - 1:
                    raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"only the latest step's probability is kept (step {len(episode.steps) - 1}), "
                                f"asked for step {index}")
                return await self._reply(record.reply, kind, episode)
            prev = episode.last_logits if index > 0 else None
            handle = episode.encoded.payload
            result = await self._call(backend.segment, handle, points, labels, prev)
            mask = np.asarray(result.mask)
            if mask.shape != episode.shape or mask.dtype != bool:
                raise Abort(grpc.StatusCode.INTERNAL,
                            f"volume backend returned a {mask.dtype} {mask.shape} mask for a {episode.shape} volume")
            slices = await asyncio.to_thread(lambda: [rle_message(plane) for plane in mask])
            record_reply = pb.VolumeStepReply(slices=slices, score=result.score, step_index=index)
            old = episode.nbytes
            episode.steps.append(StepRecord(prompt, record_reply))
            episode.last_logits = None if result.logits is None else np.asarray(result.logits, dtype=np.float32)
            episode.encoded.nbytes = await self.host.batcher.call(backend.nbytes, handle)
            self.host.cache.resize(episode_id, old)
            return await self._reply(record_reply, kind, episode)

    async def _reply(self, recorded: pb.VolumeStepReply, kind: int, episode: VolumeEpisode) -> pb.VolumeStepReply:
        """A copy of the recorded reply (masks, score) with the latest probability when asked."""
        reply = pb.VolumeStepReply()
        reply.CopyFrom(recorded)
        probability = await asyncio.to_thread(_probability, kind, episode)
        if probability is not None:
            reply.probability.CopyFrom(probability)
        return reply


def _probability(kind: int, episode: VolumeEpisode) -> pb.Array | None:
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
