"""GRPO's pure pieces (paper Eqs. 2-3, docs/design.md section 5): group advantages and the clipped loss.

Everything here is a pure function of arrays, jit-able and independent of the model, so a
researcher can read, test and swap each piece. Shapes: ``B`` sequences (``num_prompts * G``
rollouts, grouped contiguously), ``T`` tokens.

The loss returns an unreduced sum and its denominator (tunix's convention), so the token-mean
or sequence-mean stays exact when a batch is split into micro-batches for gradient accumulation:
sum the sums, sum the denominators, divide once.

Algorithm knobs are registered by name (``ADVANTAGES``, ``AGGREGATIONS``, ``KL_ESTIMATORS``;
add one with the ``register_*`` decorators) and chosen in :class:`GRPOConfig`:

- advantages (``advantage``): ``grpo`` ``(S - mean) / (std + eps)`` (paper Eq. 3), ``grpo_no_std``
  ``S - mean`` (Dr. GRPO), ``rloo`` ``S_i - mean_{j != i} S_j`` (leave-one-out baseline);
  ``skip_zero_variance`` drops groups whose scores are all equal (they carry advantage 0 anyway,
  but still count in the loss denominator: DAPO's dynamic-sampling filter without resampling);
- clip (``epsilon_low``, ``epsilon_high``): ratio clipped to ``[1 - eps_low, 1 + eps_high]``;
  ``epsilon_high > epsilon_low`` is DAPO's "clip-higher";
- loss aggregation (``aggregation``): ``trajectory_mean`` (paper Eq. 2, default: each
  trajectory's token mean over all its turns, averaged over trajectories), ``token_mean`` (every
  policy token of the batch alike, DAPO), ``sequence_mean`` (each row's token mean, rows being
  turns), ``dr_grpo`` (token sums over a constant ``dr_grpo_norm`` per trajectory, Dr. GRPO);
- KL to the frozen initial policy (``beta`` > 0, ``kl_estimator`` ``k1`` | ``k2`` | ``k3``, with
  ``log r = log pi_ref - log pi``: k1 ``-log r``, k2 ``(log r)^2 / 2``, k3 ``r - 1 - log r``);
- several optimizer passes per rollout batch (``num_iterations`` passes, each over
  ``mini_batches`` shuffled mini-batches of rows: :func:`minibatch_indices`): after the first
  update the ratio leaves 1 and the clip engages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

AdvantageFn = Callable[[jax.Array, int, float], jax.Array]
AggregationFn = Callable[..., tuple[jax.Array, jax.Array]]
KLFn = Callable[[jax.Array], jax.Array]

ADVANTAGES: dict[str, AdvantageFn] = {}
AGGREGATIONS: dict[str, AggregationFn] = {}
KL_ESTIMATORS: dict[str, KLFn] = {}


def _registrar(table: dict, kind: str):
    def register(name: str):
        def deco(fn):
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered")
            table[name] = fn
            return fn
        return deco
    return register


register_advantage = _registrar(ADVANTAGES, "advantage estimator")
register_aggregation = _registrar(AGGREGATIONS, "loss aggregation")
register_kl = _registrar(KL_ESTIMATORS, "KL estimator")

from ibis_jax.train.loss import chunked_token_logprobs


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 4  # G rollouts per prompt
    epsilon_low: float = 0.2  # ratio >= 1 - epsilon_low
    epsilon_high: float | None = None  # ratio <= 1 + epsilon_high; None = epsilon_low (the paper); 0.28: clip-higher
    advantage: str = "grpo"  # a name in ADVANTAGES: grpo | grpo_no_std | rloo
    skip_zero_variance: bool = False  # drop groups whose scores are all equal from the batch
    aggregation: str = "trajectory_mean"  # a name in AGGREGATIONS: trajectory_mean | token_mean | sequence_mean | dr_grpo
    dr_grpo_norm: float = 0.0  # dr_grpo's constant tokens per trajectory; 0: max_new_tokens * max_turns
    beta: float = 0.0  # KL weight to the frozen initial policy; 0 as the paper (no reference kept)
    kl_estimator: str = "k3"  # a name in KL_ESTIMATORS: k1 | k2 | k3
    num_iterations: int = 1  # optimizer passes over each rollout batch (mu of DeepSeekMath)
    mini_batches: int = 1  # optimizer steps per pass: the batch's turns shuffled and split
    std_eps: float = 1e-6

    def __post_init__(self):
        for field, table in (("advantage", ADVANTAGES), ("aggregation", AGGREGATIONS), ("kl_estimator", KL_ESTIMATORS)):
            value = getattr(self, field)
            if value not in table:
                raise ValueError(f"GRPOConfig.{field}={value!r}: choose one of {sorted(table)}")
        if self.group_size < 1 or self.num_iterations < 1 or self.mini_batches < 1:
            raise ValueError("GRPOConfig group_size, num_iterations and mini_batches must be >= 1")
        if self.advantage == "rloo" and self.group_size < 2:
            raise ValueError("GRPOConfig.advantage 'rloo' needs group_size >= 2")

    @property
    def clip_high(self) -> float:
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @property
    def updates_per_batch(self) -> int:
        return self.num_iterations * self.mini_batches


def _grouped(scores: jax.Array, group_size: int) -> jax.Array:
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    return scores.reshape(-1, group_size)


def group_advantages(scores: jax.Array, group_size: int, normalize_std: bool = True, eps: float = 1e-6) -> jax.Array:
    """``A_i = (S_i - mean(S_group)) / std(S_group)`` over contiguous groups of ``group_size``.

    ``scores``: ``float32 [B]`` with ``B % group_size == 0``. A group whose scores are all equal
    gets advantage 0 (nothing to learn from it), not NaN.
    """
    grouped = _grouped(scores, group_size)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    if normalize_std:
        centred = centred / (grouped.std(axis=1, keepdims=True) + eps)
    return centred.reshape(-1)


@register_advantage("grpo")
def grpo_advantages(scores: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
    return group_advantages(scores, group_size, True, eps)


@register_advantage("grpo_no_std")
def grpo_no_std_advantages(scores: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
    return group_advantages(scores, group_size, False, eps)


@register_advantage("rloo")
def rloo_advantages(scores: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
    """``A_i = S_i - (sum_j S_j - S_i) / (G - 1)`` (REINFORCE leave-one-out)."""
    grouped = _grouped(scores, group_size)
    others = (grouped.sum(axis=1, keepdims=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def compute_advantages(scores, config: GRPOConfig) -> jax.Array:
    """The configured estimator on ``float32 [B]`` scores grouped contiguously."""
    return ADVANTAGES[config.advantage](jnp.asarray(scores, jnp.float32), config.group_size, config.std_eps)


def nonzero_variance_groups(scores, group_size: int, tol: float = 1e-6) -> np.ndarray:
    """``bool [B]``: whether each score's group has any spread (``max - min > tol``)."""
    grouped = np.asarray(scores, np.float32).reshape(-1, group_size)
    keep = (grouped.max(axis=1) - grouped.min(axis=1)) > tol
    return np.repeat(keep, group_size)


