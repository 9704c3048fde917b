import numpy as np
import pytest

from ibis_jax.agent import Click, Episode, EpisodeConfig, Terminate, render_overlay
from ibis_jax.agent.oracle import PLAIN_DONE, run_oracle
from ibis_jax.data.images import ImageError
from ibis_jax.tools.protocol import SegmentResult, ToolError, tool_session


class RecordingDiskTool:
    """Deterministic tool for state-machine tests: disks of radius 3 around positive clicks minus
    disks around negative ones. Records every call so the tests can check what was sent."""

    def __init__(self):
        self.calls = []
        self.open_ids = set()

    def open(self, episode_id, image):
        self.open_ids.add(episode_id)
        self.shape = image.shape[:2]

    def segment(self, episode_id, points, labels, prev_logits):
        if episode_id not in self.open_ids:
            raise ToolError("not open")
        self.calls.append((points.copy(), labels.copy(), prev_logits))
        yy, xx = np.mgrid[: self.shape[0], : self.shape[1]]
        mask = np.zeros(self.shape, bool)
        for (x, y), label in zip(points, labels):
            disk = (xx - x) ** 2 + (yy - y) ** 2 <= 9
            mask = (mask | disk) if label == 1 else (mask & ~disk)
        return SegmentResult(mask, np.full(1, len(self.calls), np.float32), 0.5)

    def close(self, episode_id):
        self.open_ids.discard(episode_id)


@pytest.fixture
def scene():
    image = np.zeros((20, 30, 3), np.uint8)
    gt = np.zeros((20, 30), bool)
    gt[5:12, 5:12] = True
    return image, gt


def test_click_sends_all_clicks_and_previous_logits(scene):
    image, gt = scene
    tool = RecordingDiskTool()
    ep = Episode(image, "Segment the square", gt)
    with tool_session(tool, ep.episode_id, image):
        s1 = ep.step(Click(0.25, 0.4, True), tool)
        s2 = ep.step(Click(0.5, 0.5, False), tool)
    (p1, l1, prev1), (p2, l2, prev2) = tool.calls
    assert p1.tolist() == [[7, 8]] and l1.tolist() == [1] and prev1 is None
    assert p2.tolist() == [[7, 8], [15, 10]] and l2.tolist() == [1, 0]
    assert prev2.tolist() == [1.0]  # the logits returned by step 1 come back
    assert s1.prev_iou == 0.0 and s1.iou > 0.0
    assert s2.prev_iou == s1.iou and np.array_equal(s2.prev_mask, s1.mask)
    assert ep.ious == [0.0, s1.iou, s2.iou]
    assert ep.click_iou_curve == [s1.iou, s2.iou]
    assert not ep.done and tool.open_ids == set()


def test_terminate_ends_and_keeps_mask(scene):
    image, gt = scene
    tool = RecordingDiskTool()
    ep = Episode(image, "q", gt)
    with tool_session(tool, ep.episode_id, image):
        ep.step(Click(0.25, 0.4, True), tool)
        last = ep.step(Terminate(), tool, answer="done")
    assert ep.end_reason == "terminate" and last.answer == "done"
    assert np.array_equal(last.mask, last.prev_mask)
    with pytest.raises(RuntimeError, match="already ended"):
        ep.step(Click(0.1, 0.1, True), tool)


def test_same_action_three_times_ends_episode(scene):
    image, gt = scene
    tool = RecordingDiskTool()
    ep = Episode(image, "q", gt)
    with tool_session(tool, ep.episode_id, image):
        for _ in range(2):
            ep.step(Click(0.3, 0.3, True), tool)
            assert not ep.done
        ep.step(Click(0.30001, 0.3, True), tool)  # same action after 4-decimal rounding
    assert ep.end_reason == "repeated_action" and len(ep.steps) == 3


def test_alternating_actions_do_not_count_as_repeats(scene):
    image, gt = scene
    tool = RecordingDiskTool()
    ep = Episode(image, "q", gt, config=EpisodeConfig(max_actions=6))
    with tool_session(tool, ep.episode_id, image):
        while not ep.done:
            ep.step(Click(0.3, 0.3, len(ep.steps) % 2 == 0), tool)
    assert ep.end_reason == "max_actions" and len(ep.steps) == 6


def test_unparseable_turn_ends_episode_without_tool_call(scene):
    image, gt = scene
    tool = RecordingDiskTool()
    ep = Episode(image, "q", gt)
    with tool_session(tool, ep.episode_id, image):
        step = ep.step_text("I think I will click somewhere nice.", tool)
    assert ep.end_reason == "parse_error" and step.parse_error == "no_action"
    assert step.action is None and tool.calls == []


def test_step_text_applies_a_valid_turn(scene):
    image, gt = scene
    tool = RecordingDiskTool()
    ep = Episode(image, "q", gt)
    text = "<think>\nmissing square\n</think>\n<action>\nPositive Point (0.2833, 0.4250)\n</action>"
    with tool_session(tool, ep.episode_id, image):
        step = ep.step_text(text, tool)
    assert step.text == text and step.reasoning == "missing square"
    assert tool.calls[0][0].tolist() == [[8, 8]]


def test_observation_is_overlay_on_original_image(scene):
    image, gt = scene
    tool = RecordingDiskTool()
    ep = Episode(image, "q", gt)
    assert np.array_equal(ep.observation((255, 0, 0), 0.4), image)
    with tool_session(tool, ep.episode_id, image):
        ep.step(Click(0.25, 0.4, True), tool)
        ep.step(Click(0.26, 0.4, True), tool)
    obs = ep.observation((255, 0, 0), 0.4)
    assert np.array_equal(obs, render_overlay(image, ep.current_mask, (255, 0, 0), 0.4))
    assert obs[8, 7].tolist() == [102, 0, 0]  # 0.4 * 255, blended once, never accumulated


def test_episode_input_validation(scene):
    image, gt = scene
    with pytest.raises(ToolError, match="uint8"):
        Episode(image.astype(np.float32), "q", gt)
    with pytest.raises(ImageError, match="differs from image shape"):
        Episode(image, "q", gt[:10])
    with pytest.raises(ImageError, match="not binary"):
        Episode(image, "q", gt.astype(np.uint8) * 3)
    ep = Episode(image, "q")  # no ground truth: allowed, but no IoU
    with pytest.raises(ValueError, match="no ground-truth"):
        ep.ious
    with pytest.raises(ValueError):
        Click(float("nan"), 0.5, True)


def test_empty_ground_truth_is_refused_by_the_oracle(scene):
    image, gt = scene
    with pytest.raises(ImageError, match="empty"):
        run_oracle(RecordingDiskTool(), image, np.zeros_like(gt))


def test_all_foreground_ground_truth_runs(scene):
    image, _ = scene
    full = np.ones(image.shape[:2], bool)
    ep = run_oracle(RecordingDiskTool(), image, full, max_clicks=3)
    first = ep.steps[0].action
    # Border as boundary: distance min(row+1, 20-row, col+1, 30-col) peaks at 10; first is (9, 9).
    assert first.positive and first.pixel(30, 20) == (9, 9)


def test_oracle_with_terminate_and_stop_iou(scene):
    image, gt = scene
    tool = RecordingDiskTool()
    ep = run_oracle(tool, image, gt, max_clicks=20, stop_iou=0.3)
    assert ep.end_reason == "terminate" and ep.steps[-1].answer == PLAIN_DONE[1]
    assert ep.steps[-2].iou >= 0.3 and all(s.iou < 0.3 for s in ep.steps[:-2])
    assert tool.open_ids == set()  # closed
