import numpy as np
import pytest

from ibis_jax.agent.prompts import SYSTEM_PROMPT, refinement_user_turn, user_turn
from ibis_jax.data.queries import (
    QUERY_STYLES,
    REFINEMENT_STYLES,
    make_query,
    make_refinement,
    modality_phrase,
    query_rng,
)


def test_every_style_fills_target_and_modality():
    rng = np.random.default_rng(0)
    for style in QUERY_STYLES:
        for _ in range(10):
            q = make_query("left kidney", "CT", rng, style=style)
            assert q.style == style and "left kidney" in q.text.lower() and "{" not in q.text
    assert make_query("liver", "CT", rng, style="concise").text in (
        "Structure: liver", "Target: liver", "Liver, CT.", "Segment: liver")
    for style in REFINEMENT_STYLES:
        assert "liver" in make_refinement("liver", "CT", rng, style=style).text


def test_deterministic_under_seed_and_sample_id():
    a = [make_query("liver", "CT", query_rng(7, f"s{i}")).text for i in range(30)]
    b = [make_query("liver", "CT", query_rng(7, f"s{i}")).text for i in range(30)]
    c = [make_query("liver", "CT", query_rng(8, f"s{i}")).text for i in range(30)]
    assert a == b and a != c
    styles = {make_query("liver", "CT", query_rng(0, f"s{i}")).style for i in range(60)}
    assert styles == set(QUERY_STYLES)  # all styles get drawn


def test_absent_target_uses_question_style():
    q = make_query("tumor", "MRI", np.random.default_rng(1), absent=True)
    assert q.style == "question" and "tumor" in q.text and "?" in q.text


def test_unknown_style_and_modality_phrases():
    with pytest.raises(ValueError, match="unknown query style"):
        make_query("liver", "CT", np.random.default_rng(0), style="shouty")
    assert modality_phrase("CT") == "this CT scan"
    assert modality_phrase("Synthetic") == "this image"
    assert modality_phrase("PET") == "this PET image"


def test_prompts_keep_the_grammar():
    for word in ("<think>", "</think>", "<action>", "Positive Point (x, y)", "Negative Point (x, y)",
                 "Terminate", "<answer>", "four decimals"):
        assert word in SYSTEM_PROMPT
    assert user_turn(0, "Segment the liver.") == "Segment the liver."
    text = user_turn(2, "Segment the liver.", "Check the green mask against the liver.")
    assert text.startswith("Original request: Segment the liver.") and "Check the green mask" in text
    assert "  " not in refinement_user_turn("Segment the liver.")
