import jax
import numpy as np
import pytest
from flax import nnx

from ibis_jax.agent.conversation import turn_messages
from ibis_jax.agent.loop import PolicyTurn
from ibis_jax.models.qwen2_5_vl import Qwen25VL
from ibis_jax.models.qwen2_5_vl.processor import Qwen25VLProcessor
from ibis_jax.models.qwen2_5_vl.tiny import make_tokenizer_dir, tiny_config
from ibis_jax.buckets import fit_bucket
from ibis_jax.rl.batch import TurnExample, build_grpo_batch, row_bucket, row_multiple
from ibis_jax.rl.grpo import policy_logprobs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok_dir = make_tokenizer_dir(tmp_path_factory.mktemp("tok"), min_pixels=28 * 28, max_pixels=56 * 56)
    processor = Qwen25VLProcessor(tok_dir)
    model = Qwen25VL(tiny_config(tok_dir), rngs=nnx.Rngs(0))
    return processor, model


def _examples(processor):
    rng = np.random.default_rng(0)
    examples = []
    for i, text in enumerate(["<think>\nleft lobe\n</think>\n<action>\nPositive Point (0.2000, 0.3000)\n</action>",
                              "<think>\nok\n</think>\n<action>\nTerminate\n</action>"]):
        obs = [rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)]
        ids = tuple(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        lp = -np.arange(1, len(ids) + 1, dtype=np.float32) / 10
        examples.append(TurnExample(turn_messages(0, f"Segment organ {i}.", obs), PolicyTurn(text, ids, lp), float(i) - 0.5))
    return examples


def test_loss_mask_covers_exactly_the_sampled_tokens(setup):
    processor, _ = setup
    examples = _examples(processor)
    batch = build_grpo_batch(examples, processor, buckets=(512, 1024), pad_rows=None, image_size=56)
    for i, ex in enumerate(examples):
        positions = np.flatnonzero(batch.loss_mask[i])
        # The token each masked position predicts is exactly the sampler's id sequence.
        assert batch.targets[i, positions].tolist() == list(ex.turn.token_ids)
        assert batch.input_ids[i, positions + 1].tolist() == list(ex.turn.token_ids)
        np.testing.assert_allclose(batch.sampler_logprobs[i, positions], ex.turn.logprobs)
        # Nothing before the assistant span (system, user text, image tokens) is in the loss.
        assert batch.loss_mask[i, : positions[0]].sum() == 0
        assert batch.attention_mask[i].sum() == positions[-1] + 2
    assert batch.advantages.tolist() == [-0.5, 0.5]
    # Both turns belong to trajectory 0 (the default): each token weighs 1 / all its tokens.
    n = sum(len(ex.turn.token_ids) for ex in examples)
    np.testing.assert_allclose(batch.row_weights, [1 / n, 1 / n], rtol=1e-6)
    assert float((batch.loss_mask * batch.row_weights[:, None]).sum()) == pytest.approx(1.0)
    assert batch.image_grid_thw.shape == (2, 3) and batch.input_ids.shape[1] == 1024
    assert (batch.input_ids == processor.image_token_id).sum() == batch.image_grid_thw.prod(-1).sum() // 4


def test_policy_logprobs_equal_full_forward(setup):
    processor, model = setup
    batch = build_grpo_batch(_examples(processor), processor, buckets=(512, 1024), pad_rows=None, image_size=56)
    logp, entropy = policy_logprobs(model, batch, chunk_size=32)
    logits = model(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw)
    full = jax.nn.log_softmax(logits, -1)
    expected = np.take_along_axis(np.asarray(full), batch.targets[..., None], -1)[..., 0]
    mask = batch.loss_mask > 0
    np.testing.assert_allclose(np.asarray(logp)[mask], expected[mask], atol=1e-5)


def test_padding_rows_carry_no_loss(setup):
    """3 turns -> 8 rows (a multiple of 8); padded rows change neither loss nor gradient."""
    import jax.numpy as jnp

    from ibis_jax.rl.grpo import GRPOConfig, grpo_loss

    processor, _ = setup
    examples = _examples(processor) + _examples(processor)[:1]
    small = build_grpo_batch(examples, processor, buckets=(512, 1024), pad_rows=None, image_size=56)
    padded = build_grpo_batch(examples, processor, buckets=(512, 1024), image_size=56)
    assert small.input_ids.shape[0] == 3 and padded.input_ids.shape[0] == 8
    assert padded.loss_mask[3:].sum() == 0 and padded.advantages[3:].tolist() == [0.0] * 5
    assert (padded.input_ids == processor.image_token_id).sum() == padded.image_grid_thw.prod(-1).sum() // 4
    rng = np.random.default_rng(1)
    new = jnp.asarray(rng.normal(-1.0, 0.3, padded.loss_mask.shape).astype(np.float32))
    old = jnp.asarray(rng.normal(-1.0, 0.3, padded.loss_mask.shape).astype(np.float32))
    for aggregation in ("trajectory_mean", "sequence_mean", "token_mean"):
        cfg = GRPOConfig(aggregation=aggregation)

        def loss(new_lp, batch, rows):
            total, denom, _ = grpo_loss(new_lp[:rows], old[:rows], jnp.asarray(batch.advantages),
                                        jnp.asarray(batch.loss_mask), cfg, row_weights=jnp.asarray(batch.row_weights))
            return total / denom

        np.testing.assert_allclose(loss(new, small, 3), loss(new, padded, 8), rtol=1e-6)
        g_small = jax.grad(loss)(new, small, 3)
        g_padded = jax.grad(loss)(new, padded, 8)
        np.testing.assert_allclose(g_small, g_padded, rtol=1e-6, atol=1e-9)


def test_turn_without_token_ids_and_overlong_are_refused(setup):
    processor, _ = setup
    ex = _examples(processor)[0]
    bad = TurnExample(ex.messages, PolicyTurn("x"), 0.0)
    with pytest.raises(ValueError, match="token ids"):
        build_grpo_batch([bad], processor, image_size=56)
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        fit_bucket(5000, (512, 1024))


def test_row_bucket_pads_to_a_multiple_from_a_bounded_set():
    # The quickstart's sizes: 2 prompts x 4 rollouts x 1..6 turns = 8..48 rows.
    assert [row_bucket(r) for r in (1, 8, 9, 20, 24, 33, 48)] == [8, 8, 16, 24, 24, 40, 48]
    padding = sum(row_bucket(r) - r for r in range(8, 49))
    assert padding == 140  # a power of two: 524 padding rows over the same range
    sizes = {row_bucket(r, 8) for r in range(1, 4097)}
    assert len(sizes) == 8 + 8 * 6  # 8 multiples, then 8 sizes per doubling (64 .. 4096 rows)
    for multiple in (1, 3, 8, 12):
        for r in range(1, 3000):
            b = row_bucket(r, multiple)
            assert b % multiple == 0 and b >= r
            assert b - r < max(multiple, -(-r // 8) + multiple)  # at most a multiple or ~1/8 of the rows
    # The mesh's batch ways divide the rows; one device still pads to 8 (few shapes).
    assert row_multiple(1) == 8 and row_multiple(4) == 8 and row_multiple(16) == 16 and row_multiple(6) == 12
    with pytest.raises(ValueError):
        row_bucket(0)
