"""parse_turn on megabyte inputs built to make lazy or ambiguous regexes backtrack: each one must
parse or fail with ActionParseError (it took minutes before the parser was made linear; the
timings are in ``bench/parse_turn_scaling.py``, here only a loose bound so the test never flakes)."""

import time

import pytest

from ibis_jax.agent import ActionParseError, Click, Terminate, parse_turn

MIB = 1 << 20

ADVERSARIAL = {
    "unclosed_actions": ("<action>" * (MIB // 8), False, "no_action"),
    "many_think_closers": ("<think>\n" + "\n</think>\n<action>\n" * (MIB // 19), True, "format"),
    "spaces_inside_a_point": ("<action>positive point" + " " * MIB + "x</action>", False, "bad_action"),
    "spaces_after_a_point": ("<action>positive point (0.5, 0.5)" + " " * MIB + "x</action>", False, "bad_action"),
    "digits_in_a_point": ("<action>positive point (0." + "1" * MIB + ", 0.5 x</action>", False, "bad_action"),
    "tag_soup": ("<think><action><answer>" * (MIB // 23 + 1), False, "no_action"),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_a_mebibyte_of_adversarial_text_fails_fast(name):
    text, strict, reason = ADVERSARIAL[name]
    assert len(text) >= MIB
    started = time.perf_counter()
    with pytest.raises(ActionParseError) as info:
        parse_turn(text, strict=strict)
    assert info.value.reason == reason
    assert time.perf_counter() - started < 5.0  # before: minutes; now milliseconds


def test_a_mebibyte_of_reasoning_still_parses_in_both_modes():
    long_answer = "\n</answer>" * (MIB // 20) + "\nfinal"
    click = "<think>\n" + "why " * (MIB // 4) + "\n</think>\n<action>\nPositive Point (0.2500, 0.7500)\n</action>"
    stop = ("<think>\nx\n</think>\n<action>\nTerminate\n</action>\n<answer>\n" + long_answer + "\n</answer>\n"
            + " " * MIB)
    started = time.perf_counter()
    for strict in (False, True):
        assert parse_turn(click, strict=strict).action == Click(0.25, 0.75, True)
    assert parse_turn(stop).action == Terminate()
    with pytest.raises(ActionParseError) as info:  # the answer holds </answer>: a nested tag
        parse_turn(stop, strict=True)
    assert info.value.reason == "format"
    assert time.perf_counter() - started < 5.0
