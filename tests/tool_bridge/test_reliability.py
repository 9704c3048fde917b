"""The bridge under pressure and bad input: a feature cache smaller than the episodes in flight
(no live episode is evicted, every episode completes with the in-process masks), the idle timeout,
image sizes read from the header before decoding, NUL bytes in paths."""

from __future__ import annotations

import asyncio
import struct
import time
import zlib

import grpc
import numpy as np
import pytest

from bridge_helpers import FakeBackend, make_clicks, make_images
from ibis_jax.tools.protocol import ToolError
from tool_bridge.backends.base import DecodeRequest, InProcessTool
from tool_bridge.backends.classical import ClassicalBackend
from tool_bridge.client import AsyncBridgeClient, BridgeClient
from tool_bridge.proto import tool_bridge_pb2 as pb
from tool_bridge.proto import tool_bridge_pb2_grpc as pb_grpc
from tool_bridge.server import ServerConfig, ServerThread

CLIENTS, EPISODES_PER_CLIENT, STEPS, CACHE_EPISODES = 4, 4, 3, 4
SIZE = (48, 56)


def _clicks_upto(clicks, k):
    return np.array([c[0] for c in clicks[: k + 1]]), np.array([c[1] for c in clicks[: k + 1]])


def _reference(images, clicks):
    tool = InProcessTool(ClassicalBackend())
    out = []
    for i, image in enumerate(images):
        tool.open(f"r{i}", image)
        prev, answers = None, []
        for k in range(STEPS):
            result = tool.segment(f"r{i}", *_clicks_upto(clicks[i], k), prev)
            prev = result.logits
            answers.append((result.mask, result.score))
        tool.close(f"r{i}")
        out.append(answers)
    return out


def test_a_cache_smaller_than_the_episodes_in_flight_completes_every_episode():
    count = CLIENTS * EPISODES_PER_CLIENT
    images = make_images(count, size=SIZE, seed=11)
    clicks = [make_clicks(STEPS, size=SIZE, seed=100 + i) for i in range(count)]
    expected = _reference(images, clicks)
    backend = ClassicalBackend()
    probe = backend.encode([images[0]])[0]
    logits = backend.decode([DecodeRequest(probe, *_clicks_upto(clicks[0], 0), None)])[0].logits
    backend.release(probe)
    # Room for the features of CACHE_EPISODES episodes and a half, with 16 episodes in flight.
    cap = int((CACHE_EPISODES + 0.5) * probe.nbytes)
    thread = ServerThread(backend, ServerConfig(port=0, cache_bytes=cap, max_wait_ms=1))
    cache = thread.server.servicer.cache
    peak = {"bytes": 0, "episodes": 0}

    async def episode(client, i):
        await client.open(f"ep{i}", images[i])
        answers = []
        for k in range(STEPS):
            result = await client.segment(f"ep{i}", *_clicks_upto(clicks[i], k))
            answers.append((result.mask, result.score))
            peak["bytes"] = max(peak["bytes"], cache.bytes)
            peak["episodes"] = max(peak["episodes"], len(cache))
            await asyncio.sleep(0.01)  # the policy's turn
        await client.close(f"ep{i}")
        return answers

    async def main():
        clients = [AsyncBridgeClient(thread.address, backoff_s=0.02, max_backoff_s=0.5) for _ in range(CLIENTS)]
        try:
            results = await asyncio.gather(*(episode(clients[i % CLIENTS], i) for i in range(count)),
                                           return_exceptions=True)
            return results, sum(c.replays for c in clients), sum(c.busy_retries for c in clients)
        finally:
            for client in clients:
                await client.aclose()

    try:
        results, replays, busy = asyncio.run(main())
    finally:
        thread.stop()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    for got, want in zip(results, expected, strict=True):
        for (mask, score), (mask_ref, score_ref) in zip(got, want, strict=True):
            np.testing.assert_array_equal(mask, mask_ref)
            assert score == score_ref
    assert len({r[-1][0].tobytes() for r in results}) == count  # every episode got its own answers
    # The cache really was too small for all 16 at once: opens waited for room (and, past
    # admit_wait_s, were answered RESOURCE_EXHAUSTED and retried by the client: ``busy`` times).
    assert cache.refusals > 0
    # Admission counts each episode at its largest size seen; only the logits of the first
    # episodes (before any step showed their size) can overshoot the cap.
    assert peak["episodes"] <= CACHE_EPISODES
    assert peak["bytes"] <= cap + CACHE_EPISODES * logits.nbytes
    assert replays == 0  # no live episode was evicted, so nothing was ever replayed
    assert len(cache) == 0 and cache.bytes == 0 and cache.reserved == 0


