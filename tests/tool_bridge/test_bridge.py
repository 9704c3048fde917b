"""The gRPC bridge with the medsam2 backend: exactness, concurrency, idempotency, replay, bad input."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from bridge_helpers import make_clicks, make_images
from ibis_jax.tools.protocol import ToolError

pytest.importorskip("torch")
pytest.importorskip("sam2")

from tool_bridge.backends.base import InProcessTool  # noqa: E402
from tool_bridge.client import AsyncBridgeClient, BridgeClient  # noqa: E402
from tool_bridge.proto import tool_bridge_pb2 as pb  # noqa: E402
from tool_bridge.proto import tool_bridge_pb2_grpc as pb_grpc  # noqa: E402
from tool_bridge.server import ServerConfig, ServerThread  # noqa: E402


def in_process_episode(backend, image, clicks):
    """Masks and scores of the in-process tool (itself checked against sam2 bit for bit)."""
    tool = InProcessTool(backend)
    tool.open("ref", image)
    points, labels, prev, out = [], [], None, []
    for point, label in clicks:
        points.append(point)
        labels.append(label)
        result = tool.segment("ref", np.array(points), np.array(labels), prev)
        prev = result.logits
        out.append((result.mask, result.score))
    tool.close("ref")
    return out


def run_episode(client, episode_id, image, clicks):
    client.open(episode_id, image)
    points, labels, out = [], [], []
    for point, label in clicks:
        points.append(point)
        labels.append(label)
        result = client.segment(episode_id, np.array(points), np.array(labels), None)
        assert result.logits is None
        out.append((result.mask, result.score))
    client.close(episode_id)
    return out


def assert_same(actual, expected):
    assert len(actual) == len(expected)
    for (mask, score), (mask_ref, score_ref) in zip(actual, expected):
        np.testing.assert_array_equal(mask, mask_ref)
        assert score == score_ref


@pytest.fixture(scope="module")
def episodes(backend):
    """Three (image, clicks, in-process answers) triples, computed once."""
    images = make_images(3, seed=21)
    out = []
    for i, image in enumerate(images):
        clicks = make_clicks(3, seed=100 + i)
        out.append((image, clicks, in_process_episode(backend, image, clicks)))
    return out


def test_bridge_equals_in_process_and_predictor(server, episodes):
    image, clicks, expected = episodes[0]
    with BridgeClient(server.address) as client:
        assert_same(run_episode(client, "a", image, clicks), expected)
        info = client.info()
    assert info.backend == "medsam2" and info.image_size == 512 and info.device == "cpu"
    assert len(info.checkpoint_sha256) == 64


def test_concurrent_episodes_never_mix_replies(server, episodes):
    async def one(client, i, image, clicks):
        await client.open(f"ep{i}", image)
        points, labels, out = [], [], []
        for point, label in clicks:
            points.append(point)
            labels.append(label)
            result = await client.segment(f"ep{i}", np.array(points), np.array(labels))
            out.append((result.mask, result.score))
        await client.close(f"ep{i}")
        return out

    async def main():
        client = AsyncBridgeClient(server.address)
        try:
            return await asyncio.gather(*(one(client, i, image, clicks)
                                          for i, (image, clicks, _) in enumerate(episodes)))
        finally:
            await client.aclose()

    before = server.server.servicer.batcher.largest_batch
    results = asyncio.run(main())
    for got, (_, _, expected) in zip(results, episodes):
        assert_same(got, expected)
    # The three opens arrived together and were encoded as one batch (max_wait 5 ms).
    assert max(before, server.server.servicer.batcher.largest_batch) >= 2


def test_step_is_idempotent_and_lost_episodes_are_replayed(server, episodes):
    image, clicks, expected = episodes[1]
    with BridgeClient(server.address) as client:
        client.open("r", image)
        server_id = client.aio._episodes["r"].server_id
        first = client.segment("r", np.array([clicks[0][0]]), np.array([clicks[0][1]]))
        # The same step again, straight on the wire: answered from the record, same bytes.
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ToolBridgeStub(channel)
            request = pb.StepRequest(episode_id=server_id, step_index=0,
                                     clicks=pb.Clicks(points=clicks[0][0], labels=[clicks[0][1]]))
            again = stub.Step(request)
            assert again.score == first.score
            with pytest.raises(grpc.RpcError) as error:  # step 0 again, other clicks
                stub.Step(pb.StepRequest(episode_id=server_id, step_index=0,
                                         clicks=pb.Clicks(points=[1.0, 1.0], labels=[1])))
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.RpcError) as error:  # a gap in the steps
                stub.Step(pb.StepRequest(episode_id=server_id, step_index=5,
                                         clicks=pb.Clicks(points=[1.0, 1.0], labels=[1])))
            assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
            # Simulate an eviction: the server forgets the episode.
            assert stub.CloseEpisode(pb.CloseEpisodeRequest(episode_id=server_id)).existed
        points = [c[0] for c in clicks]
        labels = [c[1] for c in clicks]
        second = client.segment("r", np.array(points[:2]), np.array(labels[:2]))
        third = client.segment("r", np.array(points), np.array(labels))
        assert client.aio.replays == 1  # step 0 re-sent, then step 1 computed anew
    assert_same([(first.mask, first.score), (second.mask, second.score), (third.mask, third.score)],
                expected)


def test_byte_capped_cache_never_evicts_an_open_episode(backend, episodes):
    # Room for one episode's features (4 MiB): a second open is refused while the first is open.
    thread = ServerThread(backend, ServerConfig(port=0, cache_bytes=5 << 20, admit_wait_s=0.05))
    try:
        with BridgeClient(thread.address, max_busy_attempts=2, backoff_s=0.01) as client:
            (image_a, clicks_a, expected_a), (image_b, clicks_b, expected_b) = episodes[0], episodes[2]
            client.open("a", image_a)
            with pytest.raises(ToolError, match="RESOURCE_EXHAUSTED: feature cache full.*--cache-mb"):
                client.open("b", image_b)
            got = {"a": [], "b": []}
            for eid, clicks in (("a", clicks_a), ("b", clicks_b)):
                if eid == "b":
                    client.close("a")
                    client.open("b", image_b)
                for k in range(2):
                    points = np.array([c[0] for c in clicks[: k + 1]])
                    labels = np.array([c[1] for c in clicks[: k + 1]])
                    result = client.segment(eid, points, labels)
                    got[eid].append((result.mask, result.score))
            assert thread.server.servicer.cache.refusals >= 2
            assert len(thread.server.servicer.cache) == 1
            assert client.aio.replays == 0
        assert_same(got["a"], expected_a[:2])
        assert_same(got["b"], expected_b[:2])
    finally:
        thread.stop()


def test_stateless_segment_chains_logits_like_an_episode(server, episodes):
    image, clicks, expected = episodes[2]
    with BridgeClient(server.address) as client:
        prev, got = None, []
        for k in range(2):
            points = np.array([c[0] for c in clicks[: k + 1]])
            labels = np.array([c[1] for c in clicks[: k + 1]])
            result = client.segment_image(image, points, labels, prev)
            assert result.logits.shape == (1, 128, 128)
            prev = result.logits
            got.append((result.mask, result.score))
    assert_same(got, expected[:2])


def test_bad_requests_are_rejected_and_the_server_keeps_serving(server, episodes):
    image, clicks, expected = episodes[0]
    ok_image = pb.Image(data=image.tobytes(), height=image.shape[0], width=image.shape[1])
    one_click = pb.Clicks(points=[5.0, 5.0], labels=[1])

    def code_of(call, request):
        with pytest.raises(grpc.RpcError) as error:
            call(request, timeout=30)
        return error.value.code(), error.value.details()

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ToolBridgeStub(channel)
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        short = pb.Image(data=b"\0" * 10, height=64, width=80)
        assert code_of(stub.OpenEpisode, pb.OpenEpisodeRequest(episode_id="x", image=short))[0] == invalid
        big = pb.Image(data=b"\0" * (300 * 300 * 3), height=300, width=300)  # > --max-image-side 256
        code, details = code_of(stub.OpenEpisode, pb.OpenEpisodeRequest(episode_id="x", image=big))
        assert code == invalid and "max-image-side" in details
        assert code_of(stub.OpenEpisode, pb.OpenEpisodeRequest(episode_id="", image=ok_image))[0] == invalid
        assert code_of(stub.OpenEpisode, pb.OpenEpisodeRequest(episode_id="x"))[0] == invalid
        code, _ = code_of(stub.OpenEpisode, pb.OpenEpisodeRequest(episode_id="x", path="a.png"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION  # this server has no --image-root
        code, details = code_of(stub.Step, pb.StepRequest(episode_id="never", clicks=one_click))
        assert code == grpc.StatusCode.NOT_FOUND and "re-open" in details

        stub.OpenEpisode(pb.OpenEpisodeRequest(episode_id="bad", image=ok_image))
        bad_clicks = [
            pb.Clicks(points=[500.0, 5.0], labels=[1]),  # outside the 80x64 image
            pb.Clicks(points=[-1.0, 5.0], labels=[1]),
            pb.Clicks(points=[float("nan"), 5.0], labels=[1]),
            pb.Clicks(points=[5.0, 5.0], labels=[2]),
            pb.Clicks(points=[5.0, 5.0, 6.0], labels=[1]),
            pb.Clicks(points=[], labels=[]),
            pb.Clicks(points=[5.0, 5.0] * 9, labels=[1] * 9),  # > --max-clicks 8
        ]
        for clicks_msg in bad_clicks:
            code, details = code_of(stub.Step, pb.StepRequest(episode_id="bad", clicks=clicks_msg))
            assert code == invalid, (clicks_msg, details)
        wrong = pb.Logits(data=np.zeros((1, 64, 64), np.float32).tobytes(), shape=[1, 64, 64])
        code, details = code_of(stub.Segment, pb.SegmentRequest(image=ok_image, clicks=one_click,
                                                                 prev_logits=wrong))
        assert code == invalid and "128" in details
        # A different image under an open id.
        other = pb.Image(data=bytes(len(ok_image.data)), height=64, width=80)
        code, _ = code_of(stub.OpenEpisode, pb.OpenEpisodeRequest(episode_id="bad", image=other))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        # The episode is intact after all that: step 0 answers as usual.
        reply = stub.Step(pb.StepRequest(episode_id="bad", step_index=0,
                                         clicks=pb.Clicks(points=clicks[0][0], labels=[clicks[0][1]])))
        assert reply.score == expected[0][1]
        stub.CloseEpisode(pb.CloseEpisodeRequest(episode_id="bad"))

    # The client refuses bad input itself, and maps server refusals to ToolError without retrying.
    with BridgeClient(server.address, max_attempts=3) as client:
        with pytest.raises(ToolError, match="uint8"):
            client.open("f", image.astype(np.float32))
        with pytest.raises(ToolError, match="max-image-side"):
            client.open("g", np.zeros((300, 300, 3), np.uint8))
        client.open("h", image)
        with pytest.raises(ToolError, match="outside"):
            client.segment("h", np.array([[500.0, 1.0]]), np.array([1]))
        with pytest.raises(ToolError, match="max-clicks"):
            client.segment("h", np.full((9, 2), 3.0), np.ones(9))
        with pytest.raises(ToolError, match="unknown episode"):
            client.segment("zzz", np.array([[1.0, 1.0]]), np.array([1]))
        assert client.aio.replays == 0
