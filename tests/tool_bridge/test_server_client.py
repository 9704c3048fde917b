"""Server and client mechanics on a cheap fake backend: batching, back-pressure, failover,
security (token, TLS, image root, bind address), and giving up with a clear error."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bridge_helpers import FakeBackend, free_port, make_images
from ibis_jax.tools.protocol import ToolError
from tool_bridge.backends.base import InProcessTool
from tool_bridge.client import AsyncBridgeClient, BridgeClient, ClientTLS
from tool_bridge.proto import tool_bridge_pb2 as pb
from tool_bridge.proto import tool_bridge_pb2_grpc as pb_grpc
from tool_bridge.server import Batcher, BridgeServer, Overloaded, ServerConfig, ServerThread, TLSConfig

CLICKS = [([10.0, 12.0], 1), ([40.0, 30.0], 0), ([60.0, 50.0], 1)]


def expected_episode(image, clicks=CLICKS):
    tool = InProcessTool(FakeBackend())
    tool.open("e", image)
    out, prev = [], None
    for k in range(len(clicks)):
        result = tool.segment("e", np.array([c[0] for c in clicks[: k + 1]]),
                              np.array([c[1] for c in clicks[: k + 1]]), prev)
        prev = result.logits
        out.append((result.mask, result.score))
    return out


def client_episode(client, episode_id, image, clicks=CLICKS):
    client.open(episode_id, image)
    out = []
    for k in range(len(clicks)):
        result = client.segment(episode_id, np.array([c[0] for c in clicks[: k + 1]]),
                                np.array([c[1] for c in clicks[: k + 1]]))
        out.append((result.mask, result.score))
    return out


def assert_same(actual, expected):
    for (mask, score), (mask_ref, score_ref) in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(mask, mask_ref)
        assert score == score_ref


@pytest.fixture
def fake_server():
    backend = FakeBackend()
    thread = ServerThread(backend, ServerConfig(port=0, max_batch=4, max_wait_ms=100))
    yield thread, backend
    thread.stop()


def test_opens_arriving_together_are_encoded_as_one_batch(fake_server):
    thread, backend = fake_server
    images = make_images(4, seed=1)

    async def main():
        client = AsyncBridgeClient(thread.address)
        await asyncio.gather(*(client.open(f"e{i}", image) for i, image in enumerate(images)))
        await client.aclose()

    asyncio.run(main())
    assert backend.encode_batches == [4]  # max_batch 4 reached within the 100 ms window


def test_full_queue_answers_resource_exhausted():
    async def main():
        batcher = Batcher(FakeBackend(), ServerConfig(max_queue=2, max_wait_ms=1000))
        batcher.start()
        first = batcher.encode(np.zeros((4, 4, 3), np.uint8))
        second = batcher.encode(np.zeros((4, 4, 3), np.uint8))
        with pytest.raises(Overloaded, match="max_queue=2"):
            batcher.encode(np.zeros((4, 4, 3), np.uint8))
        assert len(await asyncio.gather(first, second)) == 2
        await batcher.stop()

    asyncio.run(main())

    thread = ServerThread(FakeBackend(encode_delay_s=0.5), ServerConfig(port=0, max_queue=1, max_wait_ms=0))
    try:
        image = make_images(1)[0]
        request = pb.OpenEpisodeRequest(image=pb.Image(data=image.tobytes(), height=64, width=80))

        async def flood():
            async with grpc.aio.insecure_channel(thread.address) as channel:
                stub = pb_grpc.ToolBridgeStub(channel)
                calls = []
                for i in range(4):
                    request.episode_id = f"x{i}"
                    calls.append(stub.OpenEpisode(pb.OpenEpisodeRequest.FromString(request.SerializeToString())))
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(flood())
        codes = [r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert any(isinstance(r, pb.OpenEpisodeReply) for r in results)
        # The client backs off and retries through the overload.
        with BridgeClient(thread.address, backoff_s=0.2) as client:
            for i in range(3):
                client.open(f"c{i}", image)
    finally:
        thread.stop()


def test_failover_to_another_address_replays_the_episode():
    a = ServerThread(FakeBackend(), ServerConfig(port=0))
    b = ServerThread(FakeBackend(), ServerConfig(port=0))
    image = make_images(1, seed=3)[0]
    try:
        with BridgeClient([a.address, b.address], deadline_s=2, backoff_s=0.05) as client:
            client.open("one", image)  # round robin: "one" on a, "two" on b
            client.open("two", image)
            first = client.segment("one", np.array([CLICKS[0][0]]), np.array([1]))
            assert len(a.server.servicer.cache) == 1 and len(b.server.servicer.cache) == 1
            a.stop()
            rest = [client.segment("one", np.array([c[0] for c in CLICKS[: k + 1]]),
                                   np.array([c[1] for c in CLICKS[: k + 1]])) for k in (1, 2)]
            assert client.aio._episodes["one"].address == 1
            assert client.aio.replays == 1
        got = [(r.mask, r.score) for r in [first, *rest]]
        assert_same(got, expected_episode(image))
    finally:
        b.stop()


def test_servers_with_different_checkpoints_are_refused():
    a = ServerThread(FakeBackend("sha-a"), ServerConfig(port=0))
    b = ServerThread(FakeBackend("sha-b"), ServerConfig(port=0))
    image = make_images(1)[0]
    try:
        with BridgeClient([a.address, b.address]) as client:
            client.open("one", image)
            with pytest.raises(ToolError, match="same backend and checkpoint"):
                client.open("two", image)
    finally:
        a.stop()
        b.stop()


def test_no_server_fails_within_the_connect_deadline_naming_the_address():
    address = f"127.0.0.1:{free_port()}"  # nothing listens here
    for call in ("open", "info", "segment_image"):
        started = time.monotonic()
        with BridgeClient(address, connect_timeout_s=1.0) as client:
            with pytest.raises(ToolError) as error:
                if call == "open":
                    client.open("e", make_images(1)[0])
                elif call == "info":
                    client.info()
                else:
                    client.segment_image(make_images(1)[0], np.array([[3.0, 3.0]]), np.array([1]))
        elapsed = time.monotonic() - started
        message = str(error.value)
        assert f"no server answers at {address} within 1 s (connect_timeout_s" in message, call
        assert "\n" not in message
        assert 0.9 < elapsed < 4.0, (call, elapsed)  # before: 6 attempts x 60 s wait-for-ready


def test_dead_server_gives_a_clear_tool_error_not_an_empty_mask():
    thread = ServerThread(FakeBackend(), ServerConfig(port=0))
    image = make_images(1)[0]
    with BridgeClient(thread.address, deadline_s=0.3, max_attempts=3, backoff_s=0.05) as client:
        client.open("e", image)
        thread.stop()  # connected once, then gone: retried within the per-call deadline
        started = time.monotonic()
        with pytest.raises(ToolError, match=r"step 0 of episode 'e' failed after 3 attempts on .*DEADLINE_EXCEEDED"):
            client.segment("e", np.array([CLICKS[0][0]]), np.array([1]))
    assert time.monotonic() - started < 10


def test_several_addresses_skip_one_that_never_answers():
    good = ServerThread(FakeBackend(), ServerConfig(port=0))
    dead = f"127.0.0.1:{free_port()}"
    image = make_images(1, seed=2)[0]
    try:
        with BridgeClient([dead, good.address], connect_timeout_s=0.5, backoff_s=0.05) as client:
            assert_same(client_episode(client, "one", image), expected_episode(image))  # assigned to dead
            assert client.aio._episodes["one"].address == 1
            assert_same(client_episode(client, "two", image), expected_episode(image))
    finally:
        good.stop()


def test_token_is_required_and_health_stays_open():
    thread = ServerThread(FakeBackend(), ServerConfig(port=0, token="s3cret"))
    image = make_images(1)[0]
    try:
        with BridgeClient(thread.address, max_attempts=2) as client:
            with pytest.raises(ToolError, match="UNAUTHENTICATED"):
                client.open("e", image)
        with BridgeClient(thread.address, token="wrong", max_attempts=2) as client:
            with pytest.raises(ToolError, match="UNAUTHENTICATED"):
                client.info()
        with BridgeClient(thread.address, token="s3cret") as client:
            assert_same(client_episode(client, "e", image), expected_episode(image))
        with grpc.insecure_channel(thread.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        thread.stop()


def test_public_bind_needs_a_token():
    with pytest.raises(ToolError, match="without a token"):
        BridgeServer(FakeBackend(), ServerConfig(host="0.0.0.0", port=0))


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls(tmp_path):
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca", cwd=tmp_path)
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=tmp_path)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext", cwd=tmp_path)
    p = lambda name: str(tmp_path / name)  # noqa: E731
    tls = TLSConfig(cert=p("server.pem"), key=p("server.key"), client_ca=p("ca.pem"))
    thread = ServerThread(FakeBackend(), ServerConfig(port=0, tls=tls, token="t"))
    image = make_images(1)[0]
    address = f"localhost:{thread.server.port}"
    try:
        mutual = ClientTLS(ca=p("ca.pem"), cert=p("client.pem"), key=p("client.key"))
        with BridgeClient(address, tls=mutual, token="t") as client:
            assert_same(client_episode(client, "e", image), expected_episode(image))
        # Without a client certificate the handshake fails; the client gives up cleanly.
        with BridgeClient(address, tls=ClientTLS(ca=p("ca.pem")), token="t", deadline_s=1,
                          max_attempts=2, backoff_s=0.05, connect_timeout_s=1) as client:
            with pytest.raises(ToolError, match=f"no server answers at {address}.*TLS"):
                client.info()
        with BridgeClient(address, token="t", deadline_s=1, max_attempts=2, backoff_s=0.05,
                          connect_timeout_s=1) as client:
            with pytest.raises(ToolError, match="TLS"):  # plaintext against a TLS port
                client.info()
    finally:
        thread.stop()


def test_paths_are_read_only_under_the_image_root(tmp_path):
    from PIL import Image

    root = tmp_path / "root"
    root.mkdir()
    image = make_images(1, seed=4)[0]
    Image.fromarray(image).save(root / "a.png")
    np.save(root / "b.npy", image)
    Image.fromarray(image).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "link.png")
    thread = ServerThread(FakeBackend(), ServerConfig(port=0, image_root=str(root)))
    try:
        with grpc.insecure_channel(thread.address) as channel:
            stub = pb_grpc.ToolBridgeStub(channel)
            for i, name in enumerate(["a.png", "b.npy", str(root / "a.png")]):
                reply = stub.OpenEpisode(pb.OpenEpisodeRequest(episode_id=f"p{i}", path=name))
                assert (reply.height, reply.width) == image.shape[:2]
            step = stub.Step(pb.StepRequest(episode_id="p0", clicks=pb.Clicks(points=CLICKS[0][0], labels=[1])))
            assert step.score == expected_episode(image)[0][1]
            for name, code in [("../outside.png", grpc.StatusCode.PERMISSION_DENIED),
                               (str(tmp_path / "outside.png"), grpc.StatusCode.PERMISSION_DENIED),
                               ("link.png", grpc.StatusCode.PERMISSION_DENIED),
                               ("missing.png", grpc.StatusCode.NOT_FOUND)]:
                with pytest.raises(grpc.RpcError) as error:
                    stub.OpenEpisode(pb.OpenEpisodeRequest(episode_id="q", path=name))
                assert error.value.code() == code, name
    finally:
        thread.stop()


def test_oversized_messages_are_refused():
    thread = ServerThread(FakeBackend(), ServerConfig(port=0, max_message_bytes=1 << 16))
    try:
        big = make_images(1, size=(200, 200))[0]  # 120 kB > 64 KiB
        with BridgeClient(thread.address, max_attempts=2, backoff_s=0.01) as client:
            with pytest.raises(ToolError, match="RESOURCE_EXHAUSTED"):
                client.open("big", big)
            client.open("small", make_images(1)[0])  # still serving
    finally:
        thread.stop()


def test_client_side_imports_neither_jax_nor_torch():
    import sys

    code = ("import sys, tool_bridge.client, tool_bridge.server, tool_bridge.cli; "
            "print(sorted(m for m in ('jax', 'torch', 'sam2') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_committed_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    from tool_bridge.proto import generate

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "tool_bridge", "proto")
    (tmp_path / "tool_bridge" / "proto").mkdir(parents=True)
    assert generate.main(str(tmp_path)) == 0
    for name in ("tool_bridge_pb2.py", "tool_bridge_pb2_grpc.py"):
        fresh = (tmp_path / "tool_bridge" / "proto" / name).read_text()
        with open(os.path.join(here, name)) as handle:
            assert handle.read() == fresh, f"{name} is stale: run python -m tool_bridge.proto.generate"
