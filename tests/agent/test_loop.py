
import numpy as np
import pytest

from ibis_jax.agent import Episode
from ibis_jax.agent.conversation import Message, turn_messages
from ibis_jax.agent.loop import OraclePolicy, PolicyTurn, run_agent
from ibis_jax.agent.oracle import run_oracle_episode
from ibis_jax.agent.prompts import SYSTEM_PROMPT
from ibis_jax.data.shapes import synthetic_shapes
from ibis_jax.tools.classical import ClassicalTool



def test_oracle_policy_in_the_agent_loop_matches_the_oracle_runner():
    samples = synthetic_shapes(2, size=64, seed=3)
    tool = ClassicalTool()
    episodes = [Episode(s.image, "Segment the shape.", s.mask, episode_id=f"e{i}") for i, s in enumerate(samples)]
    traces = run_agent(OraclePolicy(max_clicks=4), tool, episodes)
    for sample, episode, trace in zip(samples, episodes, traces):
        reference = run_oracle_episode(tool, sample.image, sample.mask, max_clicks=4)
        assert [c for c in episode.clicks] == [c for c in reference.clicks]
        assert episode.click_iou_curve == pytest.approx(reference.click_iou_curve)
        assert episode.end_reason == "terminate" and len(trace.turns) == len(episode.steps)
        assert len(trace.observations) == len(episode.steps)
        assert np.array_equal(trace.observations[0], sample.image)  # turn 0 sees the raw image
    assert tool._images == {}  # every episode closed


class ScriptedPolicy:
    def __init__(self, texts):
        self.texts = list(texts)
        self.seen = []

    def generate(self, requests):
        self.seen.append([r.messages for r in requests])
        return [PolicyTurn(self.texts.pop(0), token_ids=(1, 2, 3)) for _ in requests]


def test_garbage_turn_ends_episode_and_full_history_grows():
    sample = synthetic_shapes(1, size=48, seed=0)[0]
    episode = Episode(sample.image, "Segment it.", sample.mask)
    policy = ScriptedPolicy([
        "<think>\nstart\n</think>\n<action>\nPositive Point (0.5000, 0.5000)\n</action>",
        "I refuse to follow the format.",
    ])
    traces = run_agent(policy, ClassicalTool(), [episode], history="full")
    assert episode.end_reason == "parse_error" and len(episode.steps) == 2
    first, second = policy.seen[0][0], policy.seen[1][0]
    assert [m.role for m in first] == ["system", "user"]
    assert [m.role for m in second] == ["system", "user", "assistant", "user"]
    assert second[2].token_ids == (1, 2, 3)  # the sampler's ids travel with the history
    assert len(traces[0].turns) == 2


def test_turn_messages_history_none_shows_only_current_overlay():
    obs = [np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), np.uint8)]
    msgs = turn_messages(1, "Segment the liver.", obs, [Message("assistant", "x")], history="none")
    assert [m.role for m in msgs] == ["system", "user"]
    assert msgs[0].text == SYSTEM_PROMPT and msgs[1].image is obs[1]
    assert "Segment the liver." in msgs[1].text
    with pytest.raises(ValueError, match="history"):
        turn_messages(0, "q", obs, history="some")
    with pytest.raises(ValueError, match="observations"):
        turn_messages(3, "q", obs)


def test_run_agent_uses_the_policy_system_prompt_and_model_dirs_record_it(tmp_path):
    from ibis_jax.agent.prompts import (AGENT_FILE, SHORT_SYSTEM_PROMPT, load_agent_prompt, save_agent_prompt,
                                        system_prompt)

    sample = synthetic_shapes(1, size=48, seed=0)[0]
    policy = ScriptedPolicy(["I refuse to follow the format."])
    policy.system_prompt = SHORT_SYSTEM_PROMPT
    run_agent(policy, ClassicalTool(), [Episode(sample.image, "Segment it.", sample.mask)])
    assert policy.seen[0][0][0].text == SHORT_SYSTEM_PROMPT  # the policy's own prompt, not the default
    # A model directory records its prompt; one without the record is a foreign checkpoint: full prompt.
    assert load_agent_prompt(tmp_path) == "full"
    save_agent_prompt(tmp_path, "short")
    assert load_agent_prompt(tmp_path) == "short" and system_prompt("short") == SHORT_SYSTEM_PROMPT
    (tmp_path / AGENT_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=AGENT_FILE):
        load_agent_prompt(tmp_path)
    with pytest.raises(ValueError, match="system_prompt"):
        system_prompt("tiny")
