import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ibis_jax.agent import ActionParseError, Click, Terminate, format_action, format_turn, parse_turn

CANONICAL_CLICK = "<think>\nThe mask misses the lower lobe.\n</think>\n<action>\nPositive Point (0.4512, 0.4238)\n</action>"
CANONICAL_STOP = "<think>\nThe mask fits.\n</think>\n<action>\nTerminate\n</action>\n<answer>\nThe liver is segmented.\n</answer>"


def test_canonical_click_parses_in_both_modes():
    for strict in (False, True):
        turn = parse_turn(CANONICAL_CLICK, strict=strict)
        assert turn.action == Click(0.4512, 0.4238, True)
        assert turn.reasoning == "The mask misses the lower lobe."
        assert turn.answer is None


def test_canonical_terminate_with_answer():
    for strict in (False, True):
        turn = parse_turn(CANONICAL_STOP, strict=strict)
        assert turn.action == Terminate()
        assert turn.answer == "The liver is segmented."


def test_termination_word_is_accepted():
    text = CANONICAL_STOP.replace("Terminate", "Termination")
    assert parse_turn(text, strict=True).action == Terminate()
    assert parse_turn(text).action == Terminate()


def test_negative_point_and_format_round_trip():
    click = Click(0.1, 0.9, False)
    assert format_action(click) == "Negative Point (0.1000, 0.9000)"
    assert parse_turn(format_turn("why", click), strict=True).action == click
    assert format_action(Terminate()) == "Terminate"
    assert parse_turn(format_turn("ok", Terminate(), "done"), strict=True).answer == "done"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<action>positive point (0.5,0.25)</action>", Click(0.5, 0.25, True)),
        ("<think>x</think><action>  Negative Point: (1, 0) </action>", Click(1.0, 0.0, False)),
        ("<ACTION>\nterminate.\n</ACTION>", Terminate()),
        ('<action>{"Target": "liver", "Attribute": "1", "Coordinate 2d": "[0.31, 0.62]"}</action>', Click(0.31, 0.62, True)),
        ('<action>{"Target": "cyst", "Attribute": -1, "Coordinate 2d": [0.2, 0.4]}</action>', Click(0.2, 0.4, False)),
    ],
)
def test_lenient_forms(text, expected):
    assert parse_turn(text).action == expected


def test_json_click_keeps_target_name():
    turn = parse_turn('<action>{"Target": "left kidney", "Attribute": "1", "Coordinate 2d": "[0.3, 0.6]"}</action>')
    assert turn.target == "left kidney"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "no_action"),
        ("Positive Point (0.5, 0.5)", "no_action"),
        ("<action>Positive Point (0.5, 0.5)</action><action>Terminate</action>", "multiple_actions"),
        ("<action>Click here</action>", "bad_action"),
        ("<action>Positive Point (1.5, 0.5)</action>", "out_of_range"),
        ("<action>Positive Point (0.5, -0.1)</action>", "out_of_range"),
        ("<action>Positive Point (nan, 0.5)</action>", "bad_action"),
        ('<action>{"Attribute": "2", "Coordinate 2d": "[0.1, 0.1]"}</action>', "bad_action"),
        ('<action>{"Attribute": "1", "Coordinate 2d": "[0.1]"}</action>', "bad_action"),
        ('<action>{"Attribute": "1", "Coordinate 2d": "[0.1, 7]"}</action>', "out_of_range"),
        ("<action>{not json</action>", "bad_action"),
    ],
)
def test_lenient_rejections(text, reason):
    with pytest.raises(ActionParseError) as info:
        parse_turn(text)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "text, reason",
    [
        # missing newline layout
        ("<think>x</think><action>Positive Point (0.5, 0.5)</action>", "format"),
        # terminate without answer
        ("<think>\nx\n</think>\n<action>\nTerminate\n</action>", "missing_answer"),
        # malformed answer tags
        ("<think>\nx\n</think>\n<action>\nTerminate\n</action>\n<answer>done</answer>", "missing_answer"),
        # JSON form is lenient only
        ('<think>\nx\n</think>\n<action>\n{"Attribute": "1", "Coordinate 2d": "[0.1, 0.1]"}\n</action>', "bad_action"),
        # lower-case is lenient only
        ("<think>\nx\n</think>\n<action>\npositive point (0.5, 0.5)\n</action>", "bad_action"),
        # trailing text after a click
        ("<think>\nx\n</think>\n<action>\nPositive Point (0.5, 0.5)\n</action>\nmore", "format"),
        ("<think>\nx\n</think>\n<action>\nPositive Point (1.0001, 0.5)\n</action>", "out_of_range"),
        # a second turn swallowed by the lazy answer match (GRPO found this one)
        ("<think>\nx\n</think>\n<action>\nTerminate\n</action>\n<answer>\na\n</think>\n<action>\nTerminate\n"
         "</action>\n<answer>\nb\n</answer>", "format"),
        ("<think>\nx\n<think>\ny\n</think>\n<action>\nPositive Point (0.5, 0.5)\n</action>", "format"),
    ],
)
def test_strict_rejections(text, reason):
    with pytest.raises(ActionParseError) as info:
        parse_turn(text, strict=True)
    assert info.value.reason == reason


