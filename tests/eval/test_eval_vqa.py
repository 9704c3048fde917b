import json

import numpy as np
import pytest
from PIL import Image

from ibis_jax.agent.loop import PolicyTurn
from ibis_jax.agent.oracle import OraclePolicy
from ibis_jax.eval.vqa import evaluate_vqa, exact_match, load_vqa, normalize_answer
from ibis_jax.tools.classical import ClassicalTool


def test_normalize_and_exact_match():
    assert normalize_answer("  Yes. ") == "yes"
    assert normalize_answer("The Left Lung!") == "left lung"
    assert exact_match("the left lung", "Left lung") and not exact_match("right lung", "Left lung")
    assert not exact_match(None, "yes") and not exact_match("", "")


class AnswerPolicy:
    """Answers 'Yes.' at once, except for questions mentioning 'kidney': one click, then 'no'."""

    def generate(self, requests):
        turns = []
        for r in requests:
            if "kidney" in r.episode.query and not r.episode.steps:
                text = "<think>\nlook\n</think>\n<action>\nPositive Point (0.5000, 0.5000)\n</action>"
            else:
                answer = "no" if "kidney" in r.episode.query else "Yes."
                text = f"<think>\nseen\n</think>\n<action>\nTerminate\n</action>\n<answer>\n{answer}\n</answer>"
            turns.append(PolicyTurn(text))
        return turns


def test_vqa_closed_questions_exact_match(tmp_path):
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "a.png")
    entries = [
        {"image": "a.png", "question": "Is there a liver?", "answer": "yes", "answer_type": "CLOSED"},
        {"img_name": "a.png", "question": "Is the kidney enlarged?", "answer": "No", "answer_type": "CLOSED"},
        {"image": "a.png", "question": "Is this a CT?", "answer": "no", "answer_type": "CLOSED"},
        {"image": "a.png", "question": "Which organ?", "answer": "liver", "answer_type": "OPEN"},
        {"image_name": "a.png", "question": "Abnormal?", "answer": "yes"},  # no type: yes/no counts as closed
    ]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(entries))
    items = load_vqa(path)
    assert [i.question for i in items] == ["Is there a liver?", "Is the kidney enlarged?", "Is this a CT?", "Abnormal?"]
    metrics = evaluate_vqa(AnswerPolicy(), ClassicalTool(), items, out_dir=tmp_path / "out", batch_size=3)
    assert metrics["questions"] == 4 and metrics["answered"] == 4
    assert metrics["accuracy"] == pytest.approx(3 / 4)  # wrong only on "Is this a CT?"
    cases = [json.loads(line) for line in (tmp_path / "out" / "vqa_cases.jsonl").read_text().splitlines()]
    assert [c["correct"] for c in cases] == [True, True, False, True] and cases[1]["clicks"] == 1
    with pytest.raises(ValueError, match="cannot answer"):
        evaluate_vqa(OraclePolicy(), ClassicalTool(), items)
    path.write_text(json.dumps([{"question": "q", "answer": "yes"}]))
    with pytest.raises(ValueError, match="entry 0 needs 'image'"):
        load_vqa(path)
