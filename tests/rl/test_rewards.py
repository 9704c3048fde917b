import numpy as np
import pytest

from ibis_jax.agent import Click, Episode, format_turn
from ibis_jax.agent.grammar import ActionParseError
from ibis_jax.rl.rewards import (
    RewardConfig,
    RewardContext,
    load_reward,
    score_episode,
)
from ibis_jax.tools.protocol import SegmentResult

H, W = 10, 10


def _mask(rows, cols):
    m = np.zeros((H, W), bool)
    m[rows, cols] = True
    return m


GT = _mask(slice(0, 5), slice(0, 10))  # top half: 50 px


def _episode():
    """Hand-built episode (masks chosen, not computed) with these IoUs against GT:
    M0 empty (0.0); t1 positive click in FN -> M1 rows 0-2 (30/50 = 0.6);
    t2 negative click in FN (wrong: not FP) -> M2 rows 0-3 (40/50 = 0.8);
    t3 negative click in FP -> M3 rows 0-5 (50/60 = 0.8333); t4 terminate with answer."""
    ep = Episode(np.zeros((H, W, 3), np.uint8), "Segment the top.", GT)
    masks = [_mask(slice(0, 3), slice(None)), _mask(slice(0, 4), slice(None)), _mask(slice(0, 6), slice(None))]
    clicks = [Click(0.05, 0.05, True), Click(0.05, 0.45, False), Click(0.95, 0.55, False)]
    ep.apply_click(clicks[0], SegmentResult(masks[0], None, 0.9), reasoning="a")
    ep.apply_click(clicks[1], SegmentResult(masks[1], None, 0.9), reasoning="b", text="<action>Negative Point (0.05, 0.45)</action>")
    # click 3 lands at row 5 (FP of M2? M2 covers rows 0-3, so row 5 is not covered): -1
    ep.apply_click(clicks[2], SegmentResult(masks[2], None, 0.9), reasoning="c")
    ep.terminate(reasoning="fits", answer="The top half.")
    return ep


def test_each_paper_reward_hand_computed():
    ep = _episode()
    score = score_episode(ep)
    c = score.components
    assert c["format"].tolist() == [1, 0, 1, 1]  # turn 2's text is lenient-only
    assert c["answer"].tolist() == [1, 2, 3, 3]  # IoU 0.6 -> 1, 0.8 -> 2 (not > 0.8), 0.833 -> 3, 0.833 -> 3
    assert c["click"].tolist() == [1, -1, -1, 0]
    assert c["pseg"].tolist() == [1, 1, 1, 0]
    assert c["length"].tolist() == [1, 1, 1, 1]
    per_step = (np.array([1, 0, 1, 1]) + [1, 2, 3, 3] + [1, -1, -1, 0] + [1, 1, 1, 0] + [1, 1, 1, 1]) / 5
    assert score.per_step == pytest.approx(per_step)
    assert score.score == pytest.approx(per_step.mean())


def test_negative_click_in_fp_is_rewarded_and_length_penalty():
    ep = Episode(np.zeros((H, W, 3), np.uint8), "q", GT)
    big = _mask(slice(0, 8), slice(None))
    ep.apply_click(Click(0.5, 0.2, True), SegmentResult(big, None, 1.0))
    for _ in range(6):  # negative clicks on row 7, which M_{t-1} covers and GT does not
        ep.apply_click(Click(0.5 + 0.01 * len(ep.steps), 0.75, False), SegmentResult(big, None, 1.0))
    score = score_episode(ep, context=RewardContext(RewardConfig(t_opt=5)))
    assert score.components["click"].tolist() == [1] + [1] * 6
    assert score.components["length"] == pytest.approx([1, 1, 1, 1, 1, -0.2, -0.4])
    assert score.components["pseg"].tolist() == [1, 0, 0, 0, 0, 0, 0]


def test_pseg_drop_penalty_option_and_weights():
    ep = Episode(np.zeros((H, W, 3), np.uint8), "q", GT)
    ep.apply_click(Click(0.5, 0.2, True), SegmentResult(GT, None, 1.0))
    ep.apply_click(Click(0.5, 0.3, True), SegmentResult(_mask(slice(0, 2), slice(None)), None, 1.0))
    ctx = RewardContext(RewardConfig(pseg_drop_penalty=1.0, weights={"pseg": 2.0, "answer": 0.0}))
    score = score_episode(ep, ["pseg", "answer"], ctx)
    assert score.components["pseg"].tolist() == [1, -1]
    assert score.per_step.tolist() == [1, -1]  # answer has weight 0


