"""Agentic GRPO of Qwen2.5-VL-3B on one 8-GPU node, from the SFT export of
configs/qwen2_5_vl_3b_gpu.py: full fine-tuning of LLM + merger (vision frozen), fp32 master
weights (a 1e-6 step is below bf16's resolution), bf16 compute, FSDP over all GPUs.

`get_rl_config()` holds the rollout settings (`ibis-jax grpo` and `ibis-jax plan` read them;
rl.* overrides change them). Sizes (see the README's plan table):
  - 8 prompts x G = 4 rollouts (the paper's G) = 32 episodes decoding together, up to 6 turns:
    the update sees <= 192 turn rows (padded to 256) in one micro-batch as the trainer runs it;
  - one turn (history none): ~330 system-prompt tokens + the query + 324 image tokens (504 px)
    + the reply. Qwen's tokenizer splits digits one by one, so "click(412, 87)" costs ~12 tokens
    and a reasoning + action reply fits in 192 new tokens: sequences <= 1280 tokens (buckets
    1024 / 1280), sampler cache bucket 2048.

    ibis-jax grpo --config configs/qwen2_5_vl_3b_gpu_grpo.py --init runs/3b/hf --source ... \\
        --workdir runs/3b_grpo rl.prompts_per_step=8 rl.group_size=4 rl.max_turns=6 \\
        rl.max_new_tokens=192
"""

import dataclasses
import importlib.util
import os

from ibis_jax.rl.trainer import RLConfig
from ibis_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
    """The SFT config's model, precision, mesh and image size (a GRPO run must see what SFT
    trained), with GRPO's optimizer and checkpoint cadence."""
    return dataclasses.replace(
        _sft_config(), hf_dir=None,  # --init gives the weights and tokenizer
        lr=1e-6,  # docs/design.md section 5
        grad_accum=1, warmup_frac=0.0, weight_decay=0.01, grad_clip=1.0, checkpoint_every=50, keep_checkpoints=3,
    )


def _sft_config() -> TrainConfig:
    spec = importlib.util.spec_from_file_location("sft_config", os.path.join(os.path.dirname(__file__), "qwen2_5_vl_3b_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_rl_config() -> RLConfig:
    rl = RLConfig()
    return dataclasses.replace(
        rl, steps=1000, prompts_per_step=8, max_turns=6, history="none", temperature=1.0, max_new_tokens=192,
        seq_buckets=(1024, 1280), grpo=dataclasses.replace(rl.grpo, group_size=4, epsilon_low=0.2, beta=0.0),
    )
