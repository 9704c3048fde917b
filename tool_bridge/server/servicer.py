"""The ``ToolBridge`` service: each RPC routed to its room (``rpc_image``, ``rpc_volume``, the
episode host for ``CloseEpisode``), its failures mapped to gRPC statuses by ``status.guard``."""

from __future__ import annotations

import tool_bridge
from tool_bridge.backends.base import Backend
from tool_bridge.backends.volume import VolumeBackend
from tool_bridge.proto import tool_bridge_pb2 as pb
from tool_bridge.proto import tool_bridge_pb2_grpc as pb_grpc
from tool_bridge.server.config import ServerConfig
from tool_bridge.server.host import EpisodeHost
from tool_bridge.server.requests import RequestParser
from tool_bridge.server.rpc_image import ImageRPCs
from tool_bridge.server.rpc_volume import VolumeRPCs
from tool_bridge.server.status import guard


class ToolBridgeServicer(pb_grpc.ToolBridgeServicer):
    def __init__(self, backend: Backend, config: ServerConfig, volume_backend: VolumeBackend | None = None) -> None:
        self.config = config
        self.host = EpisodeHost(backend, config, volume_backend)
        self.backend, self.volume_backend = backend, volume_backend
        self.batcher, self.cache = self.host.batcher, self.host.cache
        parse = RequestParser(config)
        self.images = ImageRPCs(self.host, parse)
        self.volumes = VolumeRPCs(self.host, parse)
        self._parse = parse

    def start(self) -> None:
        self.host.start()

    async def stop(self) -> None:
        await self.host.stop()

    async def OpenEpisode(self, request, context):
        return await guard(context, self.images.open(request))

    async def Step(self, request, context):
        return await guard(context, self.images.step(request))

    async def Segment(self, request, context):
        return await guard(context, self.images.segment(request))

    async def OpenVolume(self, request, context):
        return await guard(context, self.volumes.open(request))

    async def VolumeStep(self, request, context):
        return await guard(context, self.volumes.step(request))

    async def CloseEpisode(self, request, context):
        return await guard(context, self._close(request))

    async def _close(self, request: pb.CloseEpisodeRequest) -> pb.CloseEpisodeReply:
        return pb.CloseEpisodeReply(existed=await self.host.close(self._parse.episode_id(request.episode_id)))

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
