"""The SFT loss: weighted token cross-entropy as (sum, denominator), plus action-token accuracy.

Registered by name (tunix style) so a config or the GRPO trainer can pick a loss. Every loss has
the signature `loss_fn(model, micro_batch) -> (loss_sum, denominator, aux)`; the train step sums
sums and denominators over micro-batches and divides once, so the token mean is exact under
gradient accumulation. `aux` maps a metric name to a (numerator, denominator) pair (reported as
their ratio over the whole step) or to a scalar (reported as its sum over the step; a name ending
in ``_max_abs`` as its maximum).
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


def chunked_token_logprobs(
    logits_fn: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    targets: jax.Array,
    chunk_size: int = 256,
    *,
    hits: bool = False,
):
    """Per-token log-probabilities of ``targets`` and entropy, without materialising [B, S, V].

    hidden [B, S, D]; targets [B, S] int; logits_fn maps [..., D] -> [..., V] (the LM head, or
    the sampling distribution of ``rl.loss.sampling_logits``). The B x S tokens are flattened and
    run ``chunk_size`` at a time under ``lax.map``; each chunk is checkpointed, so under
    ``value_and_grad`` the forward keeps only the chunk's inputs and the backward recomputes its
    [chunk, V] logits (unchecked, the map would save every chunk's fp32 logits as residuals: the
    whole [tokens, V] in fp32, 27 GiB per chip at the 7B GRPO shape). The entropy and argmax hits
    are metrics, outside the differentiated path. Returns ``(logprobs, entropy)`` [B, S] float32,
    and with ``hits=True`` also the argmax hit [B, S] bool. SFT's cross-entropy and GRPO's ratio
    both read it.
    """
    b, s, d = hidden.shape
    n = b * s
    chunk = min(chunk_size, n)
    pad = (-n) % chunk
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
    t = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk)

    @jax.checkpoint
    def one(args):
        h_c, t_c = args
        logits = logits_fn(h_c).astype(jnp.float32)  # [chunk, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        fixed = jax.lax.stop_gradient(logits)
        entropy = jax.lax.stop_gradient(lse) - (jax.nn.softmax(fixed, axis=-1) * fixed).sum(-1)
        return picked - lse, entropy, jnp.argmax(fixed, axis=-1) == t_c

    logp, entropy, hit = jax.lax.map(one, (h, t))
    unchunk = lambda x: x.reshape(-1)[:n].reshape(b, s)
    out = (unchunk(logp), unchunk(entropy))
    return (*out, unchunk(hit)) if hits else out


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
    logp, _, correct = chunked_token_logprobs(model.logits, hidden, batch["targets"], chunk_size, hits=True)
    nll = -logp
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
