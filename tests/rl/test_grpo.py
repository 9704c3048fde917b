import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibis_jax.rl.grpo import GRPOConfig, group_advantages, grpo_loss
from ibis_jax.train.loss import chunked_token_logprobs


def _numpy_reference(logp, old, adv, mask, eps_low, eps_high, aggregation, trajectory=None):
    """Straight transcription of the paper's Eq. 2-3 with loops. Rows are turns; ``trajectory``
    says which trajectory each row belongs to (default: one row each)."""
    trajectory = np.arange(logp.shape[0]) if trajectory is None else np.asarray(trajectory)
    by_row, by_trajectory = {}, {}
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            rho = np.exp(logp[i, t] - old[i, t])
            term = -min(rho * adv[i], np.clip(rho, 1 - eps_low, 1 + eps_high) * adv[i])
            by_row.setdefault(i, []).append(term)
            by_trajectory.setdefault(trajectory[i], []).append(term)
    groups = {"sequence_mean": by_row, "trajectory_mean": by_trajectory}.get(aggregation)
    if groups is None:
        terms = [x for v in by_row.values() for x in v]
        return sum(terms) / len(terms)
    return sum(sum(v) / len(v) for v in groups.values()) / len(groups)


def _row_weights(mask, trajectory):
    """1 / policy tokens of each row's trajectory (what build_grpo_batch writes)."""
    tokens = {j: mask[np.asarray(trajectory) == j].sum() for j in set(trajectory)}
    return np.asarray([1.0 / max(tokens[j], 1.0) for j in trajectory], np.float32)


def test_group_advantages_match_numpy():
    scores = np.array([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5], np.float32)
    adv = np.asarray(group_advantages(jnp.asarray(scores), 4))
    for g in range(2):
        s = scores[4 * g:4 * g + 4]
        np.testing.assert_allclose(adv[4 * g:4 * g + 4], (s - s.mean()) / (s.std() + 1e-6), rtol=1e-5, atol=1e-6)
    assert np.all(adv[4:] == 0.0)  # equal scores: no signal, no NaN
    no_std = np.asarray(group_advantages(jnp.asarray(scores), 4, normalize_std=False))
    np.testing.assert_allclose(no_std[:4], scores[:4] - scores[:4].mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="groups"):
        group_advantages(jnp.ones(6), 4)


@pytest.mark.parametrize("aggregation", ["trajectory_mean", "sequence_mean", "token_mean"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_loss_matches_numpy_reference(aggregation, eps_high):
    rng = np.random.default_rng(0)
    b, t = 6, 9
    logp = rng.normal(-2, 0.5, (b, t)).astype(np.float32)
    old = (logp + rng.normal(0, 0.4, (b, t))).astype(np.float32)
    mask = (rng.random((b, t)) < 0.6).astype(np.float32)
    mask[2] = 0  # a turn with no policy tokens
    trajectory = [0, 0, 0, 1, 2, 2]  # three trajectories of 3, 1 and 2 turns
    adv = rng.normal(0, 1, 3).astype(np.float32)[trajectory]  # every turn takes its trajectory's
    cfg = GRPOConfig(epsilon=0.2, epsilon_high=eps_high, aggregation=aggregation)
    loss_sum, denom, metrics = grpo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), cfg,
                                         row_weights=jnp.asarray(_row_weights(mask, trajectory)))
    expected = _numpy_reference(logp, old, adv, mask, 0.2, eps_high or 0.2, aggregation, trajectory)
    assert float(loss_sum / denom) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["policy_tokens"]) == mask.sum()


def test_masked_tokens_never_contribute_to_loss_or_gradient():
    rng = np.random.default_rng(1)
    logp = jnp.asarray(rng.normal(-2, 0.5, (2, 6)), jnp.float32)
    old = logp - 0.1
    adv = jnp.asarray([1.0, -1.0])
    mask = jnp.asarray([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]], jnp.float32)
    cfg = GRPOConfig()
    weights = jnp.asarray(_row_weights(np.asarray(mask), [0, 1]))
    fn = lambda lp: (lambda s, d, m: s / d)(*grpo_loss(lp, old, adv, mask, cfg, row_weights=weights))
    grad = jax.grad(fn)(logp)
    assert np.all(np.asarray(grad)[np.asarray(mask) == 0] == 0.0)
    # Garbage in observation positions changes nothing.
    poisoned = jnp.where(mask > 0, logp, 1e3)
    assert float(fn(poisoned)) == pytest.approx(float(fn(logp)), rel=1e-6)
    stats = grpo_loss(poisoned, old, adv, mask, cfg, row_weights=weights)[2]
    assert float(stats["ratio_max"]) < 2.0  # ratio stats ignore masked positions


