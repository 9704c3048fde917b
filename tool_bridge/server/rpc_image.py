"""The 2D RPCs: ``OpenEpisode`` (encode once, batched with other opens), ``Step`` (all clicks so
far against the kept features and the previous step's logits; idempotent per step index) and the
stateless ``Segment``."""

from __future__ import annotations

import grpc
import numpy as np

from ibis_jax.tools.protocol import ToolError
from tool_bridge.backends.base import DecodeRequest
from tool_bridge.proto import tool_bridge_pb2 as pb
from tool_bridge.server.episodes import (Episode, StepRecord, VolumeEpisode, answered_step, image_digest,
                                         prompt_digest)
from tool_bridge.server.host import EpisodeHost
from tool_bridge.server.requests import RequestParser, rle_message
from tool_bridge.server.status import Abort, invalid


class ImageRPCs:
    def __init__(self, host: EpisodeHost, parse: RequestParser) -> None:
        self.host, self.parse = host, parse

    async def open(self, request: pb.OpenEpisodeRequest) -> pb.OpenEpisodeReply:
        host = self.host
        episode_id = self.parse.episode_id(request.episode_id)
        image = await self.parse.image(request)
        digest = image_digest(image)

        def check(existing: Episode) -> None:
            if isinstance(existing, VolumeEpisode):
                raise Abort(grpc.StatusCode.ALREADY_EXISTS,
                            f"episode {episode_id!r} is open as a volume episode; close it or use a new id")
            if existing.image_digest != digest:
                raise Abort(grpc.StatusCode.ALREADY_EXISTS,
                            f"episode {episode_id!r} is open with a different image; close it or use a new id")

        async def create() -> Episode:
            return Episode(await host.model(host.batcher.encode, image), digest)

        episode, next_step = await host.open(episode_id, "image", check, create)
        return pb.OpenEpisodeReply(height=episode.encoded.height, width=episode.encoded.width, next_step=next_step)

    async def step(self, request: pb.StepRequest) -> pb.StepReply:
        host = self.host
        episode_id = self.parse.episode_id(request.episode_id)
        episode = host.find(episode_id, volume=False)
        points, labels = self.parse.clicks(request.clicks, episode.encoded.height, episode.encoded.width)
        prompt = prompt_digest(points, labels)
        index = request.step_index
        async with episode.lock:  # steps of one episode are sequential by nature
            record = answered_step(episode_id, episode, index, prompt)
            if record is not None:
                return record.reply
            prev = episode.last_logits if index > 0 else None
            result = await host.model(host.batcher.decode, DecodeRequest(episode.encoded, points, labels, prev))
            reply = pb.StepReply(mask=rle_message(result.mask), score=result.score, step_index=index)
            old = episode.nbytes
            episode.steps.append(StepRecord(prompt, reply))
            episode.last_logits = result.logits
            host.cache.resize(episode_id, old)
            return reply

    async def segment(self, request: pb.SegmentRequest) -> pb.SegmentReply:
        host = self.host
        image = await self.parse.image(request)
        points, labels = self.parse.clicks(request.clicks, image.shape[0], image.shape[1])
        prev = self._prev_logits(request) if request.HasField("prev_logits") else None
        encoded = await host.model(host.batcher.encode, image)
        try:
            result = await host.model(host.batcher.decode, DecodeRequest(encoded, points, labels, prev))
        finally:
            await host.batcher.call(host.backend.release, encoded)
        logits = None
        if result.logits is not None:
            array = np.ascontiguousarray(result.logits, dtype=np.float32)
            logits = pb.Logits(data=array.tobytes(), shape=list(array.shape))
        return pb.SegmentReply(mask=rle_message(result.mask), score=result.score, logits=logits)

    def _prev_logits(self, request: pb.SegmentRequest) -> np.ndarray:
        shape = tuple(request.prev_logits.shape)
        data = request.prev_logits.data
        if len(data) != 4 * int(np.prod(shape, dtype=np.int64)):
            raise invalid(f"prev_logits.data does not hold float32 {shape}")
        try:
            return self.host.backend.check_logits(np.frombuffer(data, dtype=np.float32).reshape(shape).copy())
        except ToolError as error:
            raise invalid(str(error))
