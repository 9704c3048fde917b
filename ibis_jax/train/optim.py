"""AdamW with global-norm clipping (docs/design.md section 5), shared by SFT and GRPO, on the schedule each
algorithm names: SFT linear warmup + cosine decay (`make_schedule`), GRPO a constant rate (the
paper's RL runs at a constant 1e-6) with an optional linear warmup (`constant_schedule`)."""

from __future__ import annotations

import optax

from ibis_jax.train.config import TrainConfig


def make_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_frac` of the steps to `lr`, cosine to `lr * end_lr_frac`."""
    warmup = int(round(config.warmup_frac * total_steps))
    if config.end_lr_frac >= 1.0:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, config.lr, max(warmup, 1)), optax.constant_schedule(config.lr)], [warmup]
        ) if warmup else optax.constant_schedule(config.lr)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=config.lr * config.end_lr_frac,
    )


def constant_schedule(lr: float, warmup_steps: int = 0) -> optax.Schedule:
    """`lr` on every step, after a linear warmup from 0 over `warmup_steps` (0: none)."""
    if warmup_steps <= 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
                                [warmup_steps])


def make_optimizer(
    config: TrainConfig, total_steps: int, schedule: optax.Schedule | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ clipping) on `schedule` (default: SFT's `make_schedule(config, total_steps)`)."""
    schedule = make_schedule(config, total_steps) if schedule is None else schedule
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay),
    )
    return tx, schedule
