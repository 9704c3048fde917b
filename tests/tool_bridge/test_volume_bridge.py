"""Volume episodes over the tool bridge (real gRPC on loopback) with the classical 3D backend:
the agent loop through ``BridgeVolumeTool`` gives the in-process tool's masks, a server SIGKILLed
mid-episode is replayed transparently, bad input gets a clear status, and ``segment --volume``
takes a bridge address."""

from __future__ import annotations

import zlib

import grpc
import numpy as np
import pytest

pytest.importorskip("skimage")

from bridge_helpers import ServerProcess, free_port  # noqa: E402
from ibis_jax.agent.loop import run_agent  # noqa: E402
from ibis_jax.agent.oracle import OraclePolicy  # noqa: E402
from ibis_jax.agent.volume import VolumeEpisode, VolumeEpisodeConfig  # noqa: E402
from ibis_jax.data.volumes import ellipsoid_volume  # noqa: E402
from ibis_jax.tools.protocol import ToolError  # noqa: E402
from ibis_jax.tools.volume import ClassicalVolumeTool, VolumeSegmentationTool  # noqa: E402
from tool_bridge.backends.classical import ClassicalBackend  # noqa: E402
from tool_bridge.backends.volume import make_volume_backend  # noqa: E402
from tool_bridge.client import BridgeClient, BridgeVolumeTool  # noqa: E402
from tool_bridge.proto import tool_bridge_pb2 as pb  # noqa: E402
from tool_bridge.proto import tool_bridge_pb2_grpc as pb_grpc  # noqa: E402
from tool_bridge.server import ServerConfig, ServerThread  # noqa: E402

SHAPE = (8, 32, 32)
SPACING = (3.0, 1.0, 1.0)
CLICKS = [((16.0, 15.0, 4.0), 1), ((3.0, 4.0, 4.0), 0), ((17.0, 16.0, 2.0), 1), ((20.0, 12.0, 6.0), 1)]


@pytest.fixture(scope="module")
def server():
    thread = ServerThread(ClassicalBackend(), ServerConfig(port=0, max_clicks=16, max_image_side=256,
                                                          max_volume_voxels=64 * 64 * 64),
                          make_volume_backend("classical"))
    yield thread
    thread.stop()


def _prompt(k):
    points = np.array([c[0] for c in CLICKS[: k + 1]], np.float32)
    return points, np.array([c[1] for c in CLICKS[: k + 1]], np.int32)


def _in_process(volume, spacing, steps=len(CLICKS)):
    tool = ClassicalVolumeTool()
    tool.open("ref", volume, spacing)
    out, prev = [], None
    for k in range(steps):
        result = tool.segment("ref", *_prompt(k), prev)
        prev = result.logits
        out.append(result)
    return out


def _episodes(seeds):
    episodes = []
    for seed in seeds:
        volume, gt, spacing = ellipsoid_volume(seed, SHAPE, SPACING)
        episodes.append(VolumeEpisode(volume, spacing, "Segment the ellipsoid.", gt, episode_id=f"e{seed}",
                                      config=VolumeEpisodeConfig(max_actions=4, slice_rule="uncertain")))
    return episodes


def test_agent_loop_through_the_bridge_equals_the_in_process_tool(server):
    policy = OraclePolicy(max_clicks=4, volume_clicker="3d")
    local = _episodes([0, 1])
    run_agent(policy, ClassicalVolumeTool(), local)
    with BridgeVolumeTool(server.address, volume_probability="float32") as tool:
        assert isinstance(tool, VolumeSegmentationTool)
        remote = _episodes([0, 1])
        run_agent(OraclePolicy(max_clicks=4, volume_clicker="3d"), tool, remote)
    for a, b in zip(local, remote, strict=True):
        assert len(a.steps) == len(b.steps) >= 2 and a.end_reason == b.end_reason
        for sa, sb in zip(a.steps, b.steps):
            np.testing.assert_array_equal(sa.mask, sb.mask)
            assert sa.slice == sb.slice and sa.score == pytest.approx(sb.score, abs=1e-6)  # the wire: float32
        assert b.dices[-1] == a.dices[-1] and b.dices[-1] > 0.5
        assert len({s.slice for s in b.steps}) > 1  # the 'uncertain' rule read the probability and moved


