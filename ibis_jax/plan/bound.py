"""The analytic memory bound of a train step per chip: what a careful program cannot do without.

    resident state (parameters + optimizer state, from the compiled state's shards)
  + gradients (the step's fp32 accumulator and one micro-batch's gradients of what trains)
  + layer carries (scanned layers with full remat keep each decoder layer's input [tokens, D])
  + one decoder layer's working set in the backward (its activations recomputed, attention by a
    fused kernel when the backend is one: no [S, S] scores)
  + one log-prob chunk ([chunk, vocab] fp32 logits, their softmax and its gradient)
  + the vision tower's working set (frozen: the forward of one block over this chip's images,
    full-attention scores included; trained: its carries too)

`ibis-jax plan` prints it beside each compiled train stage with the ratio compiled / bound: a
ratio near 1 says the program holds little beyond the maths; a large one names where to look.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


LOGPROB_CHUNK = 256  # tokens per log-prob chunk (`train.loss.chunked_token_logprobs`'s default for GRPO)


@dataclasses.dataclass(frozen=True)
class Bound:
    parts: dict[str, int]  # bytes per chip

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))



def train_step_bound(cfg: Any, *, resident: int, gradients: int, tokens: int,
                     rows: int, seq: int, batch_ways: int, images: int, image_size: int, compute_bytes: int,
                     fused_attention: bool, freeze_vision: bool, mlp_chunk: int = 0, images_at_once: int = 8,
                     logprob_chunk: int = LOGPROB_CHUNK) -> Bound:
    """Bytes per chip. tokens / rows / images: one micro-batch's, over all chips (split over
    `batch_ways`); gradients: the fp32 bytes per chip of one copy of what trains (the step holds
    two: the accumulator and a micro-batch's)."""
    t, v = cfg.text, cfg.vision
    d, f = t.hidden_size, t.intermediate_size
    heads, kv, dh = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    tok = tokens / batch_ways
    grads = 2 * gradients
    carries = t.num_hidden_layers * tok * d * compute_bytes
    # One layer's backward: norms and residual (2 D), q / k / v / attention output (2 heads*dh +
    # 2 kv*dh), the MLP's gate / up / activation (3 F; over mlp_chunk positions at a time when
    # chunked), each with its gradient (x 2).
    mlp_share = min(1.0, mlp_chunk / seq) if mlp_chunk else 1.0
    layer = 2 * tok * (2 * d + 2 * heads * dh + 2 * kv * dh + 3 * f * mlp_share) * compute_bytes
    if not fused_attention:  # fp32 scores and probabilities [rows, heads, S, S]
        layer += 2 * (rows / batch_ways) * heads * seq * seq * 4
    head = 3 * logprob_chunk * t.vocab_size * 4
    patches = (image_size // v.patch_size) ** 2
    imgs = images / batch_ways
    at_once = min(imgs, images_at_once)  # the tower encodes a chip's images a few at a time
    e, fv = v.hidden_size, v.intermediate_size
    vision = at_once * patches * (3 * e + 3 * fv) * compute_bytes + at_once * v.num_heads * patches**2 * 4 * 2
    if not freeze_vision:
        vision += v.depth * imgs * patches * e * compute_bytes
    return Bound({"state": int(resident), "gradients": int(grads), "layer carries": int(carries),
                  "one layer": int(layer), "log-prob chunk": int(head), "vision": int(vision)})


def batch_ways(mesh_shape: dict[str, int]) -> int:
    return int(np.prod([mesh_shape.get(a, 1) for a in ("data", "fsdp")]))


__all__ = ["Bound", "train_step_bound", "batch_ways"]
