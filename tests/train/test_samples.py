"""Samples and the pipeline: loss only on assistant tokens, zero-weight turns excluded, the
shift to targets, fixed shapes, and a checkpointable iterator."""

import numpy as np

from helpers import make_config, make_record, write_dataset
from ibis_jax.train.pipeline import load_tokenizer, make_pipeline
from ibis_jax.models.qwen2_5_vl.processor import prepare_image
from ibis_jax.train.samples import record_samples


def test_loss_only_on_assistant_tokens_and_wrong_turn_excluded(tok_dir):
    tok = load_tokenizer(tok_dir)
    rec = make_record(0, clicks=2, wrong_at=1)
    samples = record_samples(rec, tok, image_size=56, history="none")
    assert [s.step for s in samples] == [0, 1, 2]
    for s in samples:
        w = s.loss_weights
        trained = tok.decode(s.input_ids[w > 0])
        if s.step == 1:  # the deliberately wrong click: no loss at all
            assert w.sum() == 0 and not s.action_mask.any()
            continue
        assert trained == rec.steps[s.step].text + "<|im_end|>"
        assert tok.decode(s.input_ids[s.action_mask]).startswith("<action>")
        assert tok.decode(s.input_ids[s.action_mask]).rstrip().endswith("</action>")
        assert (s.input_ids == tok.convert_tokens_to_ids("<|image_pad|>")).sum() == 4  # 56 px: 2x2 merged
        assert len(s.images) == 1 and s.images[0].shape == (56, 56, 3)
    # turn 0 sees the original image, later turns the overlay (green where the previous mask is)
    assert np.array_equal(samples[0].images[0], prepare_image(rec.image(), 56))
    assert not np.array_equal(samples[2].images[0], samples[0].images[0])


def test_full_history_trains_every_weighted_turn(tok_dir):
    tok = load_tokenizer(tok_dir)
    rec = make_record(1, clicks=2, wrong_at=1)
    (s,) = record_samples(rec, tok, image_size=56, history="full")
    assert len(s.images) == 3
    text = tok.decode(s.input_ids[s.loss_weights > 0])
    assert text == rec.steps[0].text + "<|im_end|>" + rec.steps[2].text + "<|im_end|>"
    # the wrong turn is in the context (the model sees it) but not in the loss
    assert rec.steps[1].text in tok.decode(s.input_ids)


def test_pipeline_batches_shift_pad_and_resume(tmp_path, tok_dir):
    data = write_dataset(str(tmp_path / "data"), records=3)
    cfg = make_config(batch_size=4, grad_accum=2, seq_buckets=(900, 1024, 2048))
    pipe = make_pipeline(data, tok_dir, cfg)
    assert pipe.num_samples == 9
    it = pipe.iterator()
    b = next(it)
    assert b["input_ids"].shape[:2] == (2, 2) and b["input_ids"].shape[2] in (900, 1024)
    assert b["pixel_values"].shape == (2, 2 * 16, 1176) and b["image_grid_thw"].shape == (2, 2, 3)
    ids, tg, w, m = b["input_ids"], b["targets"], b["weights"], b["attention_mask"]
    np.testing.assert_array_equal(tg[..., :-1], ids[..., 1:])
    assert (w[m == 0] == 0).all() and w.sum() > 0
    state = it.get_state()
    nxt = [next(it) for _ in range(2)]
    it2 = pipe.iterator()
    it2.set_state(state)
    for a in nxt:
        c = next(it2)
        for k in a:
            np.testing.assert_array_equal(a[k], c[k])


def test_grammar_tokens_make_the_layout_single_tokens_and_keep_the_text(tmp_path):
    from ibis_jax.models.qwen2_5_vl.tiny import GRAMMAR_TOKENS, make_tokenizer_dir

    tok = load_tokenizer(make_tokenizer_dir(tmp_path / "tok", grammar_tokens=True))
    rec = make_record(2, clicks=1)
    for s in record_samples(rec, tok, image_size=56, history="none"):
        text = rec.steps[s.step].text
        trained = [tok.convert_ids_to_tokens(int(i)) for i in s.input_ids[s.loss_weights > 0]]
        assert tok.decode(s.input_ids[s.loss_weights > 0]) == text + "<|im_end|>"
        assert [t for t in trained if t in GRAMMAR_TOKENS] == [t for t in GRAMMAR_TOKENS if t in text]
        assert trained[0] == "<think>\n"
        action = tok.decode(s.input_ids[s.action_mask])
        assert action.startswith("<action>\n") and action.endswith("\n</action>")


def test_short_system_prompt_reaches_the_pipeline_and_bad_names_are_refused(tmp_path, tok_dir):
    import pytest

    from ibis_jax.agent.prompts import SHORT_SYSTEM_PROMPT, SYSTEM_PROMPT

    data = write_dataset(str(tmp_path / "data"), records=1)
    tok = load_tokenizer(tok_dir)
    lengths = {}
    for name, text in (("full", SYSTEM_PROMPT), ("short", SHORT_SYSTEM_PROMPT)):
        b = next(make_pipeline(data, tok_dir, make_config(batch_size=1, system_prompt=name)).iterator())
        ids = b["input_ids"][0, 0][b["attention_mask"][0, 0] > 0]
        decoded = tok.decode(ids)
        assert text in decoded and (name == "short" or SHORT_SYSTEM_PROMPT not in decoded)
        lengths[name] = len(ids)
    assert lengths["full"] - lengths["short"] > 200  # the point of the short prompt: a far shorter sample
    with pytest.raises(ValueError, match="system_prompt"):
        make_config(system_prompt="terse")


def test_a_batch_with_every_sample_too_long_is_an_error_not_a_silent_zero_loss():
    import numpy as np
    import pytest

    from helpers import make_config
    from ibis_jax.train.pipeline import Collate
    from ibis_jax.train.samples import SFTSample

    def sample(n):
        return SFTSample(np.arange(n, dtype=np.int32), np.ones(n, np.float32), np.zeros(n, bool),
                         [np.zeros((56, 56, 3), np.uint8)])

    collate = Collate(make_config(batch_size=2, seq_buckets=(64,), drop_too_long=True, image_size=56), pad_id=0)
    batch = collate([sample(40), sample(90)])  # one too long: dropped (weight 0), the other kept
    assert batch["weights"].sum() == 39  # the kept one: 40 tokens, 39 predicted
    with pytest.raises(ValueError, match=r"longest has 90 tokens\): add a bucket of at least 90"):
        collate([sample(70), sample(90)])
