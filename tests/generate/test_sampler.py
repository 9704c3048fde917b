"""The KV-cache sampler against transformers and against the model's own full forward."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ibis_jax.generate import Sampler, SamplerConfig, StopAutomaton
from ibis_jax.generate.stop import token_bytes
from ibis_jax.models.qwen2_5_vl.testing import flax_logits, image_sequence

NEW = 10
PLAIN = SamplerConfig(max_new_tokens=NEW, stop_strings=(), eos_token_ids=())


def _hf_greedy(torch_model, ids, pixel_values=None, grid=None, n=NEW):
    import torch

    kw = dict(input_ids=torch.tensor(ids[None]))
    if pixel_values is not None:
        kw.update(pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(grid),
                  mm_token_type_ids=torch.tensor((ids[None] == torch_model.config.image_token_id).astype(np.int64)))
    with torch.no_grad():
        out = torch_model.generate(**kw, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _image_batch(cfg, seed=1):
    rng = np.random.default_rng(seed)
    grids = [np.array([1, 8, 8]), np.array([1, 4, 8])]
    prompts = [image_sequence(cfg, rng, [grids[0]], [3, 5]), image_sequence(cfg, rng, [grids[1]], [11, 2])]
    pv = rng.standard_normal((sum(int(np.prod(g)) for g in grids), cfg.vision.patch_dim)).astype(np.float32)
    return prompts, pv, np.stack(grids)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "model-kernels"])
def test_greedy_text_batched_matches_transformers(flax_model, torch_model, processor, packed):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 400, n) for n in (5, 17, 9)]
    cfg = dataclasses.replace(PLAIN, packed_weights=packed)
    out = Sampler(flax_model, processor.tokenizer, cfg).generate(prompts)
    for p, c in zip(prompts, out):
        assert list(c.token_ids) == _hf_greedy(torch_model, p)
        assert c.stop_reason == "max_tokens" and len(c.token_ids) == NEW


def test_greedy_image_batched_matches_transformers(flax_model, torch_model, processor):
    prompts, pv, grid = _image_batch(flax_model.config)
    out = Sampler(flax_model, processor.tokenizer, PLAIN).generate(prompts, pv, grid)
    n0 = int(np.prod(grid[0]))
    refs = [_hf_greedy(torch_model, prompts[0], pv[:n0], grid[:1]), _hf_greedy(torch_model, prompts[1], pv[n0:], grid[1:])]
    assert [list(c.token_ids) for c in out] == refs


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "model-kernels"])
def test_qwen3_vl_greedy_on_image_prompts_matches_transformers(q3_model, q3_hf, processor, packed):
    """Qwen3-VL (DeepStack on, interleaved mRoPE, q/k norms): greedy tokens equal transformers'
    `generate` on a batch of image prompts of two sizes (left-padded together) and a text one."""
    torch_model = q3_hf[1]
    prompts, pv, grid = _image_batch(q3_model.config)
    cfg = dataclasses.replace(PLAIN, packed_weights=packed)
    out = Sampler(q3_model, processor.tokenizer, cfg).generate(prompts, pv, grid)
    n0 = int(np.prod(grid[0]))
    refs = [_hf_greedy(torch_model, prompts[0], pv[:n0], grid[:1]), _hf_greedy(torch_model, prompts[1], pv[n0:], grid[1:])]
    assert [list(c.token_ids) for c in out] == refs
    text = [np.random.default_rng(4).integers(0, 400, 7)]
    assert list(Sampler(q3_model, processor.tokenizer, cfg).generate(text)[0].token_ids) == _hf_greedy(torch_model, text[0])


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "model-kernels"])
def test_model_logprobs_equal_full_forward(flax_model, processor, packed):
    prompts, pv, grid = _image_batch(flax_model.config, seed=2)
    cfg = SamplerConfig(max_new_tokens=NEW, temperature=1.3, top_k=20, stop_strings=(), eos_token_ids=(),
                        packed_weights=packed)
    import jax

    out = Sampler(flax_model, processor.tokenizer, cfg).generate(prompts, pv, grid, key=jax.random.key(3))
    n0 = int(np.prod(grid[0]))
    for i, (p, c) in enumerate(zip(prompts, out)):
        seq = np.concatenate([p, np.asarray(c.token_ids)])[None]
        sl = slice(0, n0) if i == 0 else slice(n0, None)
        logits = flax_logits(flax_model, seq, np.ones_like(seq), pv[sl], grid[i:i + 1])[0]
        z = logits - logits.max(-1, keepdims=True)
        lsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
        ref = lsm[len(p) - 1:-1][np.arange(NEW), np.asarray(c.token_ids)]
        assert np.abs(ref - c.model_logprobs).max() < 1e-4
        # Sampling distribution: temperature and top-k change it, so the two differ.
        assert np.abs(c.logprobs - c.model_logprobs).max() > 1e-3
        assert np.all(c.logprobs <= 0)


def test_continuation_equals_fresh_prefill(flax_model, processor):
    cfg = flax_model.config
    prompts, pv, grid = _image_batch(cfg, seed=4)
    rng = np.random.default_rng(5)
    g2 = np.array([[1, 4, 4], [1, 4, 4]])
    turns = [image_sequence(cfg, rng, [g2[0]], [2, 3]), image_sequence(cfg, rng, [g2[1]], [6, 1])]
    pv2 = rng.standard_normal((32, cfg.vision.patch_dim)).astype(np.float32)
    s = Sampler(flax_model, processor.tokenizer, PLAIN)
    state = s.prefill(prompts, pv, grid)
    state, first = s.decode(state, 2)
    state = s.extend(state, turns, pv2, g2)
    _, cont = s.decode(state, 2)
    full = [np.concatenate([p, np.asarray(c.token_ids), t]) for p, c, t in zip(prompts, first, turns)]
    n0, n1 = int(np.prod(grid[0])), int(np.prod(g2[0]))
    pv_full = np.concatenate([pv[:n0], pv2[:n1], pv[n0:], pv2[n1:]])
    grid_full = np.stack([grid[0], g2[0], grid[1], g2[1]])
    fresh = s.generate(full, pv_full, grid_full)
    assert [c.token_ids for c in cont] == [c.token_ids for c in fresh]
    np.testing.assert_allclose(np.concatenate([c.model_logprobs for c in cont]),
                               np.concatenate([c.model_logprobs for c in fresh]), atol=1e-4)


def test_same_key_same_sample(flax_model, processor):
    import jax

    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 400, n) for n in (4, 8)]
    cfg = SamplerConfig(max_new_tokens=NEW, temperature=1.0, top_p=0.9, stop_strings=(), eos_token_ids=())
    s = Sampler(flax_model, processor.tokenizer, cfg)
    a = s.generate(prompts, key=jax.random.key(1))
    b = s.generate(prompts, key=jax.random.key(1))
    c = s.generate(prompts, key=jax.random.key(2))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    # A row's sample does not depend on the rest of the batch.
    alone = s.generate(prompts[:1], key=jax.random.key(1))
    assert alone[0].token_ids == a[0].token_ids
    # top_k=1 is greedy.
    k1 = Sampler(flax_model, processor.tokenizer, SamplerConfig(max_new_tokens=NEW, temperature=0.7, top_k=1,
                                                                stop_strings=(), eos_token_ids=()))
    greedy = Sampler(flax_model, processor.tokenizer, PLAIN)
    assert [x.token_ids for x in k1.generate(prompts, key=jax.random.key(9))] == \
        [x.token_ids for x in greedy.generate(prompts)]


def test_stop_automaton_spans_tokens(processor):
    tok = processor.tokenizer
    vocab = 512
    auto = StopAutomaton(("</action>", "</answer>"), token_bytes(tok, vocab))
    by_bytes = {b: i for i, b in enumerate(token_bytes(tok, vocab)) if b}
    single = [by_bytes[bytes([c])] for c in b"x</action>\n"]
    assert auto.run_tokens(single) == len(single) - 2  # the '>' token completes it
    assert auto.run_tokens(tok.encode("think </act ion>")) is None
    ids = tok.encode("<think>\nok\n</think>\n<action>\nTerminate\n</action>\n<answer>\nx\n</answer>")
    n = auto.run_tokens(ids)
    assert tok.decode(ids[: n + 1]).endswith("</action>") or "</action>" in tok.decode(ids[: n + 1])
    assert "</action>" not in tok.decode(ids[:n])
    # A special token resets a partial match.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert auto.run_tokens([by_bytes[b"<"], by_bytes[b"/"], im_end] + [by_bytes[bytes([c])] for c in b"action>"]) is None


@pytest.mark.parametrize("grammar_tokens", [False, True])
def test_default_stop_strings_end_a_click_at_its_action_and_a_terminate_after_its_answer(tmp_path, grammar_tokens):
    from ibis_jax.models.qwen2_5_vl.tiny import make_tokenizer_dir
    from ibis_jax.train.pipeline import load_tokenizer

    tok = load_tokenizer(make_tokenizer_dir(tmp_path / "tok", grammar_tokens=grammar_tokens))
    auto = StopAutomaton(SamplerConfig().stop_strings, token_bytes(tok, len(tok)))
    click = "<think>\nmiss\n</think>\n<action>\nPositive Point (0.4512, 0.4238)\n</action>"
    ids = tok.encode(click + "\nmore text")
    assert tok.decode(ids[: auto.run_tokens(ids) + 1]) == click
    terminate = "<think>\nfits\n</think>\n<action>\nTerminate\n</action>\n<answer>\nThe liver.\n</answer>"
    ids = tok.encode(terminate + "\nmore")
    assert tok.decode(ids[: auto.run_tokens(ids) + 1]) == terminate  # the answer is not cut off


def test_decode_stops_on_stop_string_and_eos(flax_model, processor):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 400, n) for n in (5, 17)]
    free = Sampler(flax_model, processor.tokenizer, SamplerConfig(max_new_tokens=NEW, stop_strings=(), eos_token_ids=()))
    ref = free.generate(prompts)
    # Declare the text of two consecutive text tokens of row 0 a stop string, row 1's 2nd token eos.
    tb = token_bytes(processor.tokenizer, 512)
    ids0 = ref[0].token_ids

    def text(j):
        try:
            return (tb[ids0[j]] + tb[ids0[j + 1]]).decode("utf-8") if tb[ids0[j]] and tb[ids0[j + 1]] else None
        except UnicodeDecodeError:
            return None

    j = next(j for j in range(NEW - 1) if text(j))
    stop_text = text(j)
    eos = ref[1].token_ids[1]
    s = Sampler(flax_model, processor.tokenizer, SamplerConfig(max_new_tokens=NEW, stop_strings=(stop_text,),
                                                               eos_token_ids=(eos,)))
    out = s.generate(prompts)
    n0 = StopAutomaton((stop_text,), tb).run_tokens(ids0)
    assert n0 is not None and n0 <= j + 1
    assert out[0].token_ids == ref[0].token_ids[: n0 + 1] and out[0].stop_reason == "stop_string"
    assert n0 is not None and n0 <= j + 1
    first_eos = ref[1].token_ids.index(eos)
    assert out[1].token_ids == ref[1].token_ids[: first_eos + 1] and out[1].stop_reason == "eos"
    assert len(out[1].logprobs) == first_eos + 1


def test_suppressed_tokens_are_never_sampled(flax_model, processor):
    import jax

    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 400, n) for n in (6, 9)]
    free = Sampler(flax_model, processor.tokenizer, PLAIN).generate(prompts)
    banned = tuple(sorted({c.token_ids[0] for c in free}))
    for cfg in (dataclasses.replace(PLAIN, suppress_token_ids=banned),
                dataclasses.replace(PLAIN, suppress_token_ids=banned, temperature=1.0)):
        out = Sampler(flax_model, processor.tokenizer, cfg).generate(prompts, key=jax.random.key(0))
        assert all(t not in banned for c in out for t in c.token_ids)
        for c in out:
            assert np.all(np.isfinite(c.logprobs)) and np.all(np.isfinite(c.model_logprobs))


def test_model_policy_never_samples_multimodal_placeholders(flax_model, processor):
    from ibis_jax.generate.policy import ModelPolicy

    policy = ModelPolicy.for_rollouts(flax_model, processor, temperature=1.0, max_new_tokens=4)
    assert policy.sampler.config.suppress_token_ids == flax_model.config.multimodal_token_ids
    assert processor.image_token_id in flax_model.config.multimodal_token_ids


def test_images_are_encoded_in_power_of_two_groups_with_the_features_of_one_call(flax_model, processor):
    """Three images: groups of 2 + 1 (a batch of n images compiles at most log2(n) + 1 tower
    shapes), the same features as the tower on all three at once."""
    import jax.numpy as jnp
    from flax import nnx

    from ibis_jax.generate.sampler import _encode_images, power_of_two_groups
    from ibis_jax.models.qwen2_5_vl import vision_layout

    assert [power_of_two_groups(n) for n in (1, 5, 7, 8)] == [[1], [4, 1], [4, 2, 1], [8]]
    rng = np.random.default_rng(3)
    grid = np.array([[1, 8, 8], [1, 4, 8], [1, 8, 4]])
    pv = rng.standard_normal((int(grid.prod(-1).sum()), flax_model.config.vision.patch_dim)).astype(np.float32)
    sampler = Sampler(flax_model, processor.tokenizer, PLAIN)
    graphdef, params = nnx.split(flax_model)
    grouped = np.asarray(sampler._features(graphdef, params, pv, grid)[0])
    whole = np.asarray(_encode_images(graphdef, params, jnp.asarray(pv), vision_layout(grid, flax_model.config.vision))[0])
    assert grouped.shape[0] >= whole.shape[0]  # padded to a visual bucket
    np.testing.assert_allclose(grouped[:whole.shape[0]], whole, rtol=1e-5, atol=1e-5)
    assert not grouped[whole.shape[0]:].any()