def test_steps_return_the_tools_probability_and_cache_bytes_are_accounted(server):
    volume, _, spacing = ellipsoid_volume(3, SHAPE, SPACING)
    expected = _in_process(volume, spacing, steps=2)
    with BridgeClient(server.address, volume_probability="float32") as client:
        assert client.info().volume_backend == "classical-3d"
        client.open_volume("p", volume, spacing)
        held = client.info().cache_bytes
        assert held >= volume.size * 8  # the tool's float64 copy of the volume
        for k, want in enumerate(expected):
            got = client.segment_volume("p", *_prompt(k))
            np.testing.assert_array_equal(got.mask, want.mask)
            np.testing.assert_array_equal(got.logits, want.logits)  # float32, exactly
        assert client.info().cache_bytes == held + volume.size * 4  # plus the kept float32 probability
        held_by_tool = server.server.servicer.volume_backend.tool._volumes
        before = len(held_by_tool)
        client.close("p")
        assert client.info().cache_bytes == 0 and len(held_by_tool) == before - 1  # the tool freed it too
    with BridgeClient(server.address, volume_probability="uint8") as client:
        client.open_volume("q", volume, spacing)
        got = client.segment_volume("q", *_prompt(0))
        assert np.abs(got.logits - expected[0].logits).max() <= 0.5 / 255 + 1e-6
    with BridgeClient(server.address) as client:  # default: masks only, like the 2D client
        client.open_volume("r", volume, spacing)
        assert client.segment_volume("r", *_prompt(0)).logits is None


def test_server_killed_mid_episode_is_replayed_with_the_same_masks():
    volume, _, spacing = ellipsoid_volume(5, SHAPE, SPACING)
    expected = _in_process(volume, spacing)
    port = free_port()
    first = ServerProcess(["--backend", "classical"], port)
    first.wait_ready()
    second = None
    try:
        with BridgeClient(first.address, deadline_s=60, max_attempts=8) as client:
            client.open_volume("k", volume, spacing)
            got = [client.segment_volume("k", *_prompt(k)) for k in range(2)]
            first.kill()  # SIGKILL: the episode and its steps are gone with the process
            second = ServerProcess(["--backend", "classical"], port)
            assert "volumes: classical-3d" in second.wait_ready()
            got += [client.segment_volume("k", *_prompt(k)) for k in range(2, len(CLICKS))]
            assert client.aio.replays == 2  # re-opened (volume re-sent) and both steps replayed
    finally:
        first.kill()
        if second is not None:
            second.kill()
    for g, want in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g.mask, want.mask)


def _stub(server):
    return pb_grpc.ToolBridgeStub(grpc.insecure_channel(server.address))


def _status(call):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def _message(volume, spacing=SPACING, compression=pb.COMPRESSION_NONE, data=None, shape=None):
    d, h, w = shape or volume.shape
    return pb.Volume(data=volume.tobytes() if data is None else data, depth=d, height=h, width=w,
                     spacing=list(spacing), compression=compression)


