"""Volume episodes over the bridge (``AsyncBridgeClient.open_volume`` / ``segment_volume``): the
volume (zlib-compressed) and its spacing go once per episode and again only on a re-open; each
step sends all clicks so far and gets the whole 3D mask back, with the tool's foreground
probability when ``volume_probability`` asks for it (``"float32"`` exactly, ``"uint8"``
quantised to 1/255; e.g. the ``uncertain`` slice rule reads it)."""

from __future__ import annotations

import asyncio
import zlib
from typing import TYPE_CHECKING

import numpy as np

from ibis_jax.data.rle import decode_rle
from ibis_jax.tools.protocol import ToolError
from ibis_jax.tools.volume import VolumeSegmentResult, validate_volume, validate_volume_prompt
from tool_bridge.client.episodes import ClientEpisode, ClientStep
from tool_bridge.proto import tool_bridge_pb2 as pb
from tool_bridge.proto import tool_bridge_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tool_bridge.client.aio import AsyncBridgeClient

PROBABILITY = {"none": pb.PROBABILITY_NONE, "float32": pb.PROBABILITY_FLOAT32, "uint8": pb.PROBABILITY_UINT8}


def _volume_clicks(points: np.ndarray, labels: np.ndarray) -> pb.VolumeClicks:
    return pb.VolumeClicks(points=points.reshape(-1).tolist(), labels=labels.tolist())


def _volume_mask(reply: pb.VolumeStepReply, shape: tuple[int, int, int], what: str) -> np.ndarray:
    d, h, w = shape
    if len(reply.slices) != d or any(list(rle.size) != [h, w] for rle in reply.slices):
        raise ToolError(f"tool bridge: {what}: the server answered {len(reply.slices)} slices for a {d}x{h}x{w} "
                        "volume (a server of another version?)")
    planes = [decode_rle({"size": list(rle.size), "counts": rle.counts}) for rle in reply.slices]
    return np.stack(planes).astype(bool)


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


def _same_volume_step(a: pb.VolumeStepReply, b: pb.VolumeStepReply) -> bool:
    return (a.score == b.score and len(a.slices) == len(b.slices)
            and all(x.counts == y.counts for x, y in zip(a.slices, b.slices)))


class VolumeEpisodes:
    """The volume half of an ``AsyncBridgeClient`` (its channels, retries, episodes and replays)."""

    def __init__(self, client: "AsyncBridgeClient") -> None:
        self.client = client

    async def open(self, episode_id: str, volume: np.ndarray, spacing) -> None:
        """Sends the volume (uint8 ``[D, H, W]``) and its spacing (mm, ``(sd, sh, sw)``) once."""
        client = self.client
        volume, spacing = validate_volume(volume, spacing, where=f"open_volume({episode_id!r})")
        if episode_id in client._episodes:
            raise ToolError(f"open_volume: episode {episode_id!r} is already open; close it or pick a new id")
        data = await asyncio.to_thread(zlib.compress, volume.tobytes(), 1)
        limit = client.max_message_bytes
        if len(data) + 4096 > limit:
            raise ToolError(f"open_volume({episode_id!r}): the {'x'.join(map(str, volume.shape))} volume compresses "
                            f"to {len(data) / 2**20:.1f} MiB, over the {limit / 2**20:g} MiB message "
                            "limit: raise max_message_bytes here and the server's --max-message-mb, or crop it")
        d, h, w = volume.shape
        message = pb.Volume(data=data, depth=d, height=h, width=w, spacing=list(spacing),
                            compression=pb.COMPRESSION_ZLIB)
        episode = client._new_episode(episode_id, image=None, volume=message, shape=(d, h, w))
        await client._begin(episode, f"open volume episode {episode_id!r}")

    async def reopen(self, episode: ClientEpisode, address: str, stub: pb_grpc.ToolBridgeStub) -> None:
        """Opens the volume episode on ``address`` and replays the steps that server does not hold."""
        client = self.client
        kwargs = client.channels.call_kwargs()
        request = pb.OpenVolumeRequest(episode_id=episode.server_id, volume=episode.volume)
        reply = await stub.OpenVolume(request, **kwargs)
        if (reply.depth, reply.height, reply.width) != episode.shape:
            raise ToolError(f"tool bridge: {address} opened episode {episode.episode_id!r} as "
                            f"{reply.depth}x{reply.height}x{reply.width}, sent {'x'.join(map(str, episode.shape))}")
        await client.replayer.replay(episode, address, reply.next_step, lambda index, step: stub.VolumeStep(
            pb.VolumeStepRequest(episode_id=episode.server_id, step_index=index,
                                 clicks=_volume_clicks(step.points, step.labels)), **kwargs), _same_volume_step)

    async def segment(self, episode_id: str, points: np.ndarray, labels: np.ndarray) -> VolumeSegmentResult:
        """All clicks so far (voxel ``x, y, z``) -> the whole 3D mask (and the probability if asked)."""
        client = self.client
        episode = client._episode(episode_id, volume=True)
        points, labels = validate_volume_prompt(points, labels, episode.shape)
        what = f"volume step {len(episode.steps)} of episode {episode_id!r}"
        async with episode.lock:
            index = len(episode.steps)
            request = pb.VolumeStepRequest(episode_id=episode.server_id, step_index=index,
                                           clicks=_volume_clicks(points, labels),
                                           probability=PROBABILITY[client.volume_probability])
            reply = await client._send_step(episode, what,
                                            lambda stub: stub.VolumeStep(request, **client.channels.call_kwargs()))
            mask = await asyncio.to_thread(_volume_mask, reply, episode.shape, what)
            probability = None
            if reply.HasField("probability"):
                probability = await asyncio.to_thread(_array, reply.probability, episode.shape, what)
                reply.ClearField("probability")  # kept for replay checks: masks and score only
            episode.steps.append(ClientStep(points, labels, reply))
        return VolumeSegmentResult(mask=mask, logits=probability, score=float(reply.score))
