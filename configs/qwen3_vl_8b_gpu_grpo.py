"""Agentic GRPO of Qwen3-VL-8B on one 8-GPU node, from the SFT export of configs/qwen3_vl_8b_gpu.py:
`configs/qwen2_5_vl_3b_gpu_grpo.py` (full fine-tuning, fp32 master weights, lr 1e-6, 8 prompts x
G = 4 rollouts, 6 turns) with the Qwen3-VL model at 512 px.

    JAX_PLATFORMS=cpu ibis-jax plan --config configs/qwen3_vl_8b_gpu_grpo.py --topology h100x8 --stage all
    ibis-jax grpo --config configs/qwen3_vl_8b_gpu_grpo.py --init runs/q3_8b/hf --source ... \\
        --workdir runs/q3_8b_grpo
"""

import os

from ibis_jax.train.config import load_config

BASE = os.path.join(os.path.dirname(__file__), "qwen2_5_vl_3b_gpu_grpo.py")
QWEN3 = ['model=qwen3_vl_8b', 'image_size=512']


def get_config():
    return load_config(BASE, QWEN3)


def get_rl_config():
    """The base config's rollout settings, unchanged."""
    from ibis_jax.commands.grpo import rl_config_from

    return rl_config_from([], BASE)
