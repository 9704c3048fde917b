"""MedSAM2 in 3D through sam2's video predictor, random weights on CPU (slow: one encode per frame)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from ibis_jax.agent.loop import run_agent  # noqa: E402
from ibis_jax.agent.oracle import OraclePolicy  # noqa: E402
from ibis_jax.agent.volume import VolumeEpisode, VolumeEpisodeConfig  # noqa: E402
from ibis_jax.data.volumes import ellipsoid_volume  # noqa: E402
from tool_bridge.backends.medsam2_video import MedSAM2VolumeTool, volume_frames  # noqa: E402


def test_frames_are_normalised_rgb_at_the_model_side():
    frames = volume_frames(np.full((3, 10, 14), 255, np.uint8), 32)
    assert tuple(frames.shape) == (3, 3, 32, 32)
    assert frames[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


@pytest.mark.slow
def test_medsam2_video_tool_runs_an_episode_with_random_weights(checkpoint):
    tool = MedSAM2VolumeTool(checkpoint, device="cpu")
    assert tool.side == 512
    volume, gt, spacing = ellipsoid_volume(0, (3, 24, 24), (3.0, 1.0, 1.0))
    episode = VolumeEpisode(volume, spacing, "Segment the ellipsoid.", gt, config=VolumeEpisodeConfig(max_actions=2))
    run_agent(OraclePolicy(max_clicks=1), tool, [episode])
    assert len(episode.clicks) == 1 and episode.done
    assert episode.current_mask.shape == gt.shape and episode.current_mask.dtype == bool
    # the replay is a function of the clicks: the same request twice gives the same mask
    tool.open("again", volume, spacing)
    points = np.array([[12, 12, 0], [5, 5, 2]], np.float32)  # prompted first and last: both passes
    first = tool.segment("again", points, np.array([1, 0]), None)
    second = tool.segment("again", points, np.array([1, 0]), first.logits)
    np.testing.assert_array_equal(first.mask, second.mask)
    assert len(tool._states["again"][0]["ibis_all_features"]) == 3  # every frame encoded once, kept
