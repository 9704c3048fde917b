"""The one conversation encoder: the same conversation encoded on the three routes (SFT sample,
rollout policy prompt, GRPO batch row) gives identical ids, in both history modes, for a turn that
ended on EOS and one cut at a stop string; and it equals the chat template where both apply."""

from __future__ import annotations

import numpy as np
import pytest

from ibis_jax.agent.conversation import Message, to_chat, turn_messages
from ibis_jax.agent.encoding import encode_conversation
from ibis_jax.agent.loop import PolicyTurn
from ibis_jax.models.qwen2_5_vl.processor import Qwen25VLProcessor, check_image_tokens, prepare_image
from ibis_jax.models.qwen2_5_vl.tiny import make_tokenizer_dir
from ibis_jax.rl.batch import TurnExample, build_grpo_batch

SIZE = 56
TURNS = ["<think>\nleft lobe\n</think>\n<action>\nPositive Point (0.2000, 0.3000)\n</action>",
         "<think>\nmore\n</think>\n<action>\nNegative Point (0.7000, 0.6500)\n</action>",
         "<think>\nok\n</think>\n<action>\nTerminate\n</action>\n<answer>\nthe organ\n</answer>"]


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Qwen25VLProcessor(make_tokenizer_dir(tmp_path_factory.mktemp("tok"), grammar_tokens=True))


class _Policy:
    """ModelPolicy.encode without a model: the same encoder call the policy makes."""

    def __init__(self, processor, eos_ids):
        self.processor, self.eos_ids = processor, eos_ids

    def encode(self, messages):
        return encode_conversation(messages, self.processor.tokenizer, SIZE, add_generation_prompt=True,
                                   eos_ids=self.eos_ids)


def _observations(n):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (40, 52, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("history", ["none", "full"])
def test_three_routes_encode_identical_ids(processor, history):
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos_ids = (im_end,)
    ids = [tuple(tok(t, add_special_tokens=False)["input_ids"]) for t in TURNS]
    # Turn 0 ended on EOS (its ids hold <|im_end|>), turn 1 was cut at a stop string (no end token).
    sampled = [ids[0] + (im_end,), ids[1], ids[2] + (im_end,)]
    obs = _observations(3)
    policy = _Policy(processor, eos_ids)
    as_ids = [Message("assistant", t, token_ids=s) for t, s in zip(TURNS, sampled)]
    as_text = [Message("assistant", t) for t in TURNS]
    for t in range(3):
        # Route 1: the rollout policy's prompt for turn t (earlier turns as their sampled ids).
        prompt = policy.encode(turn_messages(t, "Segment the organ.", obs, as_ids, history=history))
        # Route 2: the GRPO row of turn t = that prompt + the sampled ids of turn t.
        example = TurnExample(turn_messages(t, "Segment the organ.", obs, as_ids, history=history),
                              PolicyTurn(TURNS[t], sampled[t]), 1.0)
        batch = build_grpo_batch([example], processor, buckets=(2048,), eos_ids=eos_ids, pad_rows=None,
                                 image_size=SIZE)
        row = batch.input_ids[0][batch.attention_mask[0] > 0]
        assert row.tolist() == prompt.input_ids.tolist() + list(sampled[t])
        # Route 3: the SFT sample of the same conversation with the turns as text.
        sft = encode_conversation(turn_messages(t, "Segment the organ.", obs, as_text, history=history) + [as_text[t]],
                                  tok, SIZE)
        # The SFT sample ends "<|im_end|>\n"; everything before the turn's end token is shared.
        n = len(prompt) + len(ids[t])
        assert sft.input_ids[:n].tolist() == row[:n].tolist()
        assert sft.input_ids[n] == im_end and sft.loss_weights[n] == 1.0 and sft.loss_weights[len(prompt) - 1] == 0
        # Exactly one end token after every earlier assistant turn (never <|im_end|><|im_end|>).
        pairs = list(zip(row[:-1].tolist(), row[1:].tolist()))
        assert (im_end, im_end) not in pairs
        assert prompt.policy_token_mask.sum() == (sum(len(s) for s in sampled[:t]) if history == "full" else 0)
        # Images are prepared once, at the policy's size, in order of appearance.
        assert all(im.shape == (SIZE, SIZE, 3) for im in prompt.images)
        assert np.array_equal(prompt.images[-1], prepare_image(obs[t], SIZE))


def test_encoder_equals_the_chat_template(processor):
    """Text-only conversations: piecewise encoding equals rendering the template and tokenizing."""
    msgs = [Message("system", "You segment."), Message("user", "Segment the liver."), Message("assistant", TURNS[0]),
            Message("user", "More?")]
    enc = encode_conversation(msgs, processor.tokenizer, SIZE, add_generation_prompt=True)
    ref = processor.apply_chat_template(to_chat(msgs), add_generation_prompt=True)
    assert enc.input_ids.tolist() == ref["input_ids"][0][ref["attention_mask"][0] > 0].tolist()
    # Loss only on the assistant text and its end token; its <action> block is marked.
    weighted = enc.input_ids[enc.loss_weights > 0]
    assert processor.tokenizer.decode(weighted) == TURNS[0] + "<|im_end|>"
    assert "Positive Point" in processor.tokenizer.decode(enc.input_ids[enc.action_mask])


def test_images_get_one_pad_per_visual_token(processor):
    image = _observations(1)[0]
    msgs = turn_messages(0, "Segment it.", [image])
    enc = encode_conversation(msgs, processor.tokenizer, SIZE)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc.input_ids == pad).sum()) == (SIZE // 28) ** 2
    _, grid = processor.images(enc.images)
    assert int(grid.prod(-1).sum()) // 4 == (SIZE // 28) ** 2  # the processor agrees (no second resize)
    with pytest.raises(ValueError, match="multiple of 28"):
        encode_conversation(msgs, processor.tokenizer, 50)


def test_image_token_check_refuses_images_at_another_size(processor):
    """The check the sampler and the GRPO batch run: a turn encoded for 56 px images (4 image
    tokens) with its image prepared at 112 px (16 visual tokens) is refused with both counts, and
    the same image at 56 px passes."""
    obs = _observations(1)
    enc = encode_conversation(turn_messages(0, "Segment the organ.", obs), processor.tokenizer, SIZE)
    _, grid = processor.prepared_images([prepare_image(obs[0], SIZE)])
    check_image_tokens(enc.input_ids, processor.image_token_id, grid, 2, "GRPO batch")
    _, grid = processor.prepared_images([prepare_image(obs[0], 2 * SIZE)])
    with pytest.raises(ValueError, match="GRPO batch: the prompts hold 4 image tokens but the images give 16 visual"):
        check_image_tokens(enc.input_ids, processor.image_token_id, grid, 2, "GRPO batch")