def test_step_mode_reproduces_released_single_step_scoring():
    ep = _episode()
    step = score_episode(ep, context=RewardContext(RewardConfig(mode="step")))
    # previous IoU never passed (taken as 0): any click with IoU > 0 is progress; a terminate makes
    # no new mask and gets 0.
    assert step.components["pseg"].tolist() == [1, 1, 1, 0]
    # the previous mask is the previous clicks' mask, as multi-turn: same click scores here.
    assert step.components["click"].tolist() == [1, -1, -1, 0]
    assert step.components["length"].tolist() == [1, 1, 1, 1]
    assert step.components["answer"].tolist() == [1, 2, 3, 3]


def test_step_mode_negative_click_in_fp_of_the_previous_clicks_mask():
    """The released step reward rebuilds M_{t-1} from the previous clicks: a negative click on a
    pixel the previous clicks' mask wrongly covers is +1 (an all-empty M_{t-1} would make it -1)."""
    ep = Episode(np.zeros((H, W, 3), np.uint8), "q", GT)
    big = _mask(slice(0, 8), slice(None))  # IoU 50/80 = 0.625
    ep.apply_click(Click(0.5, 0.2, True), SegmentResult(big, None, 1.0))
    for _ in range(6):
        ep.apply_click(Click(0.5 + 0.01 * len(ep.steps), 0.75, False), SegmentResult(big, None, 1.0))
    step = score_episode(ep, context=RewardContext(RewardConfig(mode="step")))
    assert step.components["click"].tolist() == [1] * 7
    assert step.components["pseg"].tolist() == [1] * 7  # IoU 0.625 > 0 every time
    assert step.components["length"].tolist() == [1] * 7
    assert step.components["answer"].tolist() == [1] * 7


def _good_then(bad_turn: str):
    """A click to IoU 50/55 = 0.909 (S_ans 3), then a second turn: 'garbage' or 'terminate'."""
    ep = Episode(np.zeros((H, W, 3), np.uint8), "q", GT)
    near = _mask(slice(0, 5), slice(None)) | _mask(5, slice(0, 5))
    ep.apply_click(Click(0.5, 0.2, True), SegmentResult(near, None, 1.0))
    if bad_turn == "garbage":
        ep.record_parse_failure("<think>the mask", ActionParseError("no_action", "x"))
    else:
        ep.terminate(reasoning="fits", answer="the top")
    return ep


def test_unparsed_turn_gets_no_answer_or_progress_credit():
    garbage = score_episode(_good_then("garbage"))
    c = garbage.components
    assert c["answer"].tolist() == [3, 0] and c["pseg"].tolist() == [1, 0]
    assert c["click"].tolist() == [1, -1] and c["format"].tolist() == [1, 0] and c["length"].tolist() == [1, 1]
    term = score_episode(_good_then("terminate"))
    assert term.components["answer"].tolist() == [3, 3] and term.components["click"].tolist() == [1, 0]
    # last turn: garbage (0 + 0 - 1 + 0 + 1) / 5 = 0 < terminate (1 + 3 + 0 + 0 + 1) / 5 = 1
    assert garbage.per_step[1] == pytest.approx(0.0) and term.per_step[1] == pytest.approx(1.0)
    assert garbage.score < term.score
    # the step mode too: no S_pseg 1 for a turn that made no mask
    step = score_episode(_good_then("garbage"), context=RewardContext(RewardConfig(mode="step")))
    assert step.components["pseg"].tolist() == [1, 0] and step.components["answer"].tolist() == [3, 0]


def test_truncated_turn_is_scored_as_unparsed_even_when_its_click_parsed():
    ep = _episode()  # 4 turns; pretend the sampler cut turn 1 (a right click that parsed) at max tokens
    ctx = RewardContext(stop_reasons=("max_tokens", "eos", "eos", "eos"))
    s = score_episode(ep, context=ctx)
    assert s.components["answer"].tolist() == [0, 2, 3, 3]
    assert s.components["pseg"].tolist() == [0, 1, 1, 0]
    assert s.components["click"].tolist() == [-1, -1, -1, 0]
    assert s.components["length"].tolist() == [1, 1, 1, 1]
    assert s.components["format"].tolist() == [1, 0, 1, 1]  # the strict check reads the text as now
    # a truncated terminate: no answer credit either
    cut_end = score_episode(ep, context=RewardContext(stop_reasons=("eos", "eos", "eos", "max_tokens")))
    assert cut_end.components["answer"].tolist() == [1, 2, 3, 0] and cut_end.components["click"][3] == -1