def minibatch_indices(num_items: int, mini_batches: int, seed: int) -> list[np.ndarray]:
    """A seeded shuffle of ``range(num_items)`` split into ``min(mini_batches, num_items)`` parts
    of near-equal size: each item (a policy turn) lands in exactly one mini-batch."""
    if num_items < 1:
        raise ValueError("minibatch_indices: nothing to split")
    order = np.random.default_rng(seed).permutation(num_items)
    return [part for part in np.array_split(order, min(mini_batches, num_items))]


@register_kl("k1")
def kl_k1(log_r: jax.Array) -> jax.Array:
    return -log_r


@register_kl("k2")
def kl_k2(log_r: jax.Array) -> jax.Array:
    return 0.5 * jnp.square(log_r)


@register_kl("k3")
def kl_k3(log_r: jax.Array) -> jax.Array:
    return jnp.exp(log_r) - log_r - 1.0  # unbiased, non-negative


@register_aggregation("trajectory_mean")
def _trajectory_mean(per_token, mask, row_weights, config):
    if row_weights is None:
        raise ValueError("GRPOConfig.aggregation 'trajectory_mean' needs row_weights (1 / trajectory tokens)")
    weighted = mask * row_weights[:, None]
    return (per_token * weighted).sum(), weighted.sum()


@register_aggregation("sequence_mean")
def _sequence_mean(per_token, mask, row_weights, config):
    tokens = mask.sum(axis=1)
    return ((per_token * mask).sum(axis=1) / jnp.maximum(tokens, 1.0)).sum(), (tokens > 0).astype(jnp.float32).sum()


@register_aggregation("token_mean")
def _token_mean(per_token, mask, row_weights, config):
    return (per_token * mask).sum(), mask.sum()


