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
    cfg = GRPOConfig(epsilon_low=0.2, epsilon_high=eps_high, aggregation=aggregation)
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


# -- the registered knobs, each against a numpy transcription of its formula ----------------------

def test_advantage_estimators_match_numpy():
    from ibis_jax.rl.grpo import ADVANTAGES, compute_advantages

    scores = np.array([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5], np.float32)
    g = 4
    expected = {"grpo": [], "grpo_no_std": [], "rloo": []}
    for k in range(2):
        s = scores[g * k:g * k + g].astype(np.float64)
        expected["grpo"] += list((s - s.mean()) / (s.std() + 1e-6))
        expected["grpo_no_std"] += list(s - s.mean())
        expected["rloo"] += [s[i] - (s.sum() - s[i]) / (g - 1) for i in range(g)]
    assert sorted(ADVANTAGES) == ["grpo", "grpo_no_std", "rloo"]
    for name, want in expected.items():
        got = np.asarray(compute_advantages(scores, GRPOConfig(group_size=g, advantage=name)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    # RLOO is the centred score scaled by G / (G - 1)
    np.testing.assert_allclose(expected["rloo"][:4], np.asarray(expected["grpo_no_std"][:4]) * g / (g - 1), rtol=1e-6)


def test_zero_variance_groups_and_minibatch_split():
    from ibis_jax.rl.grpo import minibatch_indices, nonzero_variance_groups

    keep = nonzero_variance_groups(np.array([1, 1, 1, 1, 0, 1, 0, 0, 2, 2, 2, 2.0000001]), 4)
    assert keep.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    parts = minibatch_indices(11, 4, seed=3)
    assert [len(p) for p in parts] == [3, 3, 3, 2]
    assert sorted(np.concatenate(parts).tolist()) == list(range(11))  # each turn exactly once
    assert all((a == b).all() for a, b in zip(parts, minibatch_indices(11, 4, seed=3)))  # seeded
    assert len(minibatch_indices(2, 4, seed=0)) == 2


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_numpy(estimator):
    rng = np.random.default_rng(5)
    logp = rng.normal(-2, 0.5, (3, 7)).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, (3, 7))).astype(np.float32)
    mask = (rng.random((3, 7)) < 0.7).astype(np.float32)
    log_r = ref - logp  # log(pi_ref / pi)
    want = {"k1": -log_r, "k2": 0.5 * log_r ** 2, "k3": np.exp(log_r) - 1 - log_r}[estimator]
    want = (want * mask).sum() / mask.sum()
    cfg = GRPOConfig(beta=0.5, kl_estimator=estimator, aggregation="token_mean")
    s, d, m = grpo_loss(jnp.asarray(logp), jnp.asarray(logp), jnp.zeros(3), jnp.asarray(mask), cfg,
                        ref_logprobs=jnp.asarray(ref))
    assert float(m["kl"]) == pytest.approx(want, rel=1e-5)
    assert float(s / d) == pytest.approx(0.5 * want, rel=1e-5)  # advantage 0: only the KL term


def test_dr_grpo_constant_normaliser_matches_numpy_and_splits_exactly():
    rng = np.random.default_rng(6)
    b, t = 6, 9
    logp = rng.normal(-2, 0.5, (b, t)).astype(np.float32)
    old = (logp + rng.normal(0, 0.4, (b, t))).astype(np.float32)
    mask = (rng.random((b, t)) < 0.6).astype(np.float32)
    trajectory = [0, 0, 0, 1, 2, 2]
    adv = rng.normal(0, 1, 3).astype(np.float32)[trajectory]
    cfg = GRPOConfig(epsilon_low=0.2, epsilon_high=0.28, aggregation="dr_grpo", dr_grpo_norm=40.0)
    terms = {}
    for i in range(b):
        for j in range(t):
            if mask[i, j]:
                rho = np.exp(logp[i, j] - old[i, j])
                terms.setdefault(trajectory[i], []).append(-min(rho * adv[i], np.clip(rho, 0.8, 1.28) * adv[i]))
    want = sum(sum(v) / 40.0 for v in terms.values()) / len(terms)  # (1/G) sum_i (1/L) sum_t
    weights = jnp.asarray(_row_weights(mask, trajectory))
    args = [jnp.asarray(x) for x in (logp, old, adv, mask)]
    s, d, _ = grpo_loss(*args, cfg, row_weights=weights)
    assert float(s / d) == pytest.approx(want, rel=1e-5)
    parts = [grpo_loss(*(x[i:i + 2] for x in args), cfg, row_weights=weights[i:i + 2]) for i in range(0, b, 2)]
    assert float(sum(p[0] for p in parts) / sum(p[1] for p in parts)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="dr_grpo_norm"):
        grpo_loss(*args, GRPOConfig(aggregation="dr_grpo"), row_weights=weights)


def test_clip_higher_clips_asymmetrically_and_counts_clipped_tokens():
    # ratios 0.7, 0.9, 1.1, 1.25, 1.4 with advantage +1 then -1
    ratios = np.array([0.7, 0.9, 1.1, 1.25, 1.4], np.float32)
    old = np.zeros((2, 5), np.float32)
    logp = np.log(np.stack([ratios, ratios]))
    mask = np.ones((2, 5), np.float32)
    adv = np.array([1.0, -1.0], np.float32)
    cfg = GRPOConfig(epsilon_low=0.2, epsilon_high=0.28, aggregation="token_mean")
    _, _, m = grpo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), cfg)
    # A > 0: clipped above 1.28 (only 1.4); A < 0: clipped below 0.8 (only 0.7). Symmetric 0.2: 1.25 too.
    assert float(m["clip_fraction"]) == pytest.approx(2 / 10)
    _, _, sym = grpo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                          GRPOConfig(epsilon_low=0.2, aggregation="token_mean"))
    assert float(sym["clip_fraction"]) == pytest.approx(3 / 10)
    assert float(m["ratio_abs_dev"]) == pytest.approx(np.abs(ratios - 1).mean(), rel=1e-5)


def test_config_names_unknown_knobs():
    with pytest.raises(ValueError, match="advantage='ppo'.*grpo_no_std"):
        GRPOConfig(advantage="ppo")
    with pytest.raises(ValueError, match="kl_estimator"):
        GRPOConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match="rloo"):
        GRPOConfig(group_size=1, advantage="rloo")
