"""GRPO as a registered loss of the shared train step (``ibis_jax.train.step``).

``grpo`` reads a micro-batch of :class:`~ibis_jax.rl.batch.GRPOBatch` fields plus
``old_logprobs`` (recomputed by the trainer under the parameters that generated the rollouts) and
returns ``(loss_sum, denominator, aux)`` like every loss, so gradient accumulation, the optimizer,
checkpointing and logging are SFT's.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ibis_jax.models.logits import suppress
from ibis_jax.rl.grpo import GRPOConfig, grpo_loss
from ibis_jax.train.loss import chunked_token_logprobs
from ibis_jax.train.loss import register_loss


def sampling_logits(model, temperature: float = 1.0, suppressed: Sequence[int] = ()):
    """The LM head of the distribution rollouts sample from: logits / temperature, with the
    ``suppressed`` ids (the policy's, by default the model's multimodal placeholders) at
    ``SUPPRESSED``. The ratio's numerator and denominator must both be that distribution, else a
    rollout at temperature < 1 is trained as if it came from the temperature-1 policy."""
    if temperature <= 0:
        raise ValueError(f"GRPO rollouts need a sampling temperature > 0, got {temperature}")
    return lambda h: suppress(model.logits(h), suppressed) / temperature


def make_grpo_loss(config: GRPOConfig, chunk_size: int = 256, temperature: float = 1.0,
                   suppressed: Sequence[int] = ()):
    """``loss_fn(model, micro_batch) -> (loss_sum, denominator, aux)`` for ``config``; log-probs
    under the rollouts' sampling distribution (``temperature``, ``suppressed`` ids)."""

    def loss_fn(model, batch):
        hidden = model.hidden_states(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"],
            vision_layout=batch["vision_layout"],
        )
        logp, entropy = chunked_token_logprobs(sampling_logits(model, temperature, suppressed), hidden,
                                               batch["targets"], chunk_size)
        ref = batch.get("ref_logprobs")
        # Without old log-probs (one update per rollout batch) the parameters that sampled are
        # these: pi_old is this pass's own log-probs, held constant, and the ratio is exactly 1.
        old = batch["old_logprobs"] if "old_logprobs" in batch else jax.lax.stop_gradient(logp)
        loss_sum, denom, m = grpo_loss(logp, old, batch["advantages"], batch["loss_mask"],
                                       config, ref_logprobs=ref, row_weights=batch.get("row_weights"))
        mask = batch["loss_mask"].astype(jnp.float32)
        n = mask.sum()
        aux = {
            "clip_fraction": (m["clip_fraction"] * n, n),
            "ratio_mean": (m["ratio_mean"] * n, n),
            "ratio_abs_dev": (m["ratio_abs_dev"] * n, n),
            "kl": (m["kl"] * n, n),
            "entropy": ((entropy * mask).sum(), n),
            "policy_tokens": n,
        }
        if "sampler_logprobs" in batch:  # max |pi_old - sampler| over the policy tokens
            aux["sampler_vs_old_logprob_max_abs"] = jnp.max(jnp.abs(old - batch["sampler_logprobs"]) * mask)
        return loss_sum, denom, aux

    return loss_fn


def make_token_logprobs(model_def, temperature: float = 1.0, suppressed: Sequence[int] = (), chunk_size: int = 256):
    """``fn(params, frozen, batch) -> float32 [A, b, S]``: the log-probs of every micro-batch's
    ``targets`` under ``params`` (the sampling policy: the ratio's denominator; or the frozen
    reference: the KL term) and the rollouts' sampling distribution. The trainer jits it with the
    mesh's shardings; ``ibis-jax plan`` compiles the same function."""

    def token_logprobs(params, frozen, batch):
        def one(mb):
            # Built inside the mapped body: a module made outside it lives at the outer trace level,
            # and nnx.remat (remat=True) may not touch its parameters from inside lax.map.
            policy = model_def.build(params, frozen)
            hidden = policy.hidden_states(mb["input_ids"], mb["attention_mask"], mb["pixel_values"],
                                          mb["image_grid_thw"], vision_layout=mb["vision_layout"])
            return chunked_token_logprobs(sampling_logits(policy, temperature, suppressed), hidden, mb["targets"],
                                          chunk_size)[0]

        return jax.lax.map(one, batch)

    return token_logprobs


register_loss("grpo")(make_grpo_loss(GRPOConfig()))