def test_bad_volumes_and_clicks_get_a_clear_status(server):
    volume, _, spacing = ellipsoid_volume(0, SHAPE, SPACING)
    stub = _stub(server)

    def open_(message, episode_id="bad"):
        return stub.OpenVolume(pb.OpenVolumeRequest(episode_id=episode_id, volume=message), timeout=10)

    cases = {
        "wrong byte count": (_message(volume, data=volume.tobytes()[:-7]), "expected depth*height*width"),
        "4D sent as 3D": (_message(np.repeat(volume[..., None], 2, axis=3), shape=SHAPE), "expected depth*height*width"),
        "too many voxels, refused from the header": (_message(volume, data=b"", shape=(64, 64, 65)), "voxels"),
        "side over the limit": (_message(volume, data=b"", shape=(2, 2, 300)), "--max-image-side"),
        "one slice": (_message(volume[:1]), "each must be 2.."),
        "bad spacing": (_message(volume, spacing=(1.0, 0.0, 1.0)), "spacing"),
        "two spacing values": (_message(volume, spacing=(1.0, 1.0)), "spacing"),
        "zlib bomb": (_message(volume, compression=pb.COMPRESSION_ZLIB,
                               data=zlib.compress(bytes(volume.size * 50))), "does not decode to exactly"),
        "not zlib": (_message(volume, compression=pb.COMPRESSION_ZLIB, data=b"garbage"), "not valid zlib"),
    }
    for name, (message, words) in cases.items():
        code, details = _status(lambda: open_(message))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, (name, details)

    # unknown episode, the wrong RPC for the episode's kind, clicks outside the volume
    clicks = pb.VolumeClicks(points=[1.0, 2.0, 3.0], labels=[1])
    code, details = _status(lambda: stub.VolumeStep(pb.VolumeStepRequest(episode_id="nobody", clicks=clicks)))
    assert code == grpc.StatusCode.NOT_FOUND and "not open here" in details
    open_(_message(volume), "vol")
    code, details = _status(lambda: stub.Step(pb.StepRequest(episode_id="vol", clicks=pb.Clicks(points=[1, 2], labels=[1]))))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "VolumeStep" in details
    outside = pb.VolumeClicks(points=[1.0, 2.0, 8.0], labels=[1])  # slice 8 of 8 slices
    code, details = _status(lambda: stub.VolumeStep(pb.VolumeStepRequest(episode_id="vol", clicks=outside)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside" in details
    code, details = _status(lambda: stub.VolumeStep(pb.VolumeStepRequest(
        episode_id="vol", clicks=pb.VolumeClicks(points=[1.0, 2.0], labels=[1]))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "x,y,z per label" in details
    # a step is idempotent; the same id cannot be re-opened with another volume
    first = stub.VolumeStep(pb.VolumeStepRequest(episode_id="vol", clicks=clicks))
    assert stub.VolumeStep(pb.VolumeStepRequest(episode_id="vol", clicks=clicks)) == first
    assert len(first.slices) == SHAPE[0]
    code, details = _status(lambda: open_(_message(volume[::-1].copy()), "vol"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    stub.CloseEpisode(pb.CloseEpisodeRequest(episode_id="vol"))

    # the client: one-line ToolErrors, before sending where it can tell
    with BridgeVolumeTool(server.address) as tool:
        with pytest.raises(ToolError, match=r"expected uint8 \[D, H, W\]"):
            tool.open("four", np.zeros((4, 8, 8, 2), np.uint8), spacing)
        with pytest.raises(ToolError, match="unknown episode"):
            tool.segment("never-opened", np.array([[1, 1, 1]], np.float32), np.array([1]))
        with pytest.raises(ToolError, match="INVALID_ARGUMENT.*voxels") as caught:
            tool.open("huge", np.zeros((80, 64, 64), np.uint8), spacing)
        assert "\n" not in str(caught.value)


def test_a_server_without_volumes_says_how_to_get_them():
    thread = ServerThread(ClassicalBackend(), ServerConfig(port=0))
    try:
        with BridgeVolumeTool(thread.address) as tool:
            with pytest.raises(ToolError, match="UNIMPLEMENTED.*--volume-backend"):
                tool.open("v", np.zeros((4, 8, 8), np.uint8), SPACING)
    finally:
        thread.stop()


def test_segment_volume_command_takes_a_bridge_address(server, tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    from ibis_jax.cli import main

    i, j, k = np.indices((20, 18, 12))
    target = (((i - 9) / 5.0) ** 2 + ((j - 8) / 4.0) ** 2 + ((k - 6) / 3.5) ** 2 <= 1.0).astype(np.uint8)
    values = (np.where(target, 200.0, 50.0) + np.random.default_rng(0).normal(0, 5, target.shape)).astype(np.float32)
    affine = np.diag([1.5, 1.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(values, affine), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(target, affine), str(tmp_path / "gt.nii.gz"))
    masks = {}
    for tool in ("classical", server.address):
        out = tmp_path / ("local" if tool == "classical" else "bridge")
        code = main(["segment", "--volume", str(tmp_path / "ct.nii.gz"), "--gt", str(tmp_path / "gt.nii.gz"),
                     "--model", "oracle", "--tool", tool, "--query", "Segment the blob.", "--out", str(out),
                     "--max-steps", "3", "--window", "minmax"])
        assert code == 0, capsys.readouterr().err
        image = nib.load(str(out / "mask.nii.gz"))
        assert image.shape == target.shape and np.allclose(image.affine, affine)
        masks[tool] = np.asarray(image.dataobj)
    np.testing.assert_array_equal(masks["classical"], masks[server.address])
    assert masks["classical"].any()


def test_volume_eval_takes_a_bridge_address(server, tmp_path, capsys):
    import json

    from ibis_jax.cli import main

    overall = {}
    for tool in ("classical", server.address):
        out = tmp_path / ("local" if tool == "classical" else "bridge")
        code = main(["eval", "--policy", "oracle", "--source", "volumes", "--volumes", "ellipsoids:1", "--tool", tool,
                     "--max-steps", "2", "--curve-clicks", "2", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        overall[tool] = json.loads((out / "metrics.json").read_text())["overall"]
    assert overall["classical"]["samples"] == 1 and overall["classical"]["mean_dice"] > 0.5
    def quality(metrics):  # everything but the timings
        return {k: v for k, v in metrics.items() if "seconds" not in k}

    assert quality(overall[server.address]) == quality(overall["classical"])
    assert len(quality(overall["classical"])) >= 10
