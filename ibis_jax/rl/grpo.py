"""GRPO's pure pieces (paper Eqs. 2-3, SPEC section 5): group advantages and the clipped loss.

Everything here is a pure function of arrays, jit-able and independent of the model, so a
researcher can read, test and swap each piece. Shapes: ``B`` sequences (``num_prompts * G``
rollouts, grouped contiguously), ``T`` tokens.

The loss returns an unreduced sum and its denominator (tunix's convention), so the token-mean
or sequence-mean stays exact when a batch is split into micro-batches for gradient accumulation:
sum the sums, sum the denominators, divide once.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from ibis_jax.train.loss import chunked_token_logprobs


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 4  # G rollouts per prompt
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip; None = epsilon (symmetric, as the paper)
    beta: float = 0.0  # KL weight to the frozen reference (k3 estimator); 0 as the paper
    normalize_std: bool = True  # A = (S - mean) / std; False: A = S - mean (Dr. GRPO style)
    # trajectory_mean (paper Eq. 2): each trajectory's token mean over all its turns, averaged over
    # trajectories; sequence_mean: each row's (turn's) token mean, averaged over rows, so a
    # trajectory of k turns weighs k times; token_mean: every policy token alike.
    aggregation: Literal["trajectory_mean", "sequence_mean", "token_mean"] = "trajectory_mean"
    std_eps: float = 1e-6


def group_advantages(scores: jax.Array, group_size: int, normalize_std: bool = True, eps: float = 1e-6) -> jax.Array:
    """``A_i = (S_i - mean(S_group)) / std(S_group)`` over contiguous groups of ``group_size``.

    ``scores``: ``float32 [B]`` with ``B % group_size == 0``. A group whose scores are all equal
    gets advantage 0 (nothing to learn from it), not NaN.
    """
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    grouped = scores.reshape(-1, group_size)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    if normalize_std:
        centred = centred / (grouped.std(axis=1, keepdims=True) + eps)
    return centred.reshape(-1)


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
    ``sequence_mean``: per-row token means summed, denominator = rows with at least one token.
    ``token_mean``: all tokens summed, denominator = their count.
    """
    mask = loss_mask.astype(jnp.float32)
    # Masked positions are zeroed *before* exp: garbage there (padding, observation tokens) must
    # not become inf * 0 = NaN in the loss or its gradient.
    ratio = jnp.exp(jnp.where(mask > 0, logprobs - old_logprobs, 0.0))
    high = config.epsilon if config.epsilon_high is None else config.epsilon_high
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - config.epsilon, 1.0 + high) * adv
    per_token = -jnp.minimum(unclipped, clipped)
    kl = jnp.zeros_like(per_token)
    if config.beta > 0.0:
        if ref_logprobs is None:
            raise ValueError("GRPOConfig.beta > 0 needs ref_logprobs")
        log_r = jnp.where(mask > 0, ref_logprobs - logprobs, 0.0)
        kl = jnp.exp(log_r) - log_r - 1.0  # k3: unbiased, non-negative
        per_token = per_token + config.beta * kl
    tokens = mask.sum(axis=1)
    has_tokens = (tokens > 0).astype(jnp.float32)
    if config.aggregation == "trajectory_mean":
        if row_weights is None:
            raise ValueError("GRPOConfig.aggregation 'trajectory_mean' needs row_weights (1 / trajectory tokens)")
        weighted = mask * row_weights[:, None]
        loss_sum = (per_token * weighted).sum()
        denominator = weighted.sum()
    elif config.aggregation == "sequence_mean":
        loss_sum = ((per_token * mask).sum(axis=1) / jnp.maximum(tokens, 1.0)).sum()
        denominator = has_tokens.sum()
    elif config.aggregation == "token_mean":
        loss_sum = (per_token * mask).sum()
        denominator = mask.sum()
    else:
        raise ValueError(f"unknown aggregation {config.aggregation!r}")
    n = jnp.maximum(mask.sum(), 1.0)
    was_clipped = ((ratio < 1.0 - config.epsilon) & (adv < 0)) | ((ratio > 1.0 + high) & (adv > 0))
    metrics = {
        "clip_fraction": (was_clipped * mask).sum() / n,
        "ratio_mean": (ratio * mask).sum() / n,
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
