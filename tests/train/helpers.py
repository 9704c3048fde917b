"""Small trajectory datasets and configs for the training tests (no synthesis run needed)."""

from __future__ import annotations

import os

import numpy as np

from ibis_jax.agent.prompts import user_turn
from ibis_jax.data.records import ShardWriter, StepRecord, TrajectoryRecord, encode_png, shard_name
from ibis_jax.data.rle import encode_rle


def turn_text(reasoning: str, action: str, answer: str | None = None) -> str:
    text = f"<think>\n{reasoning}\n</think>\n<action>\n{action}\n</action>"
    return text + (f"\n<answer>\n{answer}\n</answer>" if answer else "")


def make_record(i: int, size: int = 64, clicks: int = 2, wrong_at: int | None = None) -> TrajectoryRecord:
    rng = np.random.default_rng(i)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    gt = np.zeros((size, size), bool)
    gt[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = True
    steps = []
    query = f"Segment the square {i}."
    for t in range(clicks + 1):
        mask = np.zeros((size, size), bool)
        mask[size // 4: size // 4 + (t + 1) * size // (2 * (clicks + 1)), size // 4: 3 * size // 4] = True
        if t < clicks:
            x, y = 0.25 + 0.1 * t, 0.5
            action = f"Positive Point ({x:.4f}, {y:.4f})"
            text = turn_text(f"The mask misses part {t}.", action)
            kind, answer = "click", None
        else:
            action, kind, answer = "Terminate", "terminate", "The square is segmented."
            text = turn_text("The mask fits.", action, answer)
        steps.append(StepRecord(
            index=t, kind=kind, mask=encode_rle(mask), user=user_turn(t, query), reasoning="r", action=action,
            text=text, loss_weight=0.0 if t == wrong_at else 1.0, answer=answer,
            tag="wrong" if t == wrong_at else "oracle",
        ))
    return TrajectoryRecord(
        record_id=f"rec{i}", image_png=encode_png(image), height=size, width=size, query=query,
        target="square", modality="Synthetic", steps=steps, gt_mask=encode_rle(gt),
    )


def write_dataset(directory: str, records: int = 4, clicks: int = 2) -> str:
    os.makedirs(directory, exist_ok=True)
    with ShardWriter(os.path.join(directory, shard_name(0, 1))) as w:
        for i in range(records):
            w.write(make_record(i, clicks=clicks, wrong_at=1 if i % 2 == 0 else None))
        w.commit()
    return directory


def make_config(**overrides):
    from ibis_jax.train.config import TrainConfig

    base = dict(
        image_size=56, seq_buckets=(1024,), batch_size=8, max_steps=1, lr=1e-3, warmup_frac=0.0,
        freeze_vision=False, checkpoint_every=1000, export_hf=False, log_every=1,
    )
    base.update(overrides)
    return TrainConfig(**base)
