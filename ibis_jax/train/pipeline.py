"""The SFT input pipeline (grain): records -> shuffled, per-process sharded, tokenized, padded
batches whose shapes come from a short list (no recompiles per batch), with a checkpointable
iterator.

Order of operations (all deterministic given `shuffle_seed`):
  index of samples (record, step) -> shuffle (reshuffled every epoch) -> repeat -> this process's
  chunks of every micro-batch (see `make_pipeline`) -> [workers] read record, render overlays, preprocess images, tokenize -> batch of the
  process's share of the global batch -> pad to the smallest bucket that fits, split into
  `grad_accum` micro-batches.

Batch layout (one optimizer step, process-local; A = grad_accum, b = micro-batch, S = bucket,
N = b * max_images_per_sample images, L = N * patches per image):
  input_ids      int32   [A, b, S]   right-padded with the pad id
  attention_mask int32   [A, b, S]
  targets        int32   [A, b, S]   input_ids shifted left (the token position i predicts)
  weights        float32 [A, b, S]   loss weight of predicting targets[i] (0 = no loss)
  action_mask    float32 [A, b, S]   targets[i] lies in a weighted <action> block
  pixel_values   float32 [A, L, 1176] real images first (in token order), zero images after
  image_grid_thw int32   [A, N, 3]   all equal (fixed square image size)
  num_images     int32   [A]         real images per micro-batch (for image tokens/s)
"""

from __future__ import annotations

import dataclasses
import threading
import logging
from typing import Any

import grain
import numpy as np

from ibis_jax.agent.prompts import system_prompt
from ibis_jax.buckets import fit_bucket
from ibis_jax.data.records import TrajectoryDataSource
from ibis_jax.models.qwen2_5_vl.processor import preprocess_prepared
from ibis_jax.train.config import TrainConfig
from ibis_jax.train.samples import SFTSample, record_samples

log = logging.getLogger(__name__)


def load_tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def sample_index(source: TrajectoryDataSource, history: str) -> np.ndarray:
    """[num_samples, 2] (record index, step) pairs: one per step (history none) or one per record
    with step -1 (history full). Reads every record header once."""
    pairs = []
    for i in range(len(source)):
        rec = source[i]
        if history == "full":
            pairs.append((i, -1))
        else:
            pairs.extend((i, t) for t in range(len(rec.steps)))
    if not pairs:
        raise ValueError(f"{source}: no samples (empty dataset?)")
    return np.asarray(pairs, np.int64)


class TokenizeSample(grain.transforms.Map):
    """(record, step) -> SFTSample; opens the record source and tokenizer lazily (in each worker)."""

    def __init__(self, data_dir: str, tokenizer_dir: str, config: TrainConfig, patch_size: int = 14):
        self.data_dir, self.tokenizer_dir, self.config, self.patch_size = data_dir, tokenizer_dir, config, patch_size
        self._source = self._tok = None
        self._lock = threading.Lock()  # grain maps in a thread pool: open once, never half-open

    def __getstate__(self):
        return {"data_dir": self.data_dir, "tokenizer_dir": self.tokenizer_dir, "config": self.config,
                "patch_size": self.patch_size}

    def __setstate__(self, state):
        self.__init__(**state)

    def map(self, pair: np.ndarray) -> SFTSample:
        with self._lock:
            if self._tok is None:
                self._source = TrajectoryDataSource(self.data_dir)
                self._tok = load_tokenizer(self.tokenizer_dir)
        c = self.config
        rec, step = int(pair[0]), int(pair[1])
        record = self._source[rec]
        (sample,) = record_samples(
            record, self._tok, image_size=c.image_size, history=c.history,
            color=tuple(c.overlay_color), alpha=c.overlay_alpha, steps=None if step < 0 else [step],
            system_prompt=system_prompt(c.system_prompt), patch_size=self.patch_size,
        )
        return sample