@register_aggregation("dr_grpo")
def _dr_grpo(per_token, mask, row_weights, config):
    """``(1/G) sum_i (1/L) sum_t``: token sums over a constant L per trajectory. The trajectory
    count is ``sum(mask * row_weights)`` (each trajectory's rows add up to 1), so the
    denominator splits exactly over micro-batches like the others."""
    if row_weights is None:
        raise ValueError("GRPOConfig.aggregation 'dr_grpo' needs row_weights (1 / trajectory tokens)")
    if config.dr_grpo_norm <= 0:
        raise ValueError("GRPOConfig.aggregation 'dr_grpo' needs dr_grpo_norm > 0 (the trainer sets "
                         "max_new_tokens * max_turns)")
    return (per_token * mask).sum(), (mask * row_weights[:, None]).sum() * config.dr_grpo_norm


def grpo_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    loss_mask: jax.Array,
    config: GRPOConfig,
    ref_logprobs: jax.Array | None = None,
    row_weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The clipped surrogate over the policy's own tokens.

    Args:
      logprobs: ``[B, T]`` log pi_theta of each target token (differentiated).
      old_logprobs: ``[B, T]`` log pi_old, recomputed by the trainer before the update.
      advantages: ``[B]`` per-sequence advantages.
      loss_mask: ``[B, T]`` 1 on assistant tokens the policy sampled, 0 on prompt, observation,
        tool, padding tokens: those never enter the loss, the ratio stats or the denominator.
      ref_logprobs: ``[B, T]`` under the frozen reference, needed when ``config.beta > 0``.
      row_weights: ``[B]`` the weight of each token of a row, ``1 / N_i`` with ``N_i`` the policy
        tokens of the row's whole trajectory (all its turns); needed for ``trajectory_mean``.

    Returns ``(loss_sum, denominator, metrics)``; the loss is ``loss_sum / denominator``.
    ``trajectory_mean`` (paper): ``-(1/G) sum_i (1/N_i) sum_t ...`` over the tokens of all turns
    of trajectory i -> tokens weighted by ``row_weights``, denominator = the sum of those weights
    = the number of trajectories (exact under micro-batching: each micro-batch adds its share).
    The others: see the module docstring and ``AGGREGATIONS``.
    """
    mask = loss_mask.astype(jnp.float32)
    # Masked positions are zeroed *before* exp: garbage there (padding, observation tokens) must
    # not become inf * 0 = NaN in the loss or its gradient.
    ratio = jnp.exp(jnp.where(mask > 0, logprobs - old_logprobs, 0.0))
    low, high = config.epsilon_low, config.clip_high
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - low, 1.0 + high) * adv
    per_token = -jnp.minimum(unclipped, clipped)
    kl = jnp.zeros_like(per_token)
    if config.beta > 0.0:
        if ref_logprobs is None:
            raise ValueError("GRPOConfig.beta > 0 needs ref_logprobs")
        log_r = jnp.where(mask > 0, ref_logprobs - logprobs, 0.0)
        kl = KL_ESTIMATORS[config.kl_estimator](log_r)
        per_token = per_token + config.beta * kl
    loss_sum, denominator = AGGREGATIONS[config.aggregation](per_token, mask, row_weights, config)
    n = jnp.maximum(mask.sum(), 1.0)
    # A token is clipped when the clipped branch is the active (smaller) one: no gradient flows.
    was_clipped = ((ratio < 1.0 - low) & (adv < 0)) | ((ratio > 1.0 + high) & (adv > 0))
    metrics = {
        "clip_fraction": (was_clipped * mask).sum() / n,
        "ratio_mean": (ratio * mask).sum() / n,
        "ratio_abs_dev": (jnp.abs(ratio - 1.0) * mask).sum() / n,  # 0 on the first update of a batch
        "ratio_max": jnp.where(mask > 0, ratio, -jnp.inf).max(),
        "ratio_min": jnp.where(mask > 0, ratio, jnp.inf).min(),
        "kl": (kl * mask).sum() / n,
        "policy_tokens": mask.sum(),
    }
    return loss_sum, denominator, metrics


def policy_logprobs(model, batch, vision_layout=None, chunk_size: int = 256) -> tuple[jax.Array, jax.Array]:
    """Log-probs and entropy ``[B, S]`` of ``batch.targets`` under ``model`` (a ``Qwen25VL``),
    from its final hidden states chunk by chunk (``[B, S, vocab]`` is never built whole)."""
    hidden = model.hidden_states(
        batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw,
        vision_layout=vision_layout,
    )
    return chunked_token_logprobs(model.logits, hidden, batch.targets, chunk_size)
