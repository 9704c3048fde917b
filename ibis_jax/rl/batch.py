"""From finished rollouts to the GRPO training batch.

Each policy turn becomes one training sequence: the turn's prompt encoded by the one conversation
encoder the policy prompted with (``ibis_jax.agent.encoding.encode_conversation``), then the
sampler's own ids as they were sampled (never decoded and re-encoded). Only those ids carry loss:
``loss_mask`` is 1 exactly on the positions whose *next* token is a sampled one, so the system prompt, the user turns and the image
tokens never enter the loss or the ratio. Every turn of a trajectory shares that trajectory's
advantage, and ``row_weights`` = 1 / (policy tokens of the whole trajectory), so the paper's
per-trajectory token mean (``trajectory_mean``) can be taken over rows that are single turns.

Arrays are padded to a bucketed length, and the number of rows to a multiple of ``pad_rows`` (the
mesh's batch divisor, or 8) from a bounded set (`row_bucket`), so the jitted steps see few shapes
although the number of turns changes from step to step, and few rows are padding. Padding rows repeat the last real turn with an empty loss mask and advantage 0: they
carry no loss and leave the sequence count of the loss denominator unchanged.

The update takes the turns as ``grad_accum`` micro-batches of one shape (`micro_batches`); on
several processes each process's micro-batches are padded to the shapes of the largest share
(`agree_micro_batches`, a collective), and a process that kept no turn supplies inert rows
(`inert_rows`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from ibis_jax.agent.encoding import encode_conversation
from ibis_jax.buckets import fit_bucket
from ibis_jax.models.qwen2_5_vl.processor import check_image_tokens
from ibis_jax.agent.loop import PolicyTurn
from ibis_jax.train import core


@dataclasses.dataclass
class TurnExample:
    """One policy turn ready to tokenize: its conversation and what the sampler produced."""

    messages: list  # list[Message]
    turn: PolicyTurn
    advantage: float
    trajectory: int = 0  # which trajectory (episode) of the batch the turn belongs to


@dataclasses.dataclass
class GRPOBatch:
    input_ids: np.ndarray  # int32 [B, S]
    attention_mask: np.ndarray  # int32 [B, S]
    targets: np.ndarray  # int32 [B, S]: input_ids shifted left (the token each position predicts)
    loss_mask: np.ndarray  # float32 [B, S]: 1 where targets[b, s] is a sampled policy token
    advantages: np.ndarray  # float32 [B]
    row_weights: np.ndarray  # float32 [B]: 1 / policy tokens of the row's trajectory (0: padding)
    sampler_logprobs: np.ndarray  # float32 [B, S]: the sampler's log-probs at the masked positions
    pixel_values: np.ndarray | None  # float32 [patches, C*T*P*P]
    image_grid_thw: np.ndarray | None  # int [images, 3]

    @property
    def num_policy_tokens(self) -> int:
        return int(self.loss_mask.sum())


def row_bucket(rows: int, multiple: int = 8) -> int:
    """The padded number of rows: a multiple of ``multiple`` (the mesh's batch divisor, or 8), from
    a bounded set: every multiple up to 8 x ``multiple``, then 8 sizes per doubling (steps of
    2^(k-3) multiples between 2^k and 2^(k+1) multiples). So at most ``multiple - 1`` rows or 1/8
    of the rows are padding, and N rows of ``multiple`` see at most 8 + 8 log2(N / 8) shapes."""
    if rows < 1 or multiple < 1:
        raise ValueError(f"row_bucket: rows and multiple must be >= 1, got {rows}, {multiple}")
    q = -(-rows // multiple)
    if q > 8:
        step = 1 << (q.bit_length() - 4)
        q = -(-q // step) * step
    return q * multiple


def row_multiple(mesh_batch_ways: int, at_least: int = 8) -> int:
    """Rows are padded to multiples of this: the mesh's batch ways (data x fsdp), raised to a
    multiple of it that is >= ``at_least`` (few shapes on one device)."""
    ways = max(1, mesh_batch_ways)
    return ways * -(-at_least // ways)


def trajectory_tokens(examples: Sequence[TurnExample]) -> dict[int, int]:
    """Policy tokens per trajectory (all its turns): ``N_i`` of the paper's per-trajectory mean."""
    counts: dict[int, int] = {}
    for ex in examples:
        counts[ex.trajectory] = counts.get(ex.trajectory, 0) + len(ex.turn.token_ids or ())
    return counts


def build_grpo_batch(examples: Sequence[TurnExample], processor, buckets: Sequence[int] = (512, 1024, 2048, 4096),
                     eos_ids: Sequence[int] = (), pad_rows: int | None = 8, *, image_size: int,
                     tokens_per_trajectory: dict[int, int] | None = None) -> GRPOBatch:
    """Encodes each turn's prompt as the policy did, appends its sampled ids, builds the masks
    (right padding). Works for both history modes: with ``full`` each turn's prompt holds the
    earlier turns as their sampled ids. image_size and eos_ids: the policy's
    (``AgentSettings.image_size``, the sampler's end ids). pad_rows: pad the rows to
    ``row_bucket(n, pad_rows)``; None keeps n. tokens_per_trajectory: ``N_i`` for
    ``row_weights`` when ``examples`` is a mini-batch of a larger batch (:func:`trajectory_tokens`
    of the whole batch); None counts ``examples``."""
    rows, images = [], []
    for ex in examples:
        if ex.turn.token_ids is None:
            raise ValueError("GRPO needs the sampler's token ids for every turn (PolicyTurn.token_ids is None)")
        sampled = np.asarray(ex.turn.token_ids, dtype=np.int32)
        # The prompt exactly as the policy encoded it (ModelPolicy.encode), then the sampled ids.
        enc = encode_conversation(ex.messages, processor.tokenizer, image_size, add_generation_prompt=True,
                                  eos_ids=eos_ids, patch_size=processor.image_kwargs["patch_size"])
        prompt = enc.input_ids
        logprobs = (np.zeros(len(sampled), np.float32) if ex.turn.logprobs is None
                    else np.asarray(ex.turn.logprobs, np.float32))
        rows.append((prompt, sampled, logprobs))
        images += enc.images
    length = fit_bucket(max(len(p) + len(s) for p, s, _ in rows), buckets, what="a GRPO turn")
    real = len(rows)
    b = real if pad_rows is None else row_bucket(real, pad_rows)
    last_images = images[len(images) - sum(m.image is not None for m in examples[-1].messages):]
    for _ in range(b - real):
        rows.append((rows[-1][0], rows[-1][1], rows[-1][2]))
        images += last_images
    input_ids = np.zeros((b, length), np.int32)
    attention = np.zeros((b, length), np.int32)
    loss_mask = np.zeros((b, length), np.float32)
    sampler_lp = np.zeros((b, length), np.float32)
    for i, (prompt, sampled, lp) in enumerate(rows):
        n_p, n_s = len(prompt), len(sampled)
        input_ids[i, :n_p + n_s] = np.concatenate([prompt, sampled])
        attention[i, :n_p + n_s] = 1
        # Position p predicts token p + 1: the sampled tokens are predicted from n_p - 1 onwards.
        loss_mask[i, n_p - 1:n_p - 1 + n_s] = 1.0 if i < real else 0.0
        sampler_lp[i, n_p - 1:n_p - 1 + n_s] = lp
    targets = np.concatenate([input_ids[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    counts = trajectory_tokens(examples) if tokens_per_trajectory is None else tokens_per_trajectory
    row_weights = np.asarray([1.0 / max(counts[ex.trajectory], 1) for ex in examples]
                             + [0.0] * (b - real), np.float32)
    pixel_values = grid = None
    if images:
        pixel_values, grid = processor.prepared_images(images)
        check_image_tokens(input_ids, processor.image_token_id, grid, processor.image_kwargs["merge_size"],
                           "GRPO batch")
    return GRPOBatch(input_ids, attention, targets, loss_mask,
                     np.asarray([ex.advantage for ex in examples] + [0.0] * (b - real), np.float32),
                     row_weights, sampler_lp, pixel_values, grid)


BATCH_KEYS = ("input_ids", "attention_mask", "targets", "loss_mask", "advantages", "row_weights", "pixel_values",
              "image_grid_thw")


def micro_batches(examples: Sequence[TurnExample], processor, buckets: Sequence[int], grad_accum: int,
                  eos_ids: Sequence[int], image_size: int, tokens_per_trajectory: dict[int, int] | None = None,
                  pad_to: int = 8) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The turns as `grad_accum` micro-batches [A, ...] of one sequence length and row count
    (contiguous groups of turns; padding rows carry no loss), and the sampler log-probs [A, b, S].
    The loss is a sum over rows with per-row weights, so the update equals one batch.
    tokens_per_trajectory: N_i of the whole rollout batch when ``examples`` is a mini-batch of it."""
    counts = tokens_per_trajectory if tokens_per_trajectory is not None else trajectory_tokens(examples)
    whole = build_grpo_batch(examples, processor, buckets, eos_ids, pad_to, image_size=image_size,
                             tokens_per_trajectory=counts)
    if grad_accum == 1:
        parts = [whole]
    else:
        per = -(-len(examples) // grad_accum)
        rows = row_bucket(per, max(1, whole.input_ids.shape[0] // grad_accum))
        groups = [examples[i * per:(i + 1) * per] for i in range(grad_accum)]
        if any(not g for g in groups):
            raise ValueError(f"{len(examples)} policy turns do not fill grad_accum={grad_accum} micro-batches")
        parts = [build_grpo_batch(g, processor, (whole.input_ids.shape[1],), eos_ids, pad_rows=rows,
                                  image_size=image_size, tokens_per_trajectory=counts) for g in groups]
    shapes = {np.shape(p.pixel_values) for p in parts}
    if len(shapes) > 1:
        raise ValueError("grad_accum > 1 needs the same number of images in every micro-batch (history=none)")
    arrays = {k: np.stack([getattr(p, k) for p in parts]) for k in BATCH_KEYS}
    return arrays, np.stack([p.sampler_logprobs for p in parts])


def inert_rows(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Micro-batches whose rows carry no loss, no advantage and no weight (a process's share of
    an update when it kept no turn): they enter no sum and no denominator of the loss."""
    out = dict(arrays)
    for k in ("loss_mask", "advantages", "row_weights"):
        out[k] = np.zeros_like(arrays[k])
    return out


def agree_micro_batches(arrays: dict[str, np.ndarray], sampler_lp: np.ndarray) -> tuple[dict[str, np.ndarray],
                                                                                       np.ndarray]:
    """This process's micro-batches ``[A, rows, S]`` as its part of a global batch: padded to the
    most rows and the longest bucket of any process (extra rows repeat the last one with no loss,
    its image too; extra columns are padding), with the image grids of every process's images
    (every turn has one image of the same square grid). A collective: every process calls it."""
    a, rows, length = arrays["input_ids"].shape
    grids = arrays["image_grid_thw"]
    if grids.shape[1] != rows or np.any(grids != grids[0, 0]):
        raise ValueError(f"GRPO on several processes needs one image of one grid per turn, got {grids.shape[1]} "
                         f"images for {rows} rows")
    shapes = core.gather_rows(np.asarray([[rows, length, *grids[0, 0]]]), jax.process_count())
    if np.any(shapes[:, 2:] != shapes[0, 2:]):
        raise ValueError(f"processes have different image grids {shapes[:, 2:].tolist()}: give every process the "
                         "same image_size")
    want_rows, want_len = int(shapes[:, 0].max()), int(shapes[:, 1].max())
    out = dict(arrays)
    extra_cols = ((0, 0), (0, 0), (0, want_len - length))
    for k in ("input_ids", "attention_mask", "targets", "loss_mask"):
        out[k] = np.pad(arrays[k], extra_cols)
    sampler_lp = np.pad(sampler_lp, extra_cols)
    extra = want_rows - rows
    if extra:
        def more(x, fill=None):  # x [A, rows, ...] -> the last row repeated (or `fill`) at the end
            last = np.repeat(x[:, -1:], extra, axis=1)
            return np.concatenate([x, last if fill is None else np.full_like(last, fill)], axis=1)

        for k in ("input_ids", "attention_mask", "targets"):
            out[k] = more(out[k])
        for k in ("loss_mask", "advantages", "row_weights"):
            out[k] = more(out[k], 0)
        sampler_lp = more(sampler_lp, 0)
        per_image = arrays["pixel_values"].shape[1] // rows
        last = arrays["pixel_values"][:, -per_image:]
        out["pixel_values"] = np.concatenate([arrays["pixel_values"], np.tile(last, (1, extra, 1))], axis=1)
    out["image_grid_thw"] = np.tile(grids[:, :1], (1, want_rows * jax.process_count(), 1))
    return out, sampler_lp