def test_sum_and_denominator_exact_under_accumulation():
    rng = np.random.default_rng(2)
    logp = jnp.asarray(rng.normal(-2, 0.5, (8, 5)), jnp.float32)
    old = logp + 0.05
    adv = jnp.asarray(rng.normal(0, 1, 8), jnp.float32)
    mask = jnp.asarray(rng.random((8, 5)) < 0.7, jnp.float32)
    weights = jnp.asarray(_row_weights(np.asarray(mask), [0, 0, 0, 1, 1, 2, 3, 3]))
    for agg in ("trajectory_mean", "sequence_mean", "token_mean"):
        cfg = GRPOConfig(aggregation=agg)
        s, d, _ = grpo_loss(logp, old, adv, mask, cfg, row_weights=weights)
        parts = [grpo_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], cfg, row_weights=weights[i:i + 2])
                 for i in range(0, 8, 2)]
        assert float(sum(p[0] for p in parts) / sum(p[1] for p in parts)) == pytest.approx(float(s / d), rel=1e-6)


def test_kl_term_k3():
    logp = jnp.log(jnp.asarray([[0.5, 0.25]]))
    ref = jnp.log(jnp.asarray([[0.25, 0.25]]))
    mask = jnp.ones((1, 2))
    cfg = GRPOConfig(beta=0.1, aggregation="token_mean")
    s, d, m = grpo_loss(logp, logp, jnp.zeros(1), mask, cfg, ref_logprobs=ref)
    k3 = np.array([0.5 - np.log(0.5) - 1, 0.0])  # r = ref/pi: 0.5 and 1
    assert float(m["kl"]) == pytest.approx(k3.mean(), rel=1e-5)
    assert float(s / d) == pytest.approx(0.1 * k3.mean(), rel=1e-5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logp, logp, jnp.zeros(1), mask, cfg)


def test_chunked_logprobs_equal_full_log_softmax():
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.normal(size=(2, 13, 8)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(8, 31)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 31, (2, 13)), jnp.int32)
    logits_fn = lambda h: h @ head
    lp, ent = chunked_token_logprobs(logits_fn, hidden, targets, chunk_size=4)
    full = jax.nn.log_softmax(hidden @ head, -1)
    np.testing.assert_allclose(lp, jnp.take_along_axis(full, targets[..., None], -1)[..., 0], atol=1e-5)
    np.testing.assert_allclose(ent, -(jnp.exp(full) * full).sum(-1), atol=1e-5)


def test_sampling_logits_follow_the_rollout_temperature():
    """Rollouts at temperature T are trained under log_softmax(logits / T), the distribution the
    sampler drew from (its reported log-probs), not the temperature-1 model."""
    from ibis_jax.rl.loss import sampling_logits

    rng = np.random.default_rng(4)
    head = jnp.asarray(rng.normal(size=(8, 31)), jnp.float32)

    class Head:
        def logits(self, h):
            return h @ head

    hidden = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 31, (2, 5)), jnp.int32)
    for temperature in (1.0, 0.7):
        lp, _ = chunked_token_logprobs(sampling_logits(Head(), temperature), hidden, targets, chunk_size=4)
        full = jax.nn.log_softmax((hidden @ head) / temperature, -1)
        np.testing.assert_allclose(lp, jnp.take_along_axis(full, targets[..., None], -1)[..., 0], atol=1e-5)
    # Suppressed ids (what the policy never samples) get probability 0; the rest renormalises.
    banned = [3, 7]
    keep = targets % 29 + 2
    keep = jnp.where((keep == 3) | (keep == 7), 0, keep)
    lp, ent = chunked_token_logprobs(sampling_logits(Head(), 0.7, banned), hidden, keep, chunk_size=4)
    masked = (hidden @ head).at[..., jnp.asarray(banned)].set(-jnp.inf)
    full = jax.nn.log_softmax(masked / 0.7, -1)
    np.testing.assert_allclose(lp, jnp.take_along_axis(full, keep[..., None], -1)[..., 0], atol=1e-5)
    assert np.all(np.isfinite(np.asarray(ent)))
    with pytest.raises(ValueError, match="temperature"):
        sampling_logits(Head(), 0.0)
