"""The GRPO run configuration (`RLConfig`) and what follows from it: the GRPO config with its
run-dependent defaults (`resolve_grpo`), the learning-rate schedule and the optimizer of a run
(`grpo_schedule`, `grpo_optimizer`: the trainer's and `ibis-jax plan`'s). docs/design.md
section 5 gives the paper's settings.
"""

from __future__ import annotations

import dataclasses

from ibis_jax.rl import rollout_layout
from ibis_jax.rl.grpo import GRPOConfig
from ibis_jax.rl.rewards import PAPER_REWARDS, RewardConfig
from ibis_jax.train.config import TrainConfig
from ibis_jax.train.optim import make_optimizer


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """A GRPO run's settings (`ibis-jax grpo` sets them by dotted name: ``rl.grpo.beta=0.04``)."""

    steps: int = 10
    prompts_per_step: int = 2
    max_turns: int = 6  # actions per episode (the episode's max_actions)
    history: str = "none"
    rewards: tuple[str, ...] = PAPER_REWARDS
    reward: RewardConfig = RewardConfig()
    grpo: GRPOConfig = GRPOConfig()
    temperature: float = 1.0
    max_new_tokens: int = 96
    seq_buckets: tuple[int, ...] = (1024, 2048)
    query_style: str | None = "direct"  # first-turn query style; None: drawn per prompt as in synthesis
    seed: int = 0
    # learning rate (TrainConfig.lr): "constant" (the paper's RL) after `warmup_steps` of linear
    # warmup, or "cosine" = SFT's warmup-cosine over the run's updates (warmup_frac, end_lr_frac)
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    export_every: int = 0  # > 0: also export the policy every N steps to WORKDIR/exports/step_N
    # Rollouts decode on a copy of the merged policy resharded once per step (`rl.rollout_layout`):
    # "replicated" (episodes data-parallel over the chips), "tensor" (KV heads over chips where it
    # does not fit), "auto" (replicated when it fits the chip's free HBM).
    rollout_layout: str = "auto"
    prefix_cache: bool = True  # the system turn encoded once per step's policy, not per row and turn
    max_rows: int | None = None  # continuous batching: rows of the agent loop (None: one per episode)

    def __post_init__(self):
        if self.rollout_layout not in rollout_layout.LAYOUTS:
            raise ValueError(f"rl.rollout_layout={self.rollout_layout!r}: use one of {', '.join(rollout_layout.LAYOUTS)}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"rl.max_rows={self.max_rows}: use a row count >= 1, or None for one row per episode")


def grpo_schedule(config: TrainConfig, rl: RLConfig, total_updates: int | None = None):
    """The learning-rate schedule `rl.lr_schedule` names (at `config.lr`), over `total_updates`
    optimizer updates (default `rl.steps`; several updates per rollout batch count each)."""
    from ibis_jax.train.optim import constant_schedule, make_schedule

    if rl.lr_schedule == "constant":
        return constant_schedule(config.lr, rl.warmup_steps)
    if rl.lr_schedule == "cosine":
        return make_schedule(config, total_updates or rl.steps)
    raise ValueError(f"rl.lr_schedule {rl.lr_schedule!r}: use constant or cosine")


def grpo_optimizer(config: TrainConfig, rl: RLConfig):
    """(tx, schedule) of a GRPO run: `config`'s optimizer over every update of the run, at the
    rate `rl.lr_schedule` names (the trainer's and `ibis-jax plan`'s)."""
    updates = rl.steps * resolve_grpo(rl).updates_per_batch
    return make_optimizer(config, updates, grpo_schedule(config, rl, updates))


def resolve_grpo(rl: RLConfig) -> GRPOConfig:
    """The GRPO config with its run-dependent defaults filled in (dr_grpo's constant: the token
    budget of a trajectory, ``max_new_tokens * max_turns``)."""
    if rl.grpo.dr_grpo_norm > 0:
        return rl.grpo
    return dataclasses.replace(rl.grpo, dr_grpo_norm=float(rl.max_new_tokens * rl.max_turns))


__all__ = ["RLConfig", "resolve_grpo", "grpo_schedule", "grpo_optimizer"]
