"""Agentic GRPO of Qwen2.5-VL-3B on one 8-GPU node, from the SFT export of
configs/qwen2_5_vl_3b_gpu.py: full fine-tuning of LLM + merger (vision frozen), fp32 master
weights (a 1e-6 step is below bf16's resolution), bf16 compute, FSDP over all GPUs.

`get_rl_config()` holds the rollout settings (`ibis-jax plan` reads them; pass the same values to
`ibis-jax grpo` as rl.* overrides until it reads them too). Sizes (see the README's plan table):
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

from ibis_jax.rl.trainer import RLConfig
from ibis_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="qwen2_5_vl_3b",
        hf_dir=None,  # --init gives the weights and tokenizer
        param_dtype="float32",
        compute_dtype="bfloat16",
        remat=True,
        freeze_vision=True,
        mesh_shape=(1, -1, 1),
        image_size=504,
        history="none",
        lr=1e-6,  # SPEC section 5
        warmup_frac=0.0,
        end_lr_frac=1.0,  # constant
        weight_decay=0.01,
        grad_clip=1.0,
        checkpoint_every=50,
        keep_checkpoints=3,
    )


def get_rl_config() -> RLConfig:
    rl = RLConfig()
    return dataclasses.replace(
        rl, steps=1000, prompts_per_step=8, max_turns=6, history="none", temperature=1.0, max_new_tokens=192,
        seq_buckets=(1024, 1280), grpo=dataclasses.replace(rl.grpo, group_size=4, epsilon=0.2, beta=0.0),
    )
