"""Agentic GRPO of Qwen3-VL-8B on a TPU v5p-8, from the SFT export of configs/qwen3_vl_8b_tpu.py:
`configs/qwen2_5_vl_7b_tpu_grpo.py` (LoRA r8, 4 prompts x G = 4 rollouts, 6 turns, 192 new tokens,
sequences <= 1280 tokens) with the Qwen3-VL model at 512 px (256 visual tokens a turn).

    ibis-jax plan --config configs/qwen3_vl_8b_tpu_grpo.py --topology v5p-8 --stage all
    ibis-jax grpo --config configs/qwen3_vl_8b_tpu_grpo.py --init runs/q3_8b/hf --source ... \\
        --workdir runs/q3_8b_grpo
"""

import os

from ibis_jax.train.config import load_config

BASE = os.path.join(os.path.dirname(__file__), "qwen2_5_vl_7b_tpu_grpo.py")
QWEN3 = ['model=qwen3_vl_8b', 'image_size=512']


def get_config():
    return load_config(BASE, QWEN3)


def get_rl_config():
    """The base config's rollout settings, unchanged."""
    from ibis_jax.commands.grpo import rl_config_from

    return rl_config_from([], BASE)
