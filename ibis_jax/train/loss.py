"""The SFT loss: weighted token cross-entropy as (sum, denominator), plus action-token accuracy.

Registered by name (tunix style) so a config or the GRPO trainer can pick a loss. Every loss has
the signature `loss_fn(model, micro_batch) -> (loss_sum, denominator, aux)`; the train step sums
sums and denominators over micro-batches and divides once, so the token mean is exact under
gradient accumulation. `aux` maps a metric name to a (numerator, denominator) pair (reported as
their ratio over the whole step) or to a scalar (reported as its sum over the step).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

LossAux = dict[str, "jax.Array | tuple[jax.Array, jax.Array]"]
LossFn = Callable[..., tuple[jax.Array, jax.Array, LossAux]]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return wrap


def chunked_nll(
    logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array, chunk_size: int = 512
) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and argmax hit, without materialising [B, S, V].

    hidden [B, S, D]; targets [B, S] int; logits_fn maps [B, C, D] -> [B, C, V] (the LM head).
    Returns (nll [B, S] fp32, correct [B, S] bool). Chunks run under lax.map, so the peak holds
    [B, chunk, V] logits (152k vocab x 4k tokens would be 2.4 GB per sequence otherwise).
    """
    b, s, d = hidden.shape
    chunk = min(chunk_size, s)
    pad = (-s) % chunk
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, chunk).swapaxes(0, 1)

    def one(args):
        h_c, t_c = args
        logits = logits_fn(h_c).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        return lse - picked, jnp.argmax(logits, axis=-1) == t_c

    nll, correct = jax.lax.map(one, (h, t))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, -1)[:, :s]
    return unchunk(nll), unchunk(correct)


@register_loss("sft")
def sft_loss(model, batch: dict[str, jax.Array], chunk_size: int = 512) -> tuple[jax.Array, jax.Array, LossAux]:
    """Weighted token-mean cross-entropy over one micro-batch (pipeline layout without the accum axis).

    loss_sum = sum_i w_i * nll_i; denominator = sum_i w_i (w = 0 on prompt, user, image, padding
    tokens and on deliberately wrong turns). Accuracy: argmax hits on weighted <action> tokens.
    """
    hidden = model.hidden_states(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"],
        vision_layout=batch["vision_layout"],
    )
    nll, correct = chunked_nll(model.logits, hidden, batch["targets"], chunk_size)
    w = batch["weights"].astype(jnp.float32)
    act = batch["action_mask"].astype(jnp.float32)
    image_tokens = jnp.sum(batch["input_ids"] == model.config.image_token_id)
    aux = {
        "action_accuracy": ((correct * act).sum(), act.sum()),
        "token_accuracy": ((correct * (w > 0)).sum(), (w > 0).sum()),
        "loss_tokens": (w > 0).sum(),
        "text_tokens": batch["attention_mask"].sum() - image_tokens,
        "image_tokens": image_tokens,
    }
    return (w * nll).sum(), w.sum(), aux