@dataclasses.dataclass
class Collate:
    """list[SFTSample] (the process's share of one step) -> the batch dict of the module docstring."""

    config: TrainConfig
    pad_id: int
    # The processor's image settings (patch size, merge, mean / std): `processor.image_kwargs`.
    image_kwargs: dict = dataclasses.field(default_factory=dict)

    def __call__(self, samples: list[SFTSample]) -> dict[str, np.ndarray]:
        c = self.config
        longest = max(len(s.input_ids) for s in samples)
        buckets = sorted(c.seq_buckets)
        kept = samples
        if longest <= buckets[-1]:
            seq = fit_bucket(longest, buckets)
        else:
            if not c.drop_too_long:
                raise ValueError(
                    f"a sample has {longest} tokens, more than the largest of seq_buckets {buckets}: "
                    "add a bigger bucket (config seq_buckets) or set drop_too_long=true"
                )
            # Dropped samples become empty (weight 0) so the batch shape and data order stay fixed.
            kept = [s if len(s.input_ids) <= buckets[-1] else _empty(s, self.pad_id) for s in samples]
            n = sum(a is not b for a, b in zip(kept, samples))
            if n == len(samples):  # a step that would train on nothing (loss 0): say so instead
                raise ValueError(
                    f"every sample of a batch is longer than the largest of seq_buckets {buckets} (the longest "
                    f"has {longest} tokens): add a bucket of at least {longest} (config seq_buckets)")
            log.warning("dropped %d sample(s) longer than %d tokens", n, buckets[-1])
            seq = buckets[-1]
        micro = len(kept) // c.grad_accum
        parts = [self._micro(kept[i * micro:(i + 1) * micro], seq) for i in range(c.grad_accum)]
        return {k: np.stack([p[k] for p in parts]) for k in parts[0]}

    def _micro(self, samples: list[SFTSample], seq: int) -> dict[str, np.ndarray]:
        c = self.config
        b = len(samples)
        ids = np.full((b, seq), self.pad_id, np.int32)
        mask = np.zeros((b, seq), np.int32)
        weights = np.zeros((b, seq), np.float32)
        action = np.zeros((b, seq), np.float32)
        images = []
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            ids[i, :n] = s.input_ids
            mask[i, :n] = 1
            weights[i, : n - 1] = s.loss_weights[1:]  # position i predicts token i + 1
            action[i, : n - 1] = s.action_mask[1:] & (s.loss_weights[1:] > 0)
            if len(s.images) > c.max_images_per_sample:
                raise ValueError(
                    f"record {s.record_id}: {len(s.images)} images > max_images_per_sample "
                    f"{c.max_images_per_sample}; raise it in the config"
                )
            images.extend(s.images)
        targets = np.concatenate([ids[:, 1:], np.full((b, 1), self.pad_id, np.int32)], axis=1)
        cap = b * c.max_images_per_sample
        blank = np.zeros((c.image_size, c.image_size, 3), np.uint8)
        # No resize happens: prepare_image already made every image image_size^2.
        pv, grid = preprocess_prepared(images + [blank] * (cap - len(images)), **self.image_kwargs)
        if len(images) < cap:
            pv[len(images) * (c.image_size // self.image_kwargs.get("patch_size", 14)) ** 2:] = 0.0
        return {
            "input_ids": ids, "attention_mask": mask, "targets": targets, "weights": weights,
            "action_mask": action, "pixel_values": pv.astype(np.float32), "image_grid_thw": grid.astype(np.int32),
            "num_images": np.asarray(len(images), np.int32),
        }


@dataclasses.dataclass
class TokenizeChunk(grain.transforms.Map):
    """A chunk of (record, step) pairs -> its SFTSamples."""

    tokenize: TokenizeSample

    def map(self, chunk: list) -> list[SFTSample]:
        return [self.tokenize.map(pair) for pair in chunk]


@dataclasses.dataclass
class FlatCollate:
    """The grad_accum chunks of one step (lists of SFTSamples) -> `Collate` of their concatenation."""

    collate: Collate

    def __call__(self, chunks: list[list[SFTSample]]) -> dict[str, np.ndarray]:
        return self.collate([s for chunk in chunks for s in chunk])


def _empty(s: SFTSample, pad_id: int) -> SFTSample:
    return SFTSample(np.asarray([pad_id], np.int32), np.zeros(1, np.float32), np.zeros(1, bool), [], s.record_id, s.step)


@dataclasses.dataclass
class Pipeline:
    """The dataset and its sizes; `iterator()` makes a fresh checkpointable iterator."""

    dataset: Any  # grain.IterDataset
    num_samples: int
    steps_per_epoch: int
    collate: Collate

    def iterator(self) -> grain.DatasetIterator:
        return iter(self.dataset)


def make_pipeline(
    data_dir: str,
    tokenizer_dir: str,
    config: TrainConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    image_kwargs: dict | None = None,
) -> Pipeline:
    """Build the grain pipeline of the module docstring for this process. image_kwargs: the
    model's processor's image settings (`processor.image_kwargs`; default Qwen2.5-VL's)."""
    source = TrajectoryDataSource(data_dir)
    pairs = sample_index(source, config.history)
    if config.batch_size % process_count:
        raise ValueError(f"config batch_size {config.batch_size} not divisible by {process_count} processes")
    local = config.batch_size // process_count
    if local % config.grad_accum:
        raise ValueError(f"per-process batch {local} not divisible by grad_accum {config.grad_accum}")
    tok = load_tokenizer(tokenizer_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
    image_kwargs = dict(image_kwargs or {})
    collate = Collate(config, int(pad_id), image_kwargs)
    ds = grain.MapDataset.source(list(pairs)).shuffle(seed=config.shuffle_seed).repeat(None)
    # Every process reads only its slice, laid out so the global batch is the one a single process
    # would build, row for row: the stream is cut into chunks of m = micro_batch / processes
    # samples; micro-batch a of step i is chunks (i * A + a) * P + p for p = 0 .. P-1, and process
    # p holds chunk p of each (the rows its devices own when the batch is split over processes).
    m = local // config.grad_accum
    ds = ds.batch(m, drop_remainder=True, batch_fn=list)[process_index::process_count]
    ds = ds.map(TokenizeChunk(TokenizeSample(data_dir, tokenizer_dir, config, image_kwargs.get("patch_size", 14))))
    ds = ds.batch(config.grad_accum, drop_remainder=True, batch_fn=FlatCollate(collate))
    it_ds = ds.to_iter_dataset()
    if config.num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return Pipeline(it_ds, len(pairs), max(1, len(pairs) // config.batch_size), collate)

