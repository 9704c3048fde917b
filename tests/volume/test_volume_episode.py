"""The volume episode with a cheap fake tool, the oracle policies, and the classical 3D tool."""

import numpy as np
import pytest

from ibis_jax.agent.grammar import Click, SliceClick, Terminate, format_turn
from ibis_jax.agent.loop import PolicyTurn, run_agent
from ibis_jax.agent.oracle import OraclePolicy
from ibis_jax.agent.volume import VOLUME_PROMPT_NOTE, VolumeEpisode, VolumeEpisodeConfig
from ibis_jax.data.volumes import ellipsoid_volume
from ibis_jax.tools.volume import ClassicalVolumeTool, VolumeSegmentResult


class BallTool:
    """Mask = union of balls of radius 3 voxels around positive clicks minus balls around negative ones."""

    def __init__(self):
        self.opened, self.calls = {}, []

    def open(self, episode_id, volume, spacing):
        self.opened[episode_id] = volume.shape

    def close(self, episode_id):
        self.opened.pop(episode_id, None)

    def segment(self, episode_id, points, labels, prev_logits):
        shape = self.opened[episode_id]
        self.calls.append(np.array(points))
        zz, yy, xx = np.indices(shape)
        mask = np.zeros(shape, bool)
        for (x, y, z), label in zip(points, labels):
            ball = (zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= 9
            mask = mask | ball if label == 1 else mask & ~ball
        return VolumeSegmentResult(mask, mask.astype(np.float32), 1.0)


def _cube_episode(**kw):
    volume = np.zeros((16, 12, 10), np.uint8)
    gt = np.zeros(volume.shape, bool)
    gt[2:6, 3:9, 2:8] = True
    return VolumeEpisode(volume, (2.0, 1.0, 1.0), "Segment the cube.", gt, **kw)


def test_observation_is_the_slice_on_view_with_the_mask_cross_section():
    ep = _cube_episode(initial_mask=None, start_slice=4)
    assert ep.slice_text() == "Slice 5 of 16 (z = 0.2812)."
    assert "Slice 5 of 16" in ep.user_text() and "Segment the cube." in ep.user_text()
    tool = BallTool()
    tool.open(ep.episode_id, ep.volume, ep.spacing)
    ep.step(SliceClick.from_voxel(4, 6, 5, 16, 12, 10, True), tool)
    obs = ep.observation()
    assert obs.shape == (12, 10, 3)
    assert (obs[..., 1] > 0).sum() == ep.current_mask[ep.current_slice].sum()


def test_click_points_in_voxels_and_a_2d_click_means_the_slice_on_view():
    ep = _cube_episode(start_slice=3)
    tool = BallTool()
    tool.open(ep.episode_id, ep.volume, ep.spacing)
    ep.step_text(format_turn("go", SliceClick.from_voxel(3, 5, 4, 16, 12, 10, True)), tool)
    np.testing.assert_array_equal(tool.calls[-1], [[4, 5, 3]])  # (x=col, y=row, z=slice)
    on_view = ep.current_slice
    ep.step_text(format_turn("2d", Click(0.05, 0.0417, False)), tool)
    assert ep.clicks[-1].voxel(16, 12, 10) == (on_view, 0, 0)
    np.testing.assert_array_equal(tool.calls[-1][-1], [0, 0, on_view])


def test_changed_rule_moves_to_the_slice_that_changed_most():
    ep = _cube_episode(start_slice=8, config=VolumeEpisodeConfig(slice_rule="changed"))
    tool = BallTool()
    tool.open(ep.episode_id, ep.volume, ep.spacing)
    ep.step(SliceClick.from_voxel(3, 6, 5, 16, 12, 10, True), tool)  # ball centred on slice 3
    assert ep.steps[-1].slice == 8 and ep.current_slice == 3
    stay = _cube_episode(start_slice=8, config=VolumeEpisodeConfig(slice_rule="stay"))
    tool.open(stay.episode_id, stay.volume, stay.spacing)
    stay.step(SliceClick.from_voxel(3, 6, 5, 16, 12, 10, True), tool)
    assert stay.current_slice == 8
    with pytest.raises(ValueError, match="slice_rule"):
        VolumeEpisodeConfig(slice_rule="random")


def test_termination_rules_as_in_2d():
    tool = BallTool()
    ep = _cube_episode()
    tool.open(ep.episode_id, ep.volume, ep.spacing)
    click = SliceClick(0.5, 0.5, 0.25, True)
    for _ in range(3):
        ep.step(click, tool)
    assert ep.end_reason == "repeated_action"
    ep = _cube_episode()
    ep.step_text("no action here", tool)
    assert ep.end_reason == "parse_error" and ep.steps[-1].parse_error == "no_action"
    ep = _cube_episode(config=VolumeEpisodeConfig(max_actions=2))
    tool.open(ep.episode_id, ep.volume, ep.spacing)
    ep.step(SliceClick(0.5, 0.5, 0.25, True), tool)
    ep.step(SliceClick(0.4, 0.5, 0.25, True), tool)
    assert ep.end_reason == "max_actions"
    ep = _cube_episode()
    ep.step(Terminate(), tool, answer="a cube")
    assert ep.end_reason == "terminate" and ep.steps[-1].answer == "a cube"


def test_oracle_3d_with_ball_tool_reaches_the_cube():
    ep = _cube_episode(config=VolumeEpisodeConfig(max_actions=12))
    tool = BallTool()
    run_agent(OraclePolicy(stop_dice=0.99, max_clicks=10), tool, [ep])
    assert ep.done and not tool.opened  # closed
    # the first click is the cube's deepest voxel in mm: slices are 2 mm, so depth is limited by
    # rows/cols; the first arg-max in C order
    first = ep.clicks[0].voxel(16, 12, 10)
    assert first[0] in (3, 4) and ep.click_dice_curve[0] > 0
    assert ep.steps[0].slice == 8  # the middle of 16 slices is on view first
    assert len(ep.clicks) == 10 and ep.end_reason == "terminate"  # the ball tool cannot reach 0.99: budget spent


class ScriptedReader:
    """A message-reading policy: clicks the cube's centre, then terminates; keeps what it saw."""

    def __init__(self):
        self.seen = []

    def generate(self, requests):
        self.seen.append([r.messages for r in requests])
        texts = [format_turn("c", SliceClick.from_voxel(3, 6, 5, 16, 12, 10, True)) if not r.episode.steps
                 else format_turn("done", Terminate(), "a cube") for r in requests]
        return [PolicyTurn(t) for t in texts]


@pytest.mark.parametrize("history", ["none", "full"])
def test_the_shared_loop_shows_a_reading_policy_the_slice_and_the_volume_note(history):
    ep = _cube_episode(start_slice=8)
    policy = ScriptedReader()
    run_agent(policy, BallTool(), [ep], history=history)
    assert [s.slice for s in ep.steps] == [8, 3]  # the click moved the view to the slice it changed
    first, second = policy.seen[0][0], policy.seen[1][0]
    assert first[0].role == "system" and first[0].text.endswith(VOLUME_PROMPT_NOTE)
    assert first[-1].text.endswith("Slice 9 of 16 (z = 0.5312).")
    assert second[-1].text.endswith("Slice 4 of 16 (z = 0.2188).")
    assert second[-1].image.shape == (12, 10, 3)
    if history == "full":  # earlier user turns keep the slice they were written on
        assert second[1].text.endswith("Slice 9 of 16 (z = 0.5312).") and second[2].role == "assistant"


def test_2d_episode_rejects_a_slice_click():
    from ibis_jax.agent.episode import Episode

    ep = Episode(np.zeros((8, 8, 3), np.uint8), "q", np.ones((8, 8), bool))
    ep.step_text(format_turn("x", SliceClick(0.5, 0.5, 0.5, True)), tool=None)
    assert ep.end_reason == "parse_error" and ep.steps[-1].parse_error == "bad_action"


def _oracle_dice(seeds, shape, clicker="3d", rule="changed", max_clicks=5):
    tool = ClassicalVolumeTool()
    episodes = []
    for seed in seeds:
        volume, gt, spacing = ellipsoid_volume(seed, shape, (2.0, 1.0, 1.0) if seed % 2 else (1.0, 1.0, 1.0))
        episodes.append(VolumeEpisode(volume, spacing, "Segment the ellipsoid.", gt,
                                      config=VolumeEpisodeConfig(max_actions=max_clicks + 1, slice_rule=rule)))
    run_agent(OraclePolicy(max_clicks=max_clicks, volume_clicker=clicker), tool, episodes)
    return [e.dices[-1] for e in episodes], episodes


def test_classical_3d_tool_oracle_small_ellipsoids():
    dices, episodes = _oracle_dice([0, 1], (20, 20, 20), max_clicks=3)
    assert np.mean(dices) >= 0.85, dices
    assert all(e.surface_dice(2.0) > 0.8 for e in episodes)


@pytest.mark.slow
def test_done_when_ellipsoids_dice_085_within_5_clicks():
    dices, _ = _oracle_dice(range(8), (32, 32, 32), max_clicks=5)
    assert np.mean(dices) >= 0.85, dices


def test_random_walk_3d_with_prior_claims_the_seeded_intensity_everywhere():
    from ibis_jax.tools.volume import random_walk_3d

    # two bright slabs separated by a dark one: no path of bright voxels joins them, yet the
    # intensity prior claims both from one seed; without the prior the far slab stays background
    data = np.zeros((9, 6, 6))
    data[1:3] = data[6:8] = 0.8
    seeds = np.zeros(data.shape, np.int32)
    seeds[0], seeds[-1], seeds[4] = 2, 2, 2
    seeds[1, 3, 3] = 1
    prior = (data > 0.5).astype(float)
    with_prior = random_walk_3d(data, seeds, (1, 1, 1), prior=prior, prior_weight=0.1)
    plain = random_walk_3d(data, seeds, (1, 1, 1))
    assert with_prior[6:8].min() > 0.5 and plain[6:8].max() < 0.5
    assert with_prior[1:3].min() > 0.5 and plain[2].min() > 0.5