def test_strict_allows_blank_lines_between_think_and_action():
    text = "<think>\nx\n</think>\n\n<action>\nPositive Point (0.5000, 0.5000)\n</action>\n"
    assert parse_turn(text, strict=True).action == Click(0.5, 0.5, True)


def test_click_pixel_mapping_and_pixel_centre_round_trip():
    assert Click(1.0, 1.0, True).pixel(100, 50) == (99, 49)
    assert Click(0.0, 0.0, True).pixel(100, 50) == (0, 0)
    for height, width in ((7, 13), (512, 512), (1024, 333)):
        for row, col in ((0, 0), (height - 1, width - 1), (height // 2, width // 3)):
            assert Click.from_pixel(row, col, height, width, True).pixel(width, height) == (col, row)


def test_click_rejects_bad_coordinates():
    for bad in (math.nan, -0.01, 1.01, math.inf):
        with pytest.raises(ValueError):
            Click(bad, 0.5, True)


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_any_text_parses_or_raises_action_parse_error(text):
    for strict in (False, True):
        try:
            parse_turn(text, strict=strict)
        except ActionParseError as e:
            assert e.reason in {"no_action", "multiple_actions", "bad_action", "out_of_range", "missing_answer", "format"}


_fragments = st.sampled_from(
    ["<think>", "</think>", "<action>", "</action>", "<answer>", "</answer>", "\n", " ", "Positive Point",
     "Negative Point", "(", ")", ",", "0.5", "1e999", "-0", "nan", "Terminate", "{", "}", '"Attribute": "1"',
     '"Coordinate 2d": "[0.1, 0.2]"', '"Coordinate 2d": [1e400, 0]', ":", "[", "]", "\\u0000"]
)


@settings(max_examples=600, deadline=None)
@given(st.lists(_fragments, max_size=14).map("".join))
def test_grammar_shaped_noise_never_escapes(text):
    for strict in (False, True):
        try:
            turn = parse_turn(text, strict=strict)
        except ActionParseError:
            continue
        if isinstance(turn.action, Click):
            assert 0.0 <= turn.action.x <= 1.0 and 0.0 <= turn.action.y <= 1.0


@settings(max_examples=600, deadline=None)
@given(st.lists(_fragments, max_size=20).map("".join))
@example("Terminate\n</action>\n<answer>\na\n</think>\n<action>\nTerminate\n</action>\n<answer>\nb\n</answer>")
@example("Terminate\n</action>\n<answer>\nThe liver.\n</answer>")
@example("Negative Point (0.5, 1)\n</action>")
def test_a_strictly_valid_turn_parses_leniently_to_the_same_action(text):
    # The format reward (strict) and the episode (lenient) must never disagree on a turn.
    try:
        strict = parse_turn("<think>\nx\n</think>\n<action>\n" + text, strict=True)
    except ActionParseError:
        return
    lenient = parse_turn("<think>\nx\n</think>\n<action>\n" + text)
    assert lenient.action == strict.action and lenient.answer == strict.answer
