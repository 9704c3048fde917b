"""The distribution a policy samples from, shared by the sampler and the RL losses: logits with
suppressed token ids (e.g. the multimodal placeholders a rollout must never sample) pushed to
``SUPPRESSED``, then divided by the temperature. Both sides of a GRPO ratio must score exactly it."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

SUPPRESSED = -1e9


def suppress(logits: jax.Array, token_ids: Sequence[int]) -> jax.Array:
    """logits [..., V] with the given token columns set to SUPPRESSED (ids past V are ignored)."""
    ids = [t for t in token_ids if 0 <= t < logits.shape[-1]]
    return logits if not ids else logits.at[..., jnp.asarray(ids)].set(SUPPRESSED)