def test_a_full_cache_refuses_new_episodes_with_a_clear_error_and_keeps_the_open_one():
    backend = FakeBackend()
    image = make_images(1)[0]
    thread = ServerThread(backend, ServerConfig(port=0, cache_bytes=image.nbytes + 100, admit_wait_s=0.05))
    try:
        with BridgeClient(thread.address, max_busy_attempts=3, backoff_s=0.01) as client:
            client.open("a", image)
            with pytest.raises(ToolError, match=r"failed after 3 attempts.*RESOURCE_EXHAUSTED: feature cache "
                                                r"full: 1 open episodes.*raise --cache-mb"):
                client.open("b", image)
            assert client.segment("a", np.array([[5.0, 5.0]]), np.array([1])).mask.shape == image.shape[:2]
            assert client.aio.replays == 0  # "a" was never evicted
            client.close("a")
            client.open("b", image)  # room again
        assert thread.server.servicer.cache.refusals >= 3
    finally:
        thread.stop()


def test_idle_episodes_are_freed_and_a_returning_client_replays():
    backend = FakeBackend()
    image = make_images(1, seed=5)[0]
    thread = ServerThread(backend, ServerConfig(port=0, idle_timeout_s=0.3))
    cache = thread.server.servicer.cache
    try:
        with BridgeClient(thread.address, backoff_s=0.01) as client:
            client.open("idle", image)
            first = client.segment("idle", np.array([[10.0, 12.0]]), np.array([1]))
            deadline = time.monotonic() + 10
            while len(cache) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(cache) == 0 and cache.bytes == 0 and cache.expirations == 1
            assert backend.released == 1
            # The client never noticed: the next step re-opens and replays step 0 with the same answer.
            second = client.segment("idle", np.array([[10.0, 12.0], [40.0, 30.0]]), np.array([1, 0]))
            assert client.aio.replays == 1
        reference = InProcessTool(FakeBackend())
        reference.open("e", image)
        ref_first = reference.segment("e", np.array([[10.0, 12.0]]), np.array([1]), None)
        ref_second = reference.segment("e", np.array([[10.0, 12.0], [40.0, 30.0]]), np.array([1, 0]),
                                       ref_first.logits)
        np.testing.assert_array_equal(first.mask, ref_first.mask)
        np.testing.assert_array_equal(second.mask, ref_second.mask)
    finally:
        thread.stop()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says ``width x height`` RGB, followed by a few bytes of (short) data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _jpeg_with_size(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(make_images(1, size=(16, 16))[0]).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)  # SOF0: length, precision, height, width
    return bytes(data)


def test_image_size_is_checked_from_the_header_and_bad_paths_are_invalid_argument(tmp_path):
    (tmp_path / "huge.png").write_bytes(_png_header_only(12000, 12000))
    (tmp_path / "huge.jpg").write_bytes(_jpeg_with_size(12000, 12000))
    np.lib.format.open_memmap(tmp_path / "huge.npy", mode="w+", dtype=np.uint8, shape=(12000, 12000, 3))
    thread = ServerThread(FakeBackend(), ServerConfig(port=0, image_root=str(tmp_path)))
    try:
        with grpc.insecure_channel(thread.address) as channel:
            stub = pb_grpc.ToolBridgeStub(channel)
            for name in ("huge.png", "huge.jpg", "huge.npy"):
                with pytest.raises(grpc.RpcError) as error:
                    stub.OpenEpisode(pb.OpenEpisodeRequest(episode_id="h", path=name), timeout=30)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
                # "too large", not "cannot read image": refused from the header, before any decoding
                assert "(12000, 12000" in error.value.details() and "too large" in error.value.details(), name
            for path in ("a\0.png", "\0", "", "x" * 5000, "a.png\0../../etc/passwd"):
                with pytest.raises(grpc.RpcError) as error:
                    stub.OpenEpisode(pb.OpenEpisodeRequest(episode_id="n", path=path), timeout=30)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path[:20], error.value.details())
    finally:
        thread.stop()
