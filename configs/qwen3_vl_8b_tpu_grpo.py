"""Agentic GRPO of Qwen3-VL-8B on a TPU v5p-8 (4 chips), from the SFT export of
configs/qwen3_vl_8b_tpu.py: LoRA rank 8 as in SFT, vision tower frozen, bf16.

Sizes as configs/qwen2_5_vl_7b_tpu_grpo.py: 4 prompts x G = 4 rollouts, up to 6 turns, 192 new
tokens a turn; a turn is ~330 system-prompt tokens + the query + 256 image tokens (512 px) + the
reply, so sequences <= 1280 tokens.

    ibis-jax plan --config configs/qwen3_vl_8b_tpu_grpo.py --topology v5p-8 --stage all
    ibis-jax grpo --config configs/qwen3_vl_8b_tpu_grpo.py --init runs/q3_8b/hf --source ... \\
        --workdir runs/q3_8b_grpo
"""

import dataclasses
import importlib.util
import os

from ibis_jax.rl.trainer import RLConfig
from ibis_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
    """The SFT config's model, precision, mesh and image size, with GRPO's optimizer and cadence."""
    return dataclasses.replace(
        _sft_config(), hf_dir=None,  # --init gives the weights and tokenizer
        lr=1e-5, grad_accum=1, warmup_frac=0.0, weight_decay=0.01, grad_clip=1.0, checkpoint_every=50,
        keep_checkpoints=3,
    )


def _sft_config() -> TrainConfig:
    spec = importlib.util.spec_from_file_location("sft_config", os.path.join(os.path.dirname(__file__), "qwen3_vl_8b_tpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_rl_config() -> RLConfig:
    rl = RLConfig()
    return dataclasses.replace(
        rl, steps=1000, prompts_per_step=4, max_turns=6, history="none", temperature=1.0, max_new_tokens=192,
        seq_buckets=(1024, 1280), grpo=dataclasses.replace(rl.grpo, group_size=4, epsilon_low=0.2, beta=0.0),
    )