def test_vqa_exact_match_and_parse_failure():
    ep = Episode(np.zeros((H, W, 3), np.uint8), "Is there a tumor?")
    ep.terminate(reasoning="none seen", answer="No.")
    ctx = RewardContext(vqa_answer="no")
    assert score_episode(ep, ["answer", "format"], ctx).components["answer"].tolist() == [1]
    bad = Episode(np.zeros((H, W, 3), np.uint8), "q", GT)
    bad.record_parse_failure("garbage", ActionParseError("no_action", "x"))
    s = score_episode(bad)
    assert s.components["format"].tolist() == [0] and s.components["click"].tolist() == [-1]
    # (format 0 + answer 0 + click -1 + pseg 0 + length 1) / 5: below a wrong click's 0.2
    assert s.score == pytest.approx(0.0)
    lenient = score_episode(bad, context=RewardContext(RewardConfig(unparsed_click=0.0)))
    assert lenient.components["click"].tolist() == [0] and lenient.score == pytest.approx(0.2)


def test_user_reward_from_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("import numpy as np\n\ndef shape_bonus(episode, context):\n"
                    "    return np.full(len(episode.steps), 0.5)\n")
    name, fn = load_reward(f"{path}:shape_bonus")
    assert name == "shape_bonus"
    ep = _episode()
    score = score_episode(ep, {"shape_bonus": fn, **{"format": load_reward("format")[1]}})
    assert score.components["shape_bonus"].tolist() == [0.5] * 4
    with pytest.raises(AttributeError, match="no callable"):
        load_reward(f"{path}:missing")
    with pytest.raises(ValueError, match="file.py:function"):
        load_reward("nonsense")


def test_canonical_text_passes_format():
    assert score_episode(_episode(), ["format"]).components["format"][0] == 1
    assert format_turn("a", Click(0.05, 0.05, True)).startswith("<think>")


def test_docs_example_reward_loads_by_path_and_pays_the_first_click_on_target():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / "my_rewards.py"
    name, fn = load_reward(f"{path}:first_click_bonus")
    s = score_episode(_episode(), {"first_click_bonus": fn, "format": load_reward("format")[1]})
    assert name == "first_click_bonus" and s.components["first_click_bonus"].tolist() == [1, 0, 0, 0]
    miss = Episode(np.zeros((H, W, 3), np.uint8), "q", GT)
    miss.apply_click(Click(0.5, 0.9, True), SegmentResult(_mask(9, slice(None)), None, 1.0))  # row 9: off target
    assert score_episode(miss, {"b": fn}).components["b"].tolist() == [0]


def test_click_reward_reads_the_clicked_voxel_of_a_volume():
    from ibis_jax.agent.grammar import SliceClick
    from ibis_jax.agent.volume import VolumeEpisode
    from ibis_jax.rl.rewards import click_reward
    from ibis_jax.tools.volume import VolumeSegmentResult

    class Empty:  # the mask never grows: every positive click on the target stays right
        def segment(self, episode_id, points, labels, prev_logits):
            return VolumeSegmentResult(np.zeros((8, 10, 12), bool), None, 1.0)

    gt = np.zeros((8, 10, 12), bool)
    gt[5, 2:6, 3:9] = True  # on slice 5 only
    ep = VolumeEpisode(np.zeros((8, 10, 12), np.uint8), (1.0, 1.0, 1.0), "q", gt, start_slice=5)
    ep.step(SliceClick.from_voxel(5, 3, 4, 8, 10, 12, True), Empty())  # in the target, on its slice: right
    ep.step(SliceClick.from_voxel(2, 3, 4, 8, 10, 12, True), Empty())  # same row/col, another slice: wrong
    ep.step(Click(0.375, 0.35, True), Empty())  # a 2D click means the slice on view (5): right
    np.testing.assert_array_equal(click_reward(ep, RewardContext()), [1.0, -1.0, 1.0])
