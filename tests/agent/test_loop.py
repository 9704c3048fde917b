
import numpy as np
import pytest

from ibis_jax.agent import Episode
from ibis_jax.agent.conversation import Message, turn_messages
from ibis_jax.agent.grammar import Terminate
from ibis_jax.agent.loop import PolicyTurn, run_agent
from ibis_jax.agent.oracle import OraclePolicy
from ibis_jax.data.clicks import next_click
from ibis_jax.agent.prompts import SYSTEM_PROMPT
from ibis_jax.data.shapes import synthetic_shapes
from ibis_jax.tools.classical import ClassicalTool



def test_oracle_policy_in_the_agent_loop_clicks_the_ritm_rule():
    samples = synthetic_shapes(2, size=64, seed=3)
    tool = ClassicalTool()
    episodes = [Episode(s.image, "Segment the shape.", s.mask, episode_id=f"e{i}") for i, s in enumerate(samples)]
    traces = run_agent(OraclePolicy(max_clicks=4), tool, episodes)
    for sample, episode, trace in zip(samples, episodes, traces):
        # Every click is the RITM rule's on the mask before it, with the earlier clicks excluded.
        clicked = np.zeros(sample.mask.shape, bool)
        for step in episode.steps[:-1]:
            sim = next_click(sample.mask, step.prev_mask, rule="ritm", clicked=clicked)
            assert step.action.pixel(64, 64) == (sim.col, sim.row) and step.action.positive == sim.positive
            clicked[sim.row, sim.col] = True
        assert len(episode.clicks) == 4 and isinstance(episode.steps[-1].action, Terminate)
        assert episode.end_reason == "terminate" and len(trace.turns) == len(episode.steps)
        assert trace.observations == []  # the oracle reads the episode, not the conversation
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


def test_run_agent_uses_the_policy_settings_and_model_dirs_record_them(tmp_path):
    import json

    from ibis_jax.agent.overlay import render_overlay
    from ibis_jax.agent.prompts import SHORT_SYSTEM_PROMPT, system_prompt
    from ibis_jax.agent.settings import AGENT_FILE, HF_DEFAULTS, AgentSettings, load_agent_settings, save_agent_settings

    sample = synthetic_shapes(1, size=48, seed=0)[0]
    policy = ScriptedPolicy(["<think>\nx\n</think>\n<action>\nPositive Point (0.5, 0.5)\n</action>", "garbage"])
    policy.settings = AgentSettings("short", 56, (255, 0, 0), 0.25)
    episode = Episode(sample.image, "Segment it.", sample.mask)
    traces = run_agent(policy, ClassicalTool(), [episode])
    assert policy.seen[0][0][0].text == SHORT_SYSTEM_PROMPT  # the policy's own prompt, not the default
    # The second observation is the mask drawn with the policy's overlay settings.
    assert np.array_equal(traces[0].observations[1], render_overlay(sample.image, episode.steps[0].mask, (255, 0, 0), 0.25))
    # A model directory records its settings; one without the record is a foreign checkpoint: HF defaults.
    assert load_agent_settings(tmp_path) == HF_DEFAULTS and HF_DEFAULTS.system_prompt == "full"
    save_agent_settings(tmp_path, policy.settings)
    assert load_agent_settings(tmp_path) == policy.settings and system_prompt("short") == SHORT_SYSTEM_PROMPT
    # An older export that recorded only its prompt still loads, with default image size.
    (tmp_path / AGENT_FILE).write_text(json.dumps({"system_prompt": "short"}))
    assert load_agent_settings(tmp_path) == AgentSettings("short")
    (tmp_path / AGENT_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=AGENT_FILE):
        load_agent_settings(tmp_path)
    with pytest.raises(ValueError, match="system_prompt"):
        system_prompt("tiny")
    with pytest.raises(ValueError, match="multiple of 28"):
        AgentSettings(image_size=100)
