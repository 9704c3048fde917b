"""MedSAM2 in 3D (sam2's video predictor, random weights, CPU) through the bridge over loopback
gRPC: the agent loop gets the in-process tool's masks, and a server that lost the episode is
replayed to the same masks."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from bridge_helpers import THREADS  # noqa: E402
from ibis_jax.agent.loop import run_agent  # noqa: E402
from ibis_jax.agent.oracle import OraclePolicy  # noqa: E402
from ibis_jax.agent.volume import VolumeEpisode, VolumeEpisodeConfig  # noqa: E402
from ibis_jax.data.volumes import ellipsoid_volume  # noqa: E402
from tool_bridge.backends.classical import ClassicalBackend  # noqa: E402
from tool_bridge.backends.medsam2_video import MedSAM2VolumeTool  # noqa: E402
from tool_bridge.backends.volume import make_volume_backend  # noqa: E402
from tool_bridge.client import BridgeVolumeTool  # noqa: E402
from tool_bridge.server import ServerConfig, ServerThread  # noqa: E402

SHAPE = (4, 32, 32)  # every slice is resized to 512 px: the frame count is the cost
SPACING = (2.0, 1.0, 1.0)


@pytest.mark.slow
def test_medsam2_3d_through_the_bridge_equals_in_process(checkpoint):
    torch.set_num_threads(THREADS)
    volume, gt, spacing = ellipsoid_volume(2, SHAPE, SPACING)

    def episode():
        return VolumeEpisode(volume, spacing, "Segment the ellipsoid.", gt, episode_id="m",
                             config=VolumeEpisodeConfig(max_actions=3))

    local, local_tool = episode(), MedSAM2VolumeTool(checkpoint, device="cpu")
    run_agent(OraclePolicy(max_clicks=2, volume_clicker="3d"), local_tool, [local])

    backend = make_volume_backend("medsam2", checkpoint=checkpoint, device="cpu")
    assert backend.name == "medsam2-3d" and len(backend.checkpoint_sha256) == 64
    thread = ServerThread(ClassicalBackend(), ServerConfig(port=0, max_image_side=64), backend)
    port = thread.address.rsplit(":", 1)[1]
    try:
        with BridgeVolumeTool(thread.address, deadline_s=120) as tool:
            assert tool.client.info().volume_backend == "medsam2-3d"
            remote = episode()
            run_agent(OraclePolicy(max_clicks=2, volume_clicker="3d"), tool, [remote])
            assert len(remote.clicks) == len(local.clicks) == 2
            for a, b in zip(local.steps, remote.steps, strict=True):
                np.testing.assert_array_equal(a.mask, b.mask)
                assert a.slice == b.slice

            # the server loses the episode (restart on the same port): re-open, replay, same masks
            tool.open("again", volume, spacing)
            points = np.array([[15, 16, 1], [6, 5, 3]], np.float32)
            labels = np.array([1, 0], np.int32)
            first = tool.segment("again", points[:1], labels[:1])
            assert tool.client.info().cache_bytes > SHAPE[0] * 3 * 512 * 512 * 4  # frames + features held
            thread.stop()
            thread = ServerThread(ClassicalBackend(), ServerConfig(port=int(port), max_image_side=64), backend)
            second = tool.segment("again", points, labels)
            assert tool.client.aio.replays == 1
            local_tool.open("ref", volume, spacing)
            np.testing.assert_array_equal(first.mask, local_tool.segment("ref", points[:1], labels[:1], None).mask)
            np.testing.assert_array_equal(second.mask, local_tool.segment("ref", points, labels, None).mask)
            assert first.mask.any() and remote.steps[0].mask.any()  # not an empty answer compared with an empty one
    finally:
        thread.stop()
