"""GRPO for the tiny CPU model (configs/tiny_cpu.py), the settings of the README's located-targets
control: 4 prompts x 4 rollouts a step, rollout temperature 0.7, lr 1e-4 constant, the paper's five
rewards with T_opt 3 (the paper's 5 is for 20 actions; here episodes have 6).

    ibis-jax grpo --config configs/grpo_tiny_cpu.py --init runs/located/sft/hf --source demo \\
        --demo-parts shapes --workdir runs/grpo rl.steps=30 rl.grpo.epsilon_high=0.28

A GRPO config file defines ``get_config() -> TrainConfig`` (optimizer, image size, mesh) and
``get_rl_config() -> RLConfig`` (rollouts, rewards, the GRPO knobs in ``RLConfig.grpo``). Every
field is overridable on the command line: ``lr=3e-4`` (TrainConfig), ``rl.steps=10``,
``rl.grpo.num_iterations=2``, ``rl.reward.t_opt=5``, ``rl.reward.weights=format:1,answer:2``.
"""

import dataclasses
from pathlib import Path

from ibis_jax.rl.grpo import GRPOConfig
from ibis_jax.rl.rewards import PAPER_REWARDS, RewardConfig
from ibis_jax.rl.trainer import RLConfig
from ibis_jax.train.config import TrainConfig, load_config


def get_config() -> TrainConfig:
    sft = load_config(Path(__file__).with_name("tiny_cpu.py"))
    return dataclasses.replace(sft, lr=1e-4, warmup_frac=0.0, checkpoint_every=1_000_000)


def get_rl_config() -> RLConfig:
    return RLConfig(
        steps=30,
        prompts_per_step=4,
        max_turns=6,
        max_new_tokens=96,
        temperature=0.7,
        seq_buckets=(416,),  # the SFT buckets' largest (288) + the sampled turn
        rewards=PAPER_REWARDS,
        reward=RewardConfig(t_opt=3),
        grpo=GRPOConfig(group_size=4),  # the paper: eps 0.2 both sides, per-trajectory token mean, no KL
    )
