"""The slice-click text form: strict and lenient parsing, round trips, fuzzing."""

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ibis_jax.agent.grammar import ActionParseError, Click, SliceClick, Terminate, format_action, format_turn, parse_turn

TURN = "<think>\nThe mask misses the upper pole.\n</think>\n<action>\nPositive Point (0.4512, 0.4238, 0.5156)\n</action>"


def test_slice_click_parses_in_both_modes():
    for strict in (False, True):
        turn = parse_turn(TURN, strict=strict)
        assert turn.action == SliceClick(0.4512, 0.4238, 0.5156, True)
        assert turn.reasoning == "The mask misses the upper pole."


def test_format_round_trip_and_voxel():
    click = SliceClick.from_voxel(16, 3, 30, 32, 40, 48, False)
    assert format_action(click) == "Negative Point (0.6354, 0.0875, 0.5156)"
    assert parse_turn(format_turn("why", click), strict=True).action == click
    assert click.voxel(32, 40, 48) == (16, 3, 30)
    for depth in (1, 2, 7, 97, 5_000):
        for k in (0, depth // 2, depth - 1):
            assert SliceClick.from_voxel(k, 0, 0, depth, 5, 5, True).voxel(depth, 5, 5)[0] == k


def test_lenient_forms():
    for content in ("positive point(0.5,0.25,1)", "  Negative  Point: ( .5 , 0.25 , 0 ) .", "POSITIVE POINT (0.5, 0.25, 0.999)"):
        action = parse_turn(f"<action>{content}</action>").action
        assert isinstance(action, SliceClick) and action.y == 0.25


def test_strict_rejects_lenient_spelling_and_out_of_range():
    with pytest.raises(ActionParseError) as e:
        parse_turn(TURN.replace("Point (", "point("), strict=True)
    assert e.value.reason == "bad_action"
    with pytest.raises(ActionParseError) as e:
        parse_turn(TURN.replace("0.5156", "1.5156"))
    assert e.value.reason == "out_of_range"
    with pytest.raises(ActionParseError):
        parse_turn(TURN.replace("0.5156)", "0.5156, 0.1)"))  # four coordinates
    with pytest.raises(ValueError):
        SliceClick(0.5, 0.5, float("nan"), True)


def test_2d_forms_unchanged():
    turn = parse_turn(TURN.replace(", 0.5156", ""), strict=True)
    assert turn.action == Click(0.4512, 0.4238, True)


_fragments = st.sampled_from(
    ["<think>", "</think>", "<action>", "</action>", "<answer>", "</answer>", "\n", " ", "Positive Point",
     "Negative Point", "(", ")", ",", ", ", "0.5", "1", "1e999", "-0", "nan", "Terminate", ":", "\\u0000"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_fragments, max_size=18).map("".join))
@example("Positive Point (0.5, 0.5, 1)\n</action>")
def test_slice_shaped_noise_never_escapes_and_strict_agrees_with_lenient(text):
    for strict in (False, True):
        try:
            turn = parse_turn(text, strict=strict)
        except ActionParseError:
            continue
        if isinstance(turn.action, SliceClick):
            assert all(0.0 <= v <= 1.0 for v in (turn.action.x, turn.action.y, turn.action.z))
    try:
        strict = parse_turn("<think>\nx\n</think>\n<action>\n" + text, strict=True)
    except ActionParseError:
        return
    assert parse_turn("<think>\nx\n</think>\n<action>\n" + text).action == strict.action


def test_terminate_still_terminates():
    assert parse_turn(format_turn("ok", Terminate(), "done"), strict=True).action == Terminate()
